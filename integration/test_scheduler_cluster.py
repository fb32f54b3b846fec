"""The replicated scheduler with real etcd, real scheduler and llumlet processes: dispatch by freeness, migration
of an overloaded instance's requests, leader failover without losing a request, and autoscaling."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import grpc
import pytest

from integration.cluster import add_request, client_tls, dial, etcd_urls, get_load, leader_of, list_instances, submit
from integration.procs import Component, Processes
from pyllumnix.clients import AsyncLlumnixClient, DeadlineExceededError, LlumnixError
from pyllumnix.clients.channel import TlsConfig
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
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
    endpoints = ",".join(etcd_urls(etcd))
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
    """Every token exactly once, in order, across every instance that produced the request's outputs."""
    assert sink.raw_indices(rid) == list(range(max_tokens)), f"{rid}: lost, duplicated or reordered tokens"
    assert len(sink.tokens(rid)) == max_tokens


async def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``check`` (plain or async) until it returns something truthy; fails with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def listed_at_leader(leader: str, instance_id: str, request_ids: Collection[str]) -> bool:
    """Whether the leader's latest load report of ``instance_id`` lists every one of ``request_ids``."""
    for inst in await list_instances(leader):
        if inst.info.instance_id == instance_id:
            return set(request_ids) <= {r.request_id for r in inst.load.requests}
    return False


async def no_pending_dispatches(leader: str) -> bool:
    """Every instance idle in the leader's view: nothing running and no dispatched-but-unreported request counted
    (that would make its freeness finite)."""
    return all(math.isinf(i.freeness) and i.freeness > 0 for i in await list_instances(leader))


async def dispatch_all(
    channel: grpc.aio.Channel, request_ids: list[str], prompt_len: int, max_tokens: int
) -> dict[str, scheduler_pb2.DispatchResponse]:
    """The leader's decisions for ``request_ids``, back to back on one open channel (no dial between them)."""
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    choices: dict[str, scheduler_pb2.DispatchResponse] = {}
    for rid in request_ids:
        request = scheduler_pb2.DispatchRequest(request_id=rid, num_prompt_tokens=prompt_len, max_tokens=max_tokens)
        choices[rid] = await stub.Dispatch(request, timeout=2)
    return choices


BUSY_TOKENS = 300  # prompt 200 + 300 fits the tiny profile's max_model_len of 512


async def test_dispatch_migration_and_leader_failover(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    assert sink.server is not None
    schedulers, llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 4)
    leader = await leader_of([s.address for s in schedulers])
    await wait_reporting(leader.leader_address, 4)

    # 1. dispatch by freeness. A burst of dispatches on an idle cluster spreads evenly: the leader counts each
    #    dispatched request on its instance until a report lists it, so reports in between do not erase it.
    async with dial(leader.leader_address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        burst: Counter[str] = Counter()
        # Back to back: these never reach a llumlet, so a quiet instance sent one stays quiet, and the leader takes
        # silence for longer than dispatch_stale_after (0.3 s) after a dispatch as a sign of trouble (a 30 ms pause
        # between the eight, on a loaded CI host, once left an instance out of the second round).
        for i in range(8):
            request = scheduler_pb2.DispatchRequest(request_id=f"burst{i}", num_prompt_tokens=64, max_tokens=8)
            burst[(await stub.Dispatch(request, timeout=2)).instance_id] += 1
    assert burst == {"l0": 2, "l1": 2, "l2": 2, "l3": 2}, burst
    # those never arrive at a llumlet: they stop counting after the pending TTL
    await wait_until(lambda: no_pending_dispatches(leader.leader_address), 10, "the pending dispatches to expire")
    # The decisions back to back on one channel, then the requests: a 150-token request lasts ~0.3 s on the tiny
    # profile, less than eight separate TLS dials + Dispatch + AddRequest on a loaded host (d0 then ended before d3
    # was placed, and its idle instance rightly took it again).
    async with dial(leader.leader_address, "frontend") as ch:
        d_on = await dispatch_all(ch, [f"d{i}" for i in range(8)], 64, 150)
    for rid, choice in d_on.items():
        await add_request(choice.grpc_address, rid, sink.server.address, 64, 150)
    placed = Counter(choice.instance_id for choice in d_on.values())
    assert set(placed) == {"l0", "l1", "l2", "l3"} and max(placed.values()) <= 3, placed
    for i in range(8):
        await sink.wait(f"d{i}")
        assert_complete(sink, f"d{i}", 150)
    # busy runs ~0.6 s on the tiny profile (300 steps of ~2 ms); the three decisions are taken back to back on one
    # channel so that it is still running when they are made (three separate TLS dials + AddRequests outlasted a
    # 150-token busy once in CI, and the then idle l3 rightly got a request)
    # The leader's view first shows every d-request gone (the sink saw them end; the leader learns it from the next
    # reports, and a d-request no report listed counts until its pending TTL): in CI, l0 and l1 still looked busier
    # than l3 with "busy", and l3 got a request (Counter({'l2': 2, 'l3': 1})).
    await wait_until(lambda: no_pending_dispatches(leader.leader_address), 10, "the leader to see the d-requests end")
    async with dial(leader.leader_address, "frontend") as ch:
        await add_request(llumlets[3].address, "busy", sink.server.address, 200, BUSY_TOKENS)
        await wait_until(lambda: listed_at_leader(leader.leader_address, "l3", ["busy"]), 5, "a report listing busy")
        choices = await dispatch_all(ch, [f"e{i}" for i in range(3)], 32, 64)
    assert not sink.event("busy").is_set(), "busy ended before the decisions were taken: the check below is void"
    for rid, choice in choices.items():
        await add_request(choice.grpc_address, rid, sink.server.address, 32, 64)
    e_on = {rid: choice.instance_id for rid, choice in choices.items()}
    placed = Counter(e_on.values())
    # The busy instance gets none and the three spread. Not necessarily one per idle instance: on a loaded host (a
    # CI run, the shared etcd on TLS since d0ab9eb) an idle instance's report can lag and the leader then leaves it
    # out for a moment (seen once in CI: l0 2, l2 1).
    assert "l3" not in placed and max(placed.values()) <= 2, placed

    # 2. an overloaded instance (requests added behind the scheduler's back) sheds requests by migration
    overloaded = llumlets[0]
    for i in range(8):
        await add_request(overloaded.address, f"o{i}", sink.server.address, 96, 300)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (await get_load(overloaded.address)).migration_stats.committed == 0:
        await asyncio.sleep(0.1)
    assert (await get_load(overloaded.address)).migration_stats.committed > 0, "no migration out of the overloaded one"

    # 3. kill the leader (SIGKILL to its process group) while a real frontend dispatches continuously: every request
    #    finishes token-exact or gets a clear error, none hangs; the standby leads well within the design's 3 s
    fe = start_frontend(procs, etcd1, etcd_cluster_name, schedulers)
    old = next(s for s in schedulers if s.address == leader.leader_address)
    standby = next(s for s in schedulers if s is not old)
    report = await failover_under_load(fe, old, standby, await client_tls(etcd_urls(etcd1), etcd_cluster_name))
    print(f"scheduler failover under load: {report}")
    await wait_reporting(standby.address, 4, timeout=10)
    for i in range(4):
        await submit(standby.address, f"after{i}", sink.server.address, 32, 16)

    # every request submitted around the scheduler finishes with every token exactly once
    for rid, n in [
        ("busy", BUSY_TOKENS),
        *((f"e{i}", 64) for i in range(3)),
        *((f"o{i}", 300) for i in range(8)),
        *((f"after{i}", 16) for i in range(4)),
    ]:
        await sink.wait(rid, timeout=60)
        assert_complete(sink, rid, n)
    # the migrated request is one the overloaded instance held: one of o0..o7, or the e-request placed on it (the
    # selection policy picks the shortest running request, which may be that one)
    held = [f"o{i}" for i in range(8)] + [rid for rid, iid in e_on.items() if iid == overloaded.name]
    moved = [rid for rid in held if {o.instance_id for o in sink.outputs[rid] if o.token_ids} - {overloaded.name}]
    assert moved, "no request of the overloaded instance finished elsewhere"

    # blocks all back: a migration the pairing loop began just as its request finished releases its reservation
    # through the abort path, so poll (within the destination's pending timeout) rather than read once
    async def all_free() -> bool:
        loads = [await get_load(comp.address) for comp in llumlets]
        return all(load.free_blocks == load.total_blocks and not load.migrating_in for load in loads)

    await wait_until(all_free, 15, "every block back on every instance")


def start_frontend(procs: Processes, etcd: EmbeddedEtcd, cluster: str, schedulers: list[Component]) -> Component:
    return procs.start(
        "fe",
        "frontend",
        *("--etcd", ",".join(etcd_urls(etcd)), "--cluster", cluster),
        *("--scheduler", ",".join(s.address for s in schedulers), "--http-port", "0"),
        *("--model", "tiny", "--max-model-len", "512"),
    )


async def test_a_frontend_the_leader_never_saw_is_told_about_a_lost_instance(
    etcd1: EmbeddedEtcd, procs: Processes, etcd_cluster_name: str, etcd_client: EtcdClient
) -> None:
    """A frontend's request runs on l0 when the leader and l0 die together: the standby leads, no load report of its
    term ever named the frontend (l0 never reported to it), yet the frontend is told (it registered in etcd under its
    lease), and the request ends with the lost-instance error within seconds. Before, the leader told only frontends
    it had seen in load reports: the request waited for the frontend's 30 s idle timeout and ended "timed out"."""
    schedulers, llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 1)
    leader = await leader_of([s.address for s in schedulers])
    await wait_reporting(leader.leader_address, 1)
    fe = start_frontend(procs, etcd1, etcd_cluster_name, schedulers)
    layout = KeyLayout(etcd_cluster_name)

    async def registered() -> list[bytes]:
        return [kv.value for kv in (await etcd_client.get_prefix(layout.frontends_prefix)).kvs]

    assert await wait_until(registered, 10, "the frontend's registration") == [fe.ready["sink_address"].encode()]
    old = next(s for s in schedulers if s.address == leader.leader_address)
    standby = next(s for s in schedulers if s is not old)
    tls = await client_tls(etcd_urls(etcd1), etcd_cluster_name)
    prompt = [(7 * i) % 200 + 1 for i in range(24)]
    async with AsyncLlumnixClient(frontend_endpoints=fe.address, timeout=10, tls=tls) as client:
        stream = client.generate(prompt, max_tokens=400, ignore_eos=True, timeout=60)
        first = await anext(stream)
        assert first.instance_id == "l0" and not first.finished
        old.kill()
        llumlets[0].kill()
        t0 = time.monotonic()

        async def drain() -> None:
            async for _ in stream:
                pass

        with pytest.raises(LlumnixError) as failed:
            await asyncio.wait_for(drain(), 20)
        took = time.monotonic() - t0
    assert "instance l0 was lost" in str(failed.value), failed.value
    assert (await leader_of([standby.address])).leader_id == standby.name
    print(f"lost-instance error at a frontend the new leader never saw in a report: {took:.1f} s after the kill")
    assert took < 12, f"the request ended {took:.1f} s after the kill"
    assert fe.terminate(30) == 0
    assert await registered() == [], "a frontend that stops revokes its lease: its key goes with it"


async def failover_under_load(fe: Component, old: Component, standby: Component, tls: TlsConfig | None) -> str:
    """Three clients loop on Generate through the frontend; the leader ``old`` is SIGKILLed mid-load. Returns the
    figures (takeover time from the kill, request outcomes, longest gap between completions); asserts the bounds."""
    prompts = [([(7 * i + 3 * k) % 200 + 1 for i in range(24)], 300 + k) for k in range(4)]
    results: list[tuple[float, str, str]] = []  # (end, outcome, detail)
    async with AsyncLlumnixClient(frontend_endpoints=fe.address, timeout=10, tls=tls) as client:
        expected = [
            (await client.generate_text(p, max_tokens=24, seed=seed, ignore_eos=True, timeout=30)).token_ids
            for p, seed in prompts
        ]
        stop = asyncio.Event()

        async def worker(k: int) -> None:
            i = k
            while not stop.is_set():
                (prompt, seed), want = prompts[i % len(prompts)], expected[i % len(prompts)]
                i += 1
                try:
                    got = await client.generate_text(prompt, max_tokens=24, seed=seed, ignore_eos=True, timeout=30)
                    outcome, detail = ("ok", "") if got.token_ids == want else ("mismatch", str(got.token_ids))
                except DeadlineExceededError as exc:
                    outcome, detail = "hang", str(exc)
                except LlumnixError as exc:
                    outcome, detail = ("error", f"{exc.code}: {exc}") if str(exc) else ("unclear", repr(exc))
                results.append((time.monotonic(), outcome, detail))

        tasks = [asyncio.create_task(worker(k)) for k in range(3)]
        await wait_until(lambda: ok_count(results, 0.0) >= 6, 30, "load to flow before the kill")
        t_kill = time.monotonic()
        old.kill()

        async def standby_leads() -> bool:
            return (await leader_of([standby.address])).leader_id == standby.name

        await wait_until(standby_leads, 10, "the standby to lead")
        took = time.monotonic() - t_kill
        await asyncio.sleep(2.0)  # a measurement window after the takeover, not a synchronisation
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=60)
        assert not pending, "a request hangs"
    counts = Counter(outcome for _, outcome, _ in results)
    ok_times = sorted(t for t, outcome, _ in results if outcome == "ok")
    gap = max((b - a for a, b in itertools.pairwise(ok_times)), default=0.0)
    report = f"takeover {took:.2f} s after the kill; {len(results)} requests {dict(counts)}; longest gap {gap:.2f} s"
    bad = [r for r in results if r[1] in ("mismatch", "hang", "unclear")]
    assert not bad, (report, bad)
    assert ok_count(results, t_kill) >= 6, f"requests stopped finishing after the kill: {report}"
    assert gap < 5.0, report
    assert took <= 3.0, report  # the design's bound (the polls, each a fresh TLS dial, are part of it)
    return report


def ok_count(results: list[tuple[float, str, str]], since: float) -> int:
    return sum(1 for t, outcome, _ in results if outcome == "ok" and t > since)


async def test_admin_bad_input(etcd1: EmbeddedEtcd, procs: Processes, etcd_cluster_name: str) -> None:
    schedulers, _llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 1)
    leader = await leader_of([s.address for s in schedulers])
    follower = next(s for s in schedulers if s.address != leader.leader_address)
    async with (
        dial(leader.leader_address) as ch,
        dial(follower.address) as fch,
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


# Autoscaling runs on the LLaMA-7B latency profile (30 ms decode steps: a 400-token request runs for seconds, long
# enough to be drained mid-stream) with a small KV cache (600 blocks of 16 tokens, just above one max-length request)
# so a dozen 1,000-token prompts overload it.
SCALING_LLUMLET_ARGS = ("--profile", "llama-7b-a10", "--total-blocks", "600", "--bytes-per-token", "2048")


def provider_started(log_dir: Path) -> dict[str, int]:
    """instance id -> pid of every llumlet a scheduler replica's local provider started (from the replicas' logs)."""
    started: dict[str, int] = {}
    for path in log_dir.glob("s[0-9].log"):
        for iid, pid in re.findall(r"started llumlet (\S+) \(pid (\d+)\)", path.read_text(errors="replace")):
            started[iid] = int(pid)
    return started


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def set_scaling(leader: str, scaling: config_pb2.ScalingConfig, *paths: str) -> None:
    request = admin_pb2.SetConfigRequest(config=config_pb2.ClusterConfig(scaling=scaling))
    request.update_mask.paths.extend(paths or ["scaling"])
    async with dial(leader) as ch:
        await admin_pb2_grpc.AdminServiceStub(ch).SetConfig(request, timeout=2)


async def test_autoscaling_adds_under_load_and_drains_running_requests(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    """Sustained load adds an instance; scale-down then drains an instance whose request is still running: the
    request migrates and finishes token-exact elsewhere, and the drained llumlet's process exits. Replicas run with
    --stop-instances-on-exit: when they stop, no provider-started llumlet is left (checked by pid)."""
    assert sink.server is not None
    llumlet_args = " ".join([*SCALING_LLUMLET_ARGS, "--transport", "tcp", "--lease-ttl", "1"])
    schedulers, _ = start_cluster(
        procs,
        etcd1,
        etcd_cluster_name,
        0,
        ("--provider", "local", "--llumlet-args", llumlet_args, "--stop-instances-on-exit"),
    )
    first = procs.start(
        "l0",
        "llumlet",
        *("--etcd", ",".join(etcd_urls(etcd1)), "--cluster", etcd_cluster_name, "--instance-id", "l0"),
        *SCALING_LLUMLET_ARGS,
        *("--transport", "tcp", "--lease-ttl", "1"),
    )
    try:
        leader = await leader_of([s.address for s in schedulers])
        await wait_reporting(leader.leader_address, 1)
        scaling = config_pb2.ScalingConfig(
            enable=True,
            scale_up_threshold=10,
            scale_down_threshold=100,
            min_instances=1,
            max_instances=2,
            scaling_interval_ms=300,
            warmup_ms=0,  # decide from the first pass: the test's load is there already
        )
        await set_scaling(leader.leader_address, scaling)

        # sustained load on the single instance: its average freeness drops below 10 -> one more instance
        rids: list[str] = []
        deadline = time.monotonic() + 90
        scaled_up = False
        i = 0
        while time.monotonic() < deadline and not scaled_up:
            if sum(1 for r in rids if r not in sink.finished or not sink.finished[r].is_set()) < 12:
                rid = f"load{i}"
                i += 1
                await submit(leader.leader_address, rid, sink.server.address, 1000, 120)
                rids.append(rid)
            scaled_up = len(await list_instances(leader.leader_address)) >= 2
            await asyncio.sleep(0.05)
        assert scaled_up, "no instance added under sustained load"
        # hold the scaler while the load drains, so the drain below meets the requests placed for it
        await set_scaling(leader.leader_address, config_pb2.ScalingConfig(enable=False), "scaling.enable")
        await wait_reporting(leader.leader_address, 2, timeout=30)
        for rid in rids:
            await sink.wait(rid, timeout=120)
            assert_complete(sink, rid, 120)

        # long requests: one on l0, two on the provider's instance; then scale-down resumes. The cluster is mostly
        # free, so the instance with the fewest requests (l0) is drained while its request runs: the request migrates
        # to the provider's instance, which stays (and must be stopped by its replica at the end)
        statuses = {s.info.instance_id: s for s in await list_instances(leader.leader_address)}
        (added,) = set(statuses) - {"l0"}
        keepers = {"keep-l0": "l0", "keep-a0": added, "keep-a1": added}
        for rid, iid in keepers.items():
            await add_request(statuses[iid].info.grpc_address, rid, sink.server.address, 32, 400)

        async def keepers_listed() -> bool:
            return all([await listed_at_leader(leader.leader_address, iid, [rid]) for rid, iid in keepers.items()])

        await wait_until(keepers_listed, 5, "reports listing the long requests")
        await set_scaling(leader.leader_address, scaling)

        async def one_left() -> list[str]:
            ids = [i.info.instance_id for i in await list_instances(leader.leader_address)]
            return ids if len(ids) == 1 else []

        assert await wait_until(one_left, 60, "an instance to be drained and to leave") == [added]
        for rid in keepers:
            await sink.wait(rid, timeout=60)
            assert_complete(sink, rid, 400)
        producers = [o.instance_id for o in sink.outputs["keep-l0"] if o.token_ids]
        assert producers[0] == "l0" and producers[-1] == added, f"keep-l0 did not migrate: {set(producers)}"
        assert all(o.instance_id == added for rid in ("keep-a0", "keep-a1") for o in sink.outputs[rid])
        # the drained llumlet's process exits by itself
        await wait_until(lambda: first.proc.poll() is not None, 30, "the drained llumlet l0 to exit")
        assert first.proc.returncode == 0
    finally:
        for comp in [*schedulers, first]:
            comp.terminate(30)
        started = provider_started(procs.log_dir)
        left = {iid: pid for iid, pid in started.items() if not pid_gone(pid)}
        for pid in left.values():  # provider llumlets run in their own sessions: their pid is their group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert started, "the provider started no llumlet"
    assert not left, f"provider-started llumlets outlived their scheduler replicas: {left}"


async def test_lost_instance_requests_are_reported_failed(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    assert sink.server is not None
    schedulers, llumlets = start_cluster(procs, etcd1, etcd_cluster_name, 2)
    leader = await leader_of([s.address for s in schedulers])
    await wait_reporting(leader.leader_address, 2)
    for i in range(3):
        await add_request(llumlets[1].address, f"doomed{i}", sink.server.address, 32, 400)
    doomed = [f"doomed{i}" for i in range(3)]
    await wait_until(lambda: listed_at_leader(leader.leader_address, "l1", doomed), 10, "a report listing them")
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
