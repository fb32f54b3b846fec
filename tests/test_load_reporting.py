"""#16 load reporting that costs the leader O(changed): full loads only when they change, keep-alives otherwise.

Before: every llumlet streamed its full load (request list included) every interval, and the leader rebuilt the
instance's view and folded it into the snapshot for each one, changed or not (~21 us of leader CPU per report: 1,024
instances at 20 Hz would need ~0.45 s of CPU per second). Now an unchanged llumlet sends a few-byte ``LoadKeepAlive``
every ``LOAD_KEEPALIVE_EVERY`` intervals, which the leader takes with a dict write, and the staleness rule still holds:
a quiet but alive instance stays dispatchable, a silent one does not, and a keep-alive the leader cannot match to the
snapshot it holds makes the llumlet send its full load again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.scheduler import cluster as cluster_module
from pyllumnix.control_plane.scheduler.cluster import (
    STALE_SCAN_INTERVAL_S,
    ClusterState,
    StaleKeepAliveError,
    dispatch_stale_after,
)
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.data_plane.llumlet.reporter import LOAD_KEEPALIVE_EVERY, LoadReporter, load_change_key
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

DEADLINE_S = 10.0


def load(instance_id: str, seq: int, free_blocks: int = 100, output_tokens: int = 0) -> common_pb2.InstanceLoad:
    pb = common_pb2.InstanceLoad(
        instance_id=instance_id,
        seq=seq,
        total_blocks=100,
        free_blocks=free_blocks,
        block_size=16,
        num_running=1,
        state=common_pb2.INSTANCE_STATE_ACTIVE,
        timestamp=float(seq),
    )
    pb.requests.add(request_id=f"{instance_id}-r0", num_blocks=100 - free_blocks, num_output_tokens=output_tokens)
    return pb


class FakeLlumlet:
    """``load_pb`` as the llumlet's: a new seq and timestamp each call; ``free_blocks``/``tokens`` are the load."""

    def __init__(self, instance_id: str = "i-1") -> None:
        self.instance_id = instance_id
        self.seq = 0
        self.free_blocks = 100
        self.tokens = 0

    def load_pb(self) -> common_pb2.InstanceLoad:
        self.seq += 1
        return load(self.instance_id, self.seq, self.free_blocks, self.tokens)

    def load_version(self) -> None:
        return None  # cannot tell: the reporter builds and compares every snapshot


def reporter(llumlet: FakeLlumlet, interval_s: float = 0.0) -> LoadReporter:
    return LoadReporter(cast(Any, llumlet), cast(Any, object()), KeyLayout("c1"), interval_s)


def kind(message: scheduler_pb2.ReportLoadRequest) -> str:
    return str(message.WhichOneof("report"))


def cluster_of(*ids: str, **kwargs: float) -> ClusterState:
    cluster = ClusterState(**kwargs)
    for iid in ids:
        cluster.upsert(common_pb2.InstanceInfo(instance_id=iid, grpc_address="127.0.0.1:1"))
    return cluster


def accepting(cluster: ClusterState, now: float) -> set[str]:
    return {v.instance_id for v in cluster.snapshot(now) if v.accepts_requests}


# ----------------------------------------------------------------------------------------------------------- reporter
async def test_an_unchanged_llumlet_sends_keepalives_not_full_loads() -> None:
    llumlet = FakeLlumlet()
    stream = reporter(llumlet)._reports()
    messages = [await anext(stream) for _ in range(3)]
    # Before: a full load (request list and all) every interval.
    assert [kind(m) for m in messages] == ["load", "keep_alive", "keep_alive"]
    assert messages[1].keep_alive.instance_id == "i-1"
    assert messages[1].keep_alive.seq == messages[0].load.seq, "a keep-alive confirms the snapshot last sent"
    # One message per LOAD_KEEPALIVE_EVERY intervals: the load was read that many times per keep-alive.
    assert llumlet.seq == 1 + 2 * LOAD_KEEPALIVE_EVERY
    llumlet.tokens += 5  # progress within a KV block: nothing the leader decides on
    assert kind(await anext(stream)) == "keep_alive"
    llumlet.free_blocks -= 1  # a change the policy reads: sent at the next interval
    changed = await anext(stream)
    assert kind(changed) == "load" and changed.load.free_blocks == 99
    assert llumlet.seq == 2 + 3 * LOAD_KEEPALIVE_EVERY
    follow = await anext(stream)
    assert kind(follow) == "keep_alive" and follow.keep_alive.seq == changed.load.seq
    await stream.aclose()


def test_the_change_key_ignores_seq_timestamp_and_token_counters_only() -> None:
    base = load("i-1", 1)
    assert load_change_key(base) == load_change_key(load("i-1", 7, output_tokens=3))
    assert load_change_key(base) != load_change_key(load("i-1", 1, free_blocks=99))
    moved = load("i-1", 1)
    moved.requests[0].frontend_address = "10.0.0.2:1"  # where a lost request is reported: the leader needs it
    assert load_change_key(base) != load_change_key(moved)


def test_the_keepalive_period_is_inside_the_dispatch_staleness_bound() -> None:
    """A quiet instance gets two more keep-alives in before it would look stale, whatever the report interval."""
    for interval_ms in (1, 10, 20, 50, 100, 250, 1000, 5000):
        interval = interval_ms / 1000
        assert 2 * LOAD_KEEPALIVE_EVERY * interval <= dispatch_stale_after(interval) + 1e-12, interval_ms


# ------------------------------------------------------------------------------------------------------------ leader
def test_a_keepalive_refreshes_the_instance_without_rebuilding_anything() -> None:
    cluster = cluster_of("a", "b")
    cluster.report(load("a", 1), 0.0)
    cluster.report(load("b", 1), 0.0)
    before = cluster.snapshot(0.0)
    assert cluster.keepalive("a", 1, 0.05)
    # No view rebuilt, nothing folded: the next snapshot is the very same object (O(1) per keep-alive).
    assert cluster.snapshot(0.05) is before
    assert cluster.report_times["a"] == 0.05
    assert not cluster.keepalive("ghost", 1, 0.05), "an unregistered instance is not taken"


def test_a_quiet_instance_that_keeps_alive_stays_dispatchable_and_a_silent_one_does_not() -> None:
    interval = 0.05
    stale = dispatch_stale_after(interval)
    cluster = cluster_of("quiet", "busy", "silent", stale_after=1.0, dispatch_stale_after=stale)
    for iid in ("quiet", "busy", "silent"):
        cluster.report(load(iid, 1), 0.0)
    t, seq, tick = 0.0, 1, 0
    while t < 2.0:  # busy changes every interval, quiet only keeps alive, silent says nothing
        tick += 1
        t, seq = round(tick * interval, 3), seq + 1
        cluster.report(load("busy", seq, free_blocks=100 - seq % 50), t)
        if tick % LOAD_KEEPALIVE_EVERY == 0:
            assert cluster.keepalive("quiet", 1, t)
        if tick % 2 == 0:  # the stale scan runs at most every STALE_SCAN_INTERVAL_S
            assert "quiet" in accepting(cluster, t + 1e-3), f"quiet instance stale at {t}"
    assert STALE_SCAN_INTERVAL_S <= 0.1
    assert accepting(cluster, t + 0.11) == {"quiet", "busy"}


def test_a_keepalive_brings_back_an_instance_marked_silent() -> None:
    cluster = cluster_of("a", "b", stale_after=1.0, dispatch_stale_after=0.3)
    cluster.report(load("a", 1), 0.0)
    cluster.report(load("b", 1), 0.0)
    cluster.report(load("b", 2, free_blocks=90), 0.5)
    assert accepting(cluster, 0.5) == {"b"}
    assert cluster.keepalive("a", 1, 0.6)
    assert accepting(cluster, 0.6) == {"a", "b"}


def test_a_keepalive_for_a_snapshot_the_leader_does_not_hold_asks_for_the_full_load() -> None:
    cluster = cluster_of("a")
    with pytest.raises(StaleKeepAliveError, match="the leader holds none"):
        cluster.keepalive("a", 3, 0.0)
    cluster.report(load("a", 4), 0.0)
    with pytest.raises(StaleKeepAliveError, match="confirms load seq 3, the leader holds 4"):
        cluster.keepalive("a", 3, 0.1)


def test_dispatched_requests_still_expire_on_keepalives() -> None:
    """A request dispatched but never arriving counts for ``pending_ttl`` only, even if only keep-alives follow."""
    cluster = cluster_of("a", pending_ttl=0.5)
    cluster.report(load("a", 1), 0.0)
    cluster.snapshot(0.0)
    cluster.record_dispatch("a", "lost", 10, common_pb2.PRIORITY_NORMAL, 0.0)
    assert cluster.snapshot(0.01).get("a").dispatched_since_report == 1  # type: ignore[union-attr]
    assert cluster.keepalive("a", 1, 0.2)
    assert cluster.snapshot(0.2).get("a").dispatched_since_report == 1  # type: ignore[union-attr]
    assert cluster.keepalive("a", 1, 0.6)
    assert cluster.snapshot(0.6).get("a").dispatched_since_report == 0  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------- over gRPC, end to end
def leader() -> SchedulerReplica:
    """A leader's report path without etcd (the replica's other parts are never started here)."""
    r = SchedulerReplica(cast(Any, object()), KeyLayout("c1"), "s0", "127.0.0.1:1")
    r.require_leader = lambda: None  # type: ignore[method-assign]
    r.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:1"))
    return r


@pytest.fixture
async def served() -> AsyncIterator[tuple[SchedulerReplica, SchedulerServicer, str]]:
    replica = leader()
    servicer = SchedulerServicer(replica)
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield replica, servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def wait_for(condition: Any, what: str) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


async def test_the_leader_takes_keepalives_and_gets_the_full_load_back_when_it_lost_it(
    served: tuple[SchedulerReplica, SchedulerServicer, str],
) -> None:
    replica, servicer, address = served
    llumlet = FakeLlumlet()
    rep = reporter(llumlet, interval_s=0.01)
    task = asyncio.get_running_loop().create_task(rep._stream_to(address))
    try:
        await wait_for(lambda: servicer.keepalives_received >= 3, "keep-alives reach the leader")
        first = replica.cluster.loads["i-1"]
        assert first.seq == 1 and rep.streams_ended == 0, "one full load, then keep-alives on the same stream"
        # The leader forgets the load (the instance left the registry in a blip and came back): the next keep-alive
        # cannot be matched, the stream ends, and the llumlet's next stream starts with its full load.
        replica.cluster.remove("i-1")
        replica.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:1"))
        await wait_for(lambda: "i-1" in replica.cluster.loads, "the full load is sent again")
        assert rep.streams_ended >= 1
        assert replica.cluster.loads["i-1"].seq > first.seq
        llumlet.free_blocks = 42
        await wait_for(lambda: replica.cluster.loads["i-1"].free_blocks == 42, "a change is reported")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------------------------- the dispatch bench's model
class RecordingServicer:
    def __init__(self) -> None:
        self.taken: list[tuple[str, bool, int]] = []

    def take(self, report: scheduler_pb2.ReportLoadRequest, instance_id: str, keep_alive: bool) -> bool:
        seq = report.keep_alive.seq if keep_alive else report.load.seq
        self.taken.append((instance_id, keep_alive, seq))
        return True


async def bench_messages(change: float, hz: float = 50.0, seconds: float = 0.5) -> RecordingServicer:
    from pyllumnix.tools.bench_dispatch import _ChildStats, _report_loop

    templates = [[load(f"i-{i}", 0, free_blocks=100 - k) for k in range(4)] for i in range(4)]
    servicer = RecordingServicer()
    stats = _ChildStats()
    task = asyncio.get_running_loop().create_task(_report_loop(cast(Any, servicer), templates, hz, change, 0, stats))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert stats.reports == stats.fulls + stats.keepalives == len(servicer.taken)
    return servicer


async def test_the_bench_sends_what_reporters_would() -> None:
    """The dispatch bench's report model: all full loads when every tick changed; else one full load per instance and
    a keep-alive every LOAD_KEEPALIVE_EVERY ticks, each confirming that instance's latest full load."""
    busy = await bench_messages(change=1.0)
    assert busy.taken and not any(alive for _, alive, _ in busy.taken)
    quiet = await bench_messages(change=0.0)
    fulls = [(iid, seq) for iid, alive, seq in quiet.taken if not alive]
    alives = [(iid, seq) for iid, alive, seq in quiet.taken if alive]
    assert sorted(iid for iid, _ in fulls) == ["i-0", "i-1", "i-2", "i-3"]
    assert alives and all(seq == dict(fulls)[iid] for iid, seq in alives)
    ticks = len(fulls) + len(alives) * LOAD_KEEPALIVE_EVERY
    assert len(alives) * LOAD_KEEPALIVE_EVERY <= ticks <= len(fulls) + (len(alives) + 4) * LOAD_KEEPALIVE_EVERY


def test_the_bench_report_block_extrapolates_from_its_own_rows() -> None:
    from pyllumnix.tools.bench_dispatch import _load_reports_block

    row = {
        "reports_per_s": 1000.0,
        "full_loads_per_s": 500.0,
        "keepalives_per_s": 500.0,
        "full_us_mean": 10.0,
        "keepalive_us_mean": 2.0,
        "report_cpu_share": 0.008,
        "take_cpu_share": 0.006,
        "fold_cpu_share": 0.002,  # 4 us per full load
        "report_ticks_skipped": 0,
        "report_stream_restarts": 0,
    }
    block = _load_reports_block([row, dict(row, report_cpu_share=0.6)], [row], 1024, 20.0, 0.5)
    assert block["fold_us_per_full_load"] == pytest.approx(4.0)
    assert block["cpu_share_if_all_changed"] == pytest.approx((10e-6 + 4e-6) * 20 * 1024, abs=1e-4)
    assert block["cpu_share_if_none_changed"] == pytest.approx(2e-6 * 20 / LOAD_KEEPALIVE_EVERY * 1024, abs=1e-4)
    assert block["cpu_share_of_one_core"] == pytest.approx(0.304) and block["meets"] is True


async def test_reports_are_folded_in_batches_off_the_dispatch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: every snapshot() (each Dispatch) built and folded the views of all reports taken since the last one.
    Now a timer folds them in one batch, coalescing reports of one instance, and a Dispatch in between folds none."""
    monkeypatch.setattr(cluster_module, "REPORT_FOLD_INTERVAL_S", 0.5)  # wide margins on a loaded machine
    cluster = cluster_of("a", "b")
    now = time.monotonic()
    cluster.report(load("a", 1), now)
    cluster.report(load("b", 1), now)
    await wait_for(lambda: cluster.folds == 1, "the first batch folded by the timer")
    first = cluster.snapshot(time.monotonic())
    assert set(first.ids) == {"a", "b"}
    cluster.report(load("a", 2, free_blocks=50), time.monotonic())
    cluster.report(load("a", 3, free_blocks=40), time.monotonic())
    assert cluster.snapshot(time.monotonic()) is first, "a decision right after the reports folds none of them"
    await wait_for(lambda: cluster.folds == 2, "the second batch")
    view = cluster.snapshot(time.monotonic()).get("a")
    assert view is not None and (view.seq, view.free_blocks) == (3, 40), "one view, of the latest load"
    assert cluster.fold_s > 0


def test_without_an_event_loop_the_next_snapshot_folds() -> None:
    cluster = cluster_of("a")
    cluster.report(load("a", 1, free_blocks=7), 0.0)
    view = cluster.snapshot(0.0).get("a")
    assert view is not None and view.free_blocks == 7


def test_a_load_that_arrives_before_the_registration_counts_from_the_registration_on() -> None:
    """A llumlet sends its full load once and then keep-alives; if that load reached the leader before the leader saw
    the registration, it must not be lost (before: the instance stayed out of the snapshot, neither starting nor
    active, until its stream was restarted, and the scaler started more instances meanwhile)."""
    cluster = ClusterState()
    assert not cluster.report(load("a", 1, free_blocks=60), 0.0)
    assert not cluster.keepalive("a", 1, 0.1)  # confirms the early load: still kept, now fresher
    cluster.upsert(common_pb2.InstanceInfo(instance_id="a", grpc_address="127.0.0.1:1"))
    view = cluster.snapshot(0.1).get("a")
    assert view is not None and view.free_blocks == 60 and view.accepts_requests
    assert cluster.report_times["a"] == 0.1
    assert cluster.keepalive("a", 1, 0.2)
    # A registry resync learns instances too.
    cluster.report(load("b", 5), 0.2)
    cluster.set_registry({iid: common_pb2.InstanceInfo(instance_id=iid) for iid in ("a", "b")})
    assert "b" in cluster.snapshot(0.2)


def test_a_full_load_dropped_by_the_floor_is_applied_when_a_keepalive_confirms_it() -> None:
    """Two messages of one llumlet closer than the floor (a hiccup delivers them back to back): the second, a full
    load, is dropped; before, the keep-alives confirming it then ended the stream (the leader held an older load)."""
    replica = leader()
    servicer = SchedulerServicer(replica, min_report_interval=3600.0)  # every message after the first is throttled
    first = scheduler_pb2.ReportLoadRequest(load=load("i-1", 1))
    changed = scheduler_pb2.ReportLoadRequest(load=load("i-1", 2, free_blocks=42))
    assert servicer.take(first, "i-1", False)
    assert not servicer.take(changed, "i-1", False) and servicer.reports_throttled == 1
    servicer.min_report_interval = 0.0  # the floor has passed when the keep-alive comes
    alive = scheduler_pb2.ReportLoadRequest(keep_alive=scheduler_pb2.LoadKeepAlive(instance_id="i-1", seq=2))
    assert servicer.take(alive, "i-1", True)
    assert replica.cluster.loads["i-1"].free_blocks == 42
    assert servicer.take(alive, "i-1", True), "later keep-alives confirm the load now held"
