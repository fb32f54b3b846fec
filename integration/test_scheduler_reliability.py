"""Scheduler reliability with real etcd, real gRPC servers and real llumlet/scheduler processes: bad values in etcd
are skipped, followers follow the config, a stall does not move leadership while a dead leader is replaced fast, a
vanished instance gets a grace period, and the real Scale/Cordon/Uncordon/ResignLeader through llmctl."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import pytest

from integration.cluster import (
    add_request,
    dial,
    etcd_server_tls,
    etcd_urls,
    get_load,
    harness_etcd_client,
    leader_of,
    llmctl_tls_args,
)
from integration.procs import Component, Processes
from pyllumnix.control_plane.scheduler.config_wire import config_to_pb
from pyllumnix.control_plane.scheduler.provider import InstanceProvider, LocalProcessProvider
from pyllumnix.control_plane.scheduler.replica import ReplicaTiming, SchedulerReplica
from pyllumnix.control_plane.scheduler.service import (
    ADMIN_SERVICE,
    SCHEDULER_SERVICE,
    AdminServicer,
    SchedulerServicer,
)
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.config_store import ConfigStore
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.registry import InstanceRegistry
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.infra.security import runtime
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2_grpc,
    common_pb2,
    config_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from pyllumnix.tools.llmctl import EXIT_ERROR, EXIT_USAGE
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_llmctl_cli import llmctl

pytestmark = pytest.mark.integration

Replicas = list[tuple[SchedulerReplica, RunningServer]]


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replicas(
    etcd: EmbeddedEtcd,
    cluster: str,
    n: int,
    *,
    timing: ReplicaTiming | None = None,
    providers: Sequence[InstanceProvider | None] = (),
) -> AsyncIterator[Replicas]:
    """``n`` in-process scheduler replicas, each with its own etcd client and real gRPC server (as run_scheduler)."""
    started: Replicas = []
    clients: list[EtcdClient] = []
    try:
        for i in range(n):
            client = harness_etcd_client(etcd_urls(etcd))
            clients.append(client)
            provider = providers[i] if i < len(providers) else None
            replica = SchedulerReplica(client, KeyLayout(cluster), f"r{i}", "", provider=provider, timing=timing)
            add_scheduler = scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server
            add_admin = admin_pb2_grpc.add_AdminServiceServicer_to_server
            server = await start_server(
                [
                    (add_scheduler, SchedulerServicer(replica), SCHEDULER_SERVICE),
                    (add_admin, AdminServicer(replica), ADMIN_SERVICE),
                ]
            )
            replica.grpc_address = server.address
            await replica.start()
            started.append((replica, server))
        yield started
    finally:
        for replica, server in started:
            await replica.stop()
            await server.stop(None)
            if replica.provider is not None:
                await replica.provider.close()
        for client in clients:
            await client.close()


async def leader_and_follower(rs: Replicas) -> tuple[SchedulerReplica, SchedulerReplica]:
    await wait_for(lambda: sum(r.is_leader for r, _ in rs) == 1, 15, "a leader is elected")
    leader = next(r for r, _ in rs if r.is_leader)
    follower = next(r for r, _ in rs if not r.is_leader)
    await wait_for(lambda: follower.leader.replica_id == leader.replica_id, 5, "the follower knows the leader")
    return leader, follower


def start_llumlet(procs: Processes, etcd: EmbeddedEtcd, cluster: str, name: str, *, slow: bool = False) -> Component:
    """A sim llumlet; ``slow``: the 7B profile's step times (~30 ms per decode step) without KV payload bytes, so a
    request of a few hundred tokens runs for seconds."""
    profile = ["--profile", "llama-7b-a10", "--no-payload"] if slow else ["--profile", "tiny"]
    return procs.start(
        name,
        "llumlet",
        "--etcd",
        ",".join(etcd_urls(etcd)),
        "--cluster",
        cluster,
        "--instance-id",
        name,
        *profile,
        "--transport",
        "tcp",
        "--lease-ttl",
        "2",
    )


def restarts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()]


async def test_undecodable_registry_and_config_values_are_skipped(
    etcd1: EmbeddedEtcd, etcd_cluster_name: str, etcd_client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage under the registry prefix and at the config key: no watch fails or restarts, and a new valid
    instance (and config) is seen by every replica at once."""
    caplog.set_level(logging.INFO)
    layout = KeyLayout(etcd_cluster_name)
    registry = InstanceRegistry(etcd_client, layout)
    await etcd_client.put(layout.instance_key("garbage"), b"not a protobuf")
    await etcd_client.put(layout.config_key, b"\xff\xff\xff")
    lease = await Lease.grant(etcd_client, 10)
    try:
        async with replicas(etcd1, etcd_cluster_name, 2) as rs:
            leader, _ = await leader_and_follower(rs)
            for iid in ("i-new", "i-newer"):
                info = common_pb2.InstanceInfo(instance_id=iid, grpc_address="127.0.0.1:1")
                await registry.register(iid, info.SerializeToString(), lease)
                await wait_for(lambda i=iid: all(i in r.cluster.infos for r, _ in rs), 3, f"{iid} seen")  # type: ignore[misc]
                await etcd_client.put(layout.instance_key(f"junk-{iid}"), b'{"json": "not protobuf"}')
            assert all(set(r.cluster.infos) == {"i-new", "i-newer"} for r, _ in rs)
            assert all(r.core.config == rs[0][0].core.config for r, _ in rs)  # defaults: the garbage is ignored
            # a well-formed config outside today's ranges (an older build's, a foreign writer's) is skipped as well
            huge = config_pb2.ClusterConfig(load_report_interval_ms=2_147_483_647)
            await etcd_client.put(layout.config_key, huge.SerializeToString())
            await asyncio.sleep(0.5)
            assert all(r.core.config.load_report_interval_ms == 50 for r, _ in rs)
            _, revision = await leader.set_config(
                config_pb2.ClusterConfig(load_report_interval_ms=70), ["load_report_interval_ms"], 0
            )
            await wait_for(
                lambda: all(
                    r.core.config.load_report_interval_ms == 70 and r.config_revision == revision for r, _ in rs
                ),
                3,
                "every replica has the new config",
            )
            assert restarts(caplog) == []
            bad = [r.getMessage() for r in caplog.records if "skipped: not an InstanceInfo" in r.getMessage()]
            assert len(bad) == 2 * 3, bad  # once per replica, key and revision
    finally:
        await lease.revoke(best_effort=True)


async def test_follower_replica_has_the_new_config_after_config_set(
    etcd1: EmbeddedEtcd, etcd_cluster_name: str
) -> None:
    """The follower's OWN policy core (what it uses the moment it leads) has the config the leader just stored."""
    async with replicas(etcd1, etcd_cluster_name, 2) as rs:
        leader, follower = await leader_and_follower(rs)
        stored, revision = await leader.set_config(
            config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(migrate_out_threshold=7.5, max_stages=5)),
            ["migration.migrate_out_threshold", "migration.max_stages"],
            0,
        )
        await wait_for(lambda: follower.config_revision == revision, 5, "the follower sees the revision")
        assert follower.core.config.migrate_out_threshold == 7.5 and follower.core.config.max_stages == 5
        assert config_to_pb(follower.core.config) == stored


async def test_etcd_stall_does_not_move_leadership(etcd_cluster_name: str) -> None:
    """etcd frozen for 2.5 s (SIGSTOP): the leader keeps its term and nobody else leads (the old 1 s lease flapped)."""
    with EmbeddedEtcd(1, tls=etcd_server_tls()) as etcd:
        async with replicas(etcd, etcd_cluster_name, 2) as rs:
            leader, follower = await leader_and_follower(rs)
            held = leader.leadership
            assert held is not None
            await asyncio.sleep(1.0)
            member = etcd.members[0].process
            assert member is not None
            os.kill(member.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(2.5)
            finally:
                os.kill(member.pid, signal.SIGCONT)
            await asyncio.sleep(2.0)
            assert leader.leadership is held and leader.is_leader, held.lost_reason
            assert not follower.is_leader
            assert follower.leader.term == held.revision


async def test_leader_process_stall_does_not_flap_and_a_dead_leader_is_replaced_within_3s(
    etcd1: EmbeddedEtcd, procs: Processes, etcd_cluster_name: str
) -> None:
    endpoints = ",".join(etcd_urls(etcd1))
    schedulers = [
        await asyncio.to_thread(
            procs.start,
            f"s{i}",
            "scheduler",
            "--etcd",
            endpoints,
            "--cluster",
            etcd_cluster_name,
            "--replica-id",
            f"s{i}",
        )
        for i in range(2)
    ]
    await asyncio.to_thread(start_llumlet, procs, etcd1, etcd_cluster_name, "l0")
    first = await leader_of([s.address for s in schedulers])
    old = next(s for s in schedulers if s.address == first.leader_address)
    standby = next(s for s in schedulers if s is not old)

    async def dispatch(address: str, rid: str) -> scheduler_pb2.DispatchResponse:
        async with dial(address) as ch:
            reply: scheduler_pb2.DispatchResponse = await scheduler_pb2_grpc.SchedulerServiceStub(ch).Dispatch(
                scheduler_pb2.DispatchRequest(request_id=rid, num_prompt_tokens=8, max_tokens=4), timeout=0.5
            )
            return reply

    deadline = time.monotonic() + 15
    while True:  # the llumlet reports to the leader
        try:
            await dispatch(old.address, "warm")
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "the leader never dispatched"
            await asyncio.sleep(0.1)

    # 1. the leader process frozen for 3 s (as under CPU starvation): leadership does not move
    os.kill(old.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(3.0)
    finally:
        os.kill(old.pid, signal.SIGCONT)
    await asyncio.sleep(1.5)
    after = await leader_of([standby.address])
    assert (after.leader_id, after.term) == (first.leader_id, first.term), "leadership moved after a 3 s stall"

    # 2. SIGKILL: the standby answers Dispatch within 3 s (it sees the port refuse and revokes the dead lease)
    old.kill()
    t0 = time.monotonic()
    while True:
        try:
            reply = await dispatch(standby.address, f"after-{time.monotonic()}")
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() - t0 < 10, "no new leader dispatched"
            await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    assert reply.instance_id == "l0"
    assert took <= 3.0, f"a new leader answered Dispatch only after {took:.2f}s"


async def test_vanished_instance_gets_a_grace_period_and_a_silent_one_is_failed_after_it(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str, etcd_client: EtcdClient
) -> None:
    assert sink.server is not None
    grace = 2.0
    layout = KeyLayout(etcd_cluster_name)
    registry = InstanceRegistry(etcd_client, layout)
    l0, l1 = [
        await asyncio.to_thread(start_llumlet, procs, etcd1, etcd_cluster_name, n, slow=True) for n in ("l0", "l1")
    ]
    lease = await Lease.grant(etcd_client, 10)
    try:
        async with replicas(etcd1, etcd_cluster_name, 1, timing=ReplicaTiming(instance_grace=grace)) as rs:
            leader = rs[0][0]
            await wait_for(lambda: leader.is_leader and {"l0", "l1"} <= set(leader.cluster.loads), 15, "reports")

            def lists(iid: str, rid: str) -> bool:
                load = leader.cluster.loads.get(iid)
                return load is not None and any(r.request_id == rid for r in load.requests)

            # 1. l1's key vanishes (its lease expired in an etcd blip) while its process lives on
            await add_request(l1.address, "kept", sink.server.address, 32, 400)
            await wait_for(lambda: lists("l1", "kept") and len(sink.tokens("kept")) >= 2, 10, "kept runs")
            value = await registry.get("l1")
            assert value is not None
            await etcd_client.delete(layout.instance_key("l1"))
            await wait_for(lambda: "l1" in leader.vanished, 3, "l1 vanished")
            for i in range(4):  # not dispatchable meanwhile
                assert leader.dispatch(f"x{i}", 1, 16, 8)[0] == "l0"
            await asyncio.sleep(grace / 2)
            await registry.register("l1", value, lease)  # back under a new lease, same id, same process
            await wait_for(lambda: "l1" not in leader.vanished and "l1" in leader.cluster.infos, 3, "l1 back")
            await asyncio.sleep(grace + 1)
            assert leader.requests_failed == 0
            assert "kept" not in sink.finished or not sink.finished["kept"].is_set(), "kept ended within the test"
            outs = await sink.wait("kept", timeout=60)
            assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, outs[-1].error
            assert sink.raw_indices("kept") == list(range(400)), "each token pushed once, in order"
            assert leader.requests_failed == 0

            # 2. a frozen instance (no answer) whose key vanished and never comes back: failed after the grace
            await add_request(l0.address, "stalled", sink.server.address, 32, 400)
            await wait_for(lambda: lists("l0", "stalled") and len(sink.tokens("stalled")) >= 2, 10, "stalled runs")
            os.kill(l0.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                await etcd_client.delete(layout.instance_key("l0"))
                outs = await sink.wait("stalled", timeout=grace + 10)
                took = time.monotonic() - t0
            finally:
                l0.kill()
            assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
            assert "instance l0 was lost" in outs[-1].error and "no answer" in outs[-1].error, outs[-1].error
            assert took >= grace - 0.2, f"failed after {took:.2f}s, before the {grace}s grace"
    finally:
        await lease.revoke(best_effort=True)


async def test_real_scale_cordon_uncordon_and_resign_through_llmctl(
    etcd1: EmbeddedEtcd, procs: Processes, etcd_cluster_name: str, etcd_client: EtcdClient, tmp_path: Path
) -> None:
    """The real AdminService (no fake): cordon/uncordon reach the llumlet, scale is bounded by the provider's cap with
    the shared message, the target is stored in etcd and outlives a `leader resign`, and the provider stops the
    llumlet it started when its replica exits (--stop-instances-on-exit)."""
    layout = KeyLayout(etcd_cluster_name)
    l0 = await asyncio.to_thread(start_llumlet, procs, etcd1, etcd_cluster_name, "l0")
    args = ["--profile", "tiny", "--transport", "tcp", "--lease-ttl", "2"]
    args += ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", etcd_cluster_name]
    providers = [
        LocalProcessProvider(args, tmp_path / f"p{i}", id_prefix=f"p{i}", max_instances=2, stop_on_close=True)
        for i in range(2)
    ]
    async with replicas(etcd1, etcd_cluster_name, 2, providers=providers) as rs:
        leader, follower = await leader_and_follower(rs)
        # The in-process replicas dial with this process's certificate, and a llumlet takes orders only from the
        # certificate the election names (attack 9 B3): from here on it is the leader's (the fixture restores its own).
        runtime.configure(procs.security("scheduler", leader.replica_id))
        address = next(s.address for r, s in rs if r is leader)
        await wait_for(lambda: "l0" in leader.cluster.loads, 15, "l0 reports")

        res = await llmctl(*llmctl_tls_args(), "-e", address, "cordon", "l0")
        assert res.exit_code == 0 and "cordoned l0 (state: cordoned)" in res.stdout, res.output
        assert (await get_load(l0.address)).state == common_pb2.INSTANCE_STATE_CORDONED
        res = await llmctl(*llmctl_tls_args(), "-e", address, "uncordon", "l0", "-o", "json")
        assert res.exit_code == 0, res.output
        assert (await get_load(l0.address)).state == common_pb2.INSTANCE_STATE_ACTIVE
        res = await llmctl(*llmctl_tls_args(), "-e", address, "cordon", "nope")
        assert res.exit_code == EXIT_ERROR and "unknown instance" in res.stderr

        res = await llmctl(*llmctl_tls_args(), "-e", address, "scale", "1000000")
        assert res.exit_code == EXIT_USAGE
        assert "target_instances: 1000000 is outside the range [1, 2]" in res.stderr and "provider cap 2" in res.stderr
        res = await llmctl(*llmctl_tls_args(), "-e", address, "scale", "2")
        assert res.exit_code == 0 and "target instances: 2" in res.stdout, res.output
        stored, _ = await ConfigStore(etcd_client, layout.scale_target_key, config_pb2.ScaleTarget).get()
        assert stored is not None and stored.target_instances == 2
        await wait_for(lambda: follower.scale_target == 2, 3, "the follower has the target")
        started = providers[rs.index(next(x for x in rs if x[0] is leader))]
        assert isinstance(started, LocalProcessProvider) and len(started.processes) == 1
        child = next(iter(started.processes.values()))
        await wait_for(lambda: len(leader.cluster.infos) == 2, 60, "the started llumlet registers")

        res = await llmctl(*llmctl_tls_args(), "-e", address, "leader", "resign")
        assert res.exit_code == 0 and f"{leader.replica_id} resigned" in res.stdout, res.output
        await wait_for(lambda: follower.is_leader, 5, "the standby leads")
        assert follower.scale_target == 2 and not leader.is_leader
        # the resigned replica stays out of the election during its hold-off: the standby's key is the only one
        candidates, _ = await follower.election._candidates()
        assert len(candidates) == 1
        # via the old leader: redirected to the new one
        res = await llmctl(*llmctl_tls_args(), "-e", address, "leader", "resign")
        assert res.exit_code == 0 and f"{follower.replica_id} resigned" in res.stdout, res.output
    assert child.returncode is not None, "the provider-started llumlet outlived its replica"
