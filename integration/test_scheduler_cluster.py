"""The replicated scheduler with real etcd, real scheduler and llumlet processes: dispatch by freeness, migration
of an overloaded instance's requests, leader failover without losing a request, and autoscaling."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest

from integration.cluster import add_request, get_load, leader_of, list_instances, submit
from integration.procs import Component, Processes
from pyllumnix.control_plane.etcd.embedded import EmbeddedEtcd
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    config_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from pyllumnix.tools.recording_sink import RecordingSink

pytestmark = pytest.mark.integration


def start_cluster(
    procs: Processes, etcd: EmbeddedEtcd, cluster: str, n_llumlets: int, scheduler_args: tuple[str, ...] = ()
) -> tuple[list[Component], list[Component]]:
    endpoints = ",".join(etcd.endpoints)
    schedulers = [
        procs.start(
            f"s{i}", "scheduler", "--etcd", endpoints, "--cluster", cluster, "--replica-id", f"s{i}", *scheduler_args
        )
        for i in range(2)
    ]
    llumlets = [
        procs.start(
            f"l{i}",
            "llumlet",
            "--etcd",
            endpoints,
            "--cluster",
            cluster,
            "--instance-id",
            f"l{i}",
            "--profile",
            "tiny",
            "--transport",
            "tcp",
            "--lease-ttl",
            "1",
        )
        for i in range(n_llumlets)
    ]
    return schedulers, llumlets


async def wait_reporting(leader: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instances = await list_instances(leader)
        if sum(1 for i in instances if i.load.seq > 0) >= n:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"fewer than {n} instances report to {leader}")


def assert_complete(sink: RecordingSink, rid: str, max_tokens: int) -> None:
    indices = sink.raw_indices(rid)
    assert sorted(set(indices)) == list(range(max_tokens)), f"{rid}: lost tokens"
    assert len(sink.tokens(rid)) == max_tokens


async def test_dispatch_migration_and_leader_failover(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    assert sink.server is not None
    schedulers, llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 4)
    leader = await leader_of([s.address for s in schedulers])
    await wait_reporting(leader.leader_address, 4)

    # 1. dispatch by freeness. A burst of dispatches on an idle cluster spreads evenly: the leader counts each
    #    dispatched request on its instance until a report lists it, so reports in between do not erase it.
    async with grpc.aio.insecure_channel(leader.leader_address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        burst: Counter[str] = Counter()
        for i in range(8):
            request = scheduler_pb2.DispatchRequest(request_id=f"burst{i}", num_prompt_tokens=64, max_tokens=8)
            burst[(await stub.Dispatch(request, timeout=2)).instance_id] += 1
            await asyncio.sleep(0.03)  # reports arrive meanwhile
    assert burst == {"l0": 2, "l1": 2, "l2": 2, "l3": 2}, burst
    await asyncio.sleep(2.2)  # those never arrive: they stop counting after the pending TTL
    placed: Counter[str] = Counter()
    for i in range(8):
        placed[await submit(leader.leader_address, f"d{i}", sink.server.address, 64, 150)] += 1
    assert set(placed) == {"l0", "l1", "l2", "l3"} and max(placed.values()) <= 3, placed
    for i in range(8):
        await sink.wait(f"d{i}")
        assert_complete(sink, f"d{i}", 150)
    await add_request(llumlets[3].address, "busy", sink.server.address, 200, 150)
    await asyncio.sleep(0.3)
    placed = Counter()
    for i in range(3):
        placed[await submit(leader.leader_address, f"e{i}", sink.server.address, 32, 64)] += 1
    assert placed == {"l0": 1, "l1": 1, "l2": 1}, placed

    # 2. an overloaded instance (requests added behind the scheduler's back) sheds requests by migration
    overloaded = llumlets[0]
    for i in range(8):
        await add_request(overloaded.address, f"o{i}", sink.server.address, 96, 300)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (await get_load(overloaded.address)).total_migrations_out == 0:
        await asyncio.sleep(0.1)
    assert (await get_load(overloaded.address)).total_migrations_out > 0, "no migration out of the overloaded one"

    # 3. kill the leader mid-stream: the standby leads within 2 s, llumlets re-target, dispatch resumes
    in_flight = [f"f{i}" for i in range(4)]
    for rid in in_flight:
        await submit(leader.leader_address, rid, sink.server.address, 32, 200)
    old = next(s for s in schedulers if s.address == leader.leader_address)
    standby = next(s for s in schedulers if s is not old)
    old.kill()
    t0 = time.monotonic()
    while True:
        new = await leader_of([standby.address])
        if new.leader_id == standby.name:
            break
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    assert took < 2.0, f"failover took {took:.2f} s"
    await wait_reporting(standby.address, 4, timeout=5)
    for i in range(4):
        await submit(standby.address, f"after{i}", sink.server.address, 32, 16)

    # no request lost: everything submitted finishes with every token exactly once in the kept stream
    for rid, n in [
        ("busy", 150),
        *((f"e{i}", 64) for i in range(3)),
        *((f"o{i}", 300) for i in range(8)),
        *((r, 200) for r in in_flight),
        *((f"after{i}", 16) for i in range(4)),
    ]:
        await sink.wait(rid, timeout=60)
        assert_complete(sink, rid, n)
    moved = {o.instance_id for i in range(8) for o in sink.outputs[f"o{i}"]}
    assert len(moved) > 1, "requests of the overloaded instance finished elsewhere too"
    # blocks all back
    for comp in llumlets:
        load = await get_load(comp.address)
        assert load.free_blocks == load.total_blocks


async def test_admin_bad_input(etcd1: EmbeddedEtcd, procs: Processes, etcd_cluster_name: str) -> None:
    schedulers, _llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 1)
    leader = await leader_of([s.address for s in schedulers])
    follower = next(s for s in schedulers if s.address != leader.leader_address)
    async with (
        grpc.aio.insecure_channel(leader.leader_address) as ch,
        grpc.aio.insecure_channel(follower.address) as fch,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="nope"), timeout=2)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.MigrateRequest(admin_pb2.MigrateRequestRequest(request_id="nope", destination_instance_id="l0"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        before = await admin.GetConfig(admin_pb2.GetConfigRequest(), timeout=2)
        bad = admin_pb2.SetConfigRequest(
            config=config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(migrate_out_threshold=-1.0))
        )
        bad.update_mask.paths.append("migration.migrate_out_threshold")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.SetConfig(bad, timeout=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unknown_path = admin_pb2.SetConfigRequest()
        unknown_path.update_mask.paths.append("migration.no_such_knob")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.SetConfig(unknown_path, timeout=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = await admin.GetConfig(admin_pb2.GetConfigRequest(), timeout=2)
        assert after.config == before.config and after.revision == before.revision

        # a write sent to a follower is refused with the leader's address, never applied there
        good = admin_pb2.SetConfigRequest(
            config=config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(migrate_out_threshold=5.0))
        )
        good.update_mask.paths.append("migration.migrate_out_threshold")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminServiceStub(fch).SetConfig(good, timeout=2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dict(err.value.trailing_metadata() or ())["llumnix-leader"] == leader.leader_address
        applied = await admin.SetConfig(good, timeout=2)
        assert applied.config.migration.migrate_out_threshold == 5.0
        # every replica watches the config: the follower's view follows
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = (await admin.GetConfig(admin_pb2.GetConfigRequest(), timeout=2)).revision
            if seen == applied.revision:
                break
            await asyncio.sleep(0.05)
        assert seen == applied.revision


async def test_autoscaling_adds_under_load_and_drains_when_idle(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str, tmp_path: object
) -> None:
    import subprocess

    assert sink.server is not None
    llumlet_args = "--profile tiny --transport tcp --lease-ttl 1"
    schedulers, _llumlets = start_cluster(
        procs, etcd1, etcd_cluster_name, 1, ("--provider", "local", "--llumlet-args", llumlet_args)
    )
    try:
        leader = await leader_of([s.address for s in schedulers])
        await wait_reporting(leader.leader_address, 1)
        scaling = config_pb2.ScalingConfig(
            enable=True,
            scale_up_threshold=10,
            scale_down_threshold=60,
            min_instances=1,
            max_instances=2,
            scaling_interval_ms=300,
        )
        request = admin_pb2.SetConfigRequest(config=config_pb2.ClusterConfig(scaling=scaling))
        request.update_mask.paths.append("scaling")
        async with grpc.aio.insecure_channel(leader.leader_address) as ch:
            await admin_pb2_grpc.AdminServiceStub(ch).SetConfig(request, timeout=2)

        # sustained load on the single instance: its average freeness drops below 10 -> one more instance
        rids: list[str] = []
        deadline = time.monotonic() + 30
        scaled_up = False
        i = 0
        while time.monotonic() < deadline and not scaled_up:
            if sum(1 for r in rids if r not in sink.finished or not sink.finished[r].is_set()) < 12:
                rid = f"load{i}"
                i += 1
                await submit(leader.leader_address, rid, sink.server.address, 64, 120)
                rids.append(rid)
            scaled_up = len(await list_instances(leader.leader_address)) >= 2
            await asyncio.sleep(0.05)
        assert scaled_up, "no instance added under sustained load"

        # idle: the average freeness is high -> one instance is drained (its requests migrate) and stops
        for rid in rids:
            await sink.wait(rid, timeout=60)
            assert_complete(sink, rid, 120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(await list_instances(leader.leader_address)) > 1:
            await asyncio.sleep(0.1)
        assert len(await list_instances(leader.leader_address)) == 1, "no instance drained and stopped when idle"
    finally:
        # provider-started llumlets run in their own sessions: stop any left
        subprocess.run(["pkill", "-TERM", "-f", f"--cluster {etcd_cluster_name}"], check=False)


async def test_lost_instance_requests_are_reported_failed(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    assert sink.server is not None
    schedulers, llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 2)
    leader = await leader_of([s.address for s in schedulers])
    await wait_reporting(leader.leader_address, 2)
    for i in range(3):
        await add_request(llumlets[1].address, f"doomed{i}", sink.server.address, 32, 400)
    while len(sink.tokens("doomed2")) < 2:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # a load report lists them at the leader
    llumlets[1].kill()
    for i in range(3):
        outs = await sink.wait(f"doomed{i}", timeout=10)
        last = outs[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "l1" in last.error and "lost" in last.error
        assert len(sink.tokens(f"doomed{i}")) < 400
    # the survivor keeps serving
    await submit(leader.leader_address, "alive", sink.server.address, 16, 8)
    await sink.wait("alive")
    assert {o.instance_id for o in sink.outputs["alive"]} == {"l0"}
