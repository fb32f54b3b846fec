"""#16 load reporting that costs the leader O(changed): full loads only when they change, keep-alives otherwise.

Before: every llumlet streamed its full load (request list included) every interval, and the leader rebuilt the
instance's view and folded it into the snapshot for each one, changed or not (~21 us of leader CPU per report: 1,024
instances at 20 Hz would need ~0.45 s of CPU per second). Now an unchanged llumlet sends a few-byte ``LoadKeepAlive``
every ``LOAD_KEEPALIVE_EVERY`` intervals, which the leader takes with a dict write, and the staleness rule still holds:
a quiet but alive instance stays dispatchable, a silent one does not, and a keep-alive the leader cannot match to the
snapshot it holds makes the llumlet send its full load again.

#20: a decoding instance's load changes at most ticks only because running requests take KV blocks; such a change
now rides in place of the next keep-alive (at most every ``GROWTH_REPORT_EVERY`` intervals), any other at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.freeness import migration_freeness
from pyllumnix.control_plane.scheduler import cluster as cluster_module
from pyllumnix.control_plane.scheduler.cluster import (
    STALE_SCAN_INTERVAL_S,
    ClusterState,
    StaleKeepAliveError,
    dispatch_stale_after,
    quiet_stale_after,
)
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.data_plane.engine.base import EngineError, Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import Llumlet, LoadVersion
from pyllumnix.data_plane.llumlet.reporter import (
    BUSY_MESSAGE_GRACE,
    BUSY_TICK_GRACE,
    GROWTH_REPORT_EVERY,
    LOAD_KEEPALIVE_EVERY,
    QUIET_TICK_EVERY,
    LoadKey,
    LoadReporter,
    ReportAction,
    load_change_key,
    load_key,
    report_action,
)
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.framed import listen
from pyllumnix.infra.load_cadence import QUIET_KEEPALIVE_EVERY, load_is_quiet
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

        self.quiet = False  # nothing on it (no request): what an idle llumlet reports

    def load_pb(self) -> common_pb2.InstanceLoad:
        self.seq += 1
        if self.quiet:
            return quiet(self.instance_id, self.seq)
        return load(self.instance_id, self.seq, self.free_blocks, self.tokens)

    def load_version(self) -> None:
        return None  # cannot tell: the reporter builds and compares every snapshot


def quiet(instance_id: str, seq: int) -> common_pb2.InstanceLoad:
    """An idle instance's load: no request, no migration (``load_is_quiet``)."""
    pb = common_pb2.InstanceLoad(
        instance_id=instance_id, seq=seq, total_blocks=100, free_blocks=100, block_size=16, timestamp=float(seq)
    )
    pb.state = common_pb2.INSTANCE_STATE_ACTIVE
    assert load_is_quiet(pb)
    return pb


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


# ------------------------------------------------------------------------------------- #20: quiet instances
async def test_a_quiet_llumlet_keeps_alive_once_per_quiet_period_and_sends_a_new_request_at_once() -> None:
    """An idle llumlet sent a keep-alive every 3 intervals (6.7 a second, about half its idle CPU); now every
    QUIET_KEEPALIVE_EVERY. Work arriving is still sent at the next tick, and the busy period is back at once."""
    llumlet = FakeLlumlet()
    llumlet.quiet = True
    rep = reporter(llumlet)
    stream = rep._reports()
    assert kind(await anext(stream)) == "load"
    alive = await anext(stream)
    assert kind(alive) == "keep_alive" and alive.keep_alive.seq == 1
    assert rep.intervals == 1 + QUIET_KEEPALIVE_EVERY  # before: 1 + LOAD_KEEPALIVE_EVERY
    llumlet.quiet = False  # a request arrived
    busy = await anext(stream)
    assert kind(busy) == "load" and rep.intervals == 1 + QUIET_KEEPALIVE_EVERY + QUIET_TICK_EVERY, "the next tick"
    assert kind(await anext(stream)) == "keep_alive"
    assert rep.intervals == 1 + QUIET_KEEPALIVE_EVERY + QUIET_TICK_EVERY + LOAD_KEEPALIVE_EVERY, "the busy period"
    await stream.aclose()


async def test_an_idle_sim_llumlet_sends_one_message_per_quiet_period_and_reads_its_load_only_then() -> None:
    """A real (idle) sim llumlet over 100 report intervals: 1 full load and 5 keep-alives (before: 1 and 33), its
    load read only when a message is due, 6 times (before: 101, one wake-up each): it sleeps on ``load_changed``."""
    llumlet = Llumlet(SimEngine("tiny", payload=False), "i-1")
    version = llumlet.load_version
    ticks = 0

    def tick() -> Any:
        nonlocal ticks
        ticks += 1
        return version()

    llumlet.load_version = tick  # type: ignore[method-assign]
    rep = reporter(cast(Any, llumlet))
    stream = rep._reports()
    sent: list[str] = []
    while rep.intervals < 100:
        sent.append(kind(await anext(stream)))
    await stream.aclose()
    assert sent == ["load"] + ["keep_alive"] * (100 // QUIET_KEEPALIVE_EVERY), sent
    assert ticks == 1 + 100 // QUIET_KEEPALIVE_EVERY  # intervals 1, 21, ..., 101


async def test_a_llumlet_without_the_signal_is_read_every_few_intervals_while_quiet() -> None:
    llumlet = FakeLlumlet()  # no load_changed
    llumlet.quiet = True
    rep = reporter(llumlet)
    stream = rep._reports()
    sent: list[str] = []
    while rep.intervals < 100:
        sent.append(kind(await anext(stream)))
    await stream.aclose()
    assert sent == ["load"] + ["keep_alive"] * (100 // QUIET_KEEPALIVE_EVERY), sent
    assert QUIET_TICK_EVERY >= 2 and llumlet.seq == 1 + 100 // QUIET_TICK_EVERY  # read every other interval


async def test_a_request_to_a_sleeping_quiet_llumlet_is_reported_at_once() -> None:
    """The quiet stream sleeps until its keep-alive is due (here 20 x 30 s) unless the llumlet signals a change: an
    AddRequest wakes it and the new load goes out at once (before: at the next 50 ms tick; with the polling fallback
    only after 2 intervals, 60 s here)."""
    llumlet = Llumlet(SimEngine("tiny", payload=False), "i-1")
    version = llumlet.load_version
    reads = 0

    def counted() -> Any:
        nonlocal reads
        reads += 1
        return version()

    llumlet.load_version = counted  # type: ignore[method-assign]
    rep = reporter(cast(Any, llumlet), interval_s=30.0)
    stream = rep._reports()
    first = await anext(stream)
    assert kind(first) == "load" and load_is_quiet(first.load)
    following = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)  # the stream is asleep now (nothing wakes it for 600 s)
    assert not following.done() and reads == 1
    await llumlet.add_request(
        common_pb2.EngineRequest(
            request_id="r1",
            prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(max_tokens=4),
            frontend_address="127.0.0.1:1",
        )
    )
    async with asyncio.timeout(DEADLINE_S):
        message = await following
    await stream.aclose()
    assert kind(message) == "load" and [r.request_id for r in message.load.requests] == ["r1"]
    assert reads == 2


async def test_work_sent_to_a_quiet_llumlet_is_reported_within_its_quiet_tick() -> None:
    """A request arriving at a quiet llumlet goes out at its next (quiet) tick, then the busy cadence resumes."""
    llumlet = FakeLlumlet()
    llumlet.quiet = True
    rep = reporter(llumlet)
    stream = rep._reports()
    assert kind(await anext(stream)) == "load" and rep.intervals == 1
    llumlet.quiet = False  # a request arrived during the quiet sleep after the first tick
    busy = await anext(stream)
    assert kind(busy) == "load" and rep.intervals == 1 + QUIET_TICK_EVERY
    assert dispatch_stale_after(0.05) / 2 >= QUIET_TICK_EVERY * 0.05, "reported well inside the leader's expectation"
    assert kind(await anext(stream)) == "keep_alive"
    assert rep.intervals == 1 + QUIET_TICK_EVERY + LOAD_KEEPALIVE_EVERY, "one interval per tick again"
    await stream.aclose()


def test_the_quiet_keepalive_period_is_inside_the_quiet_bound() -> None:
    """Two quiet keep-alive periods fit in the quiet bound, which is never shorter than the busy one."""
    for interval_ms in (1, 10, 20, 50, 100, 250, 1000):
        interval = interval_ms / 1000
        assert 2 * QUIET_KEEPALIVE_EVERY * interval <= quiet_stale_after(interval) + 1e-12, interval_ms
        assert quiet_stale_after(interval) >= dispatch_stale_after(interval), interval_ms


def quiet_cluster(*ids: str) -> ClusterState:
    interval = 0.05
    cluster = cluster_of(
        *ids, stale_after=1.0, dispatch_stale_after=dispatch_stale_after(interval), quiet_stale_after=2.0
    )
    assert quiet_stale_after(interval) == 2.0
    return cluster


def test_a_quiet_instance_keeping_alive_once_a_second_stays_dispatchable() -> None:
    """Before: silent after dispatch_stale_after (0.3 s) whatever the load: 1 s keep-alives made it undispatchable."""
    cluster = quiet_cluster("q", "busy")
    cluster.report(quiet("q", 1), 0.0)
    cluster.report(load("busy", 1), 0.0)
    assert cluster.quiet == {"q"}
    t, seq, tick = 0.0, 1, 0
    while t < 5.0:
        tick += 1
        t, seq = round(tick * 0.05, 3), seq + 1
        cluster.report(load("busy", seq, free_blocks=100 - seq % 50), t)
        if tick % QUIET_KEEPALIVE_EVERY == 0:
            assert cluster.keepalive("q", 1, t)
        if tick % 2 == 0:
            assert "q" in accepting(cluster, t + 1e-3), f"quiet instance stale at {t}"


def test_an_instance_is_judged_by_the_slower_of_its_own_report_period_and_the_clusters() -> None:
    """ATTACK10 L4: the cluster's load_report_interval_ms at 10 ms while the llumlets keep their --load-interval-ms
    of 50 ms. The one that registered its 50 ms keeps alive once a second when quiet and stays dispatchable; one that
    registered nothing (an older llumlet) is judged by the cluster's 10 ms as before. Before, both were flagged silent
    (0.4 s quiet bound) and skipped for dispatch while alive."""
    fast = 0.01
    cluster = ClusterState(
        stale_after=max(1.0, 20 * fast), dispatch_stale_after=dispatch_stale_after(fast),
        quiet_stale_after=quiet_stale_after(fast),
    )  # fmt: skip
    for iid, own_ms in (("q50", 50), ("old", 0), ("busy", 10)):
        cluster.upsert(
            common_pb2.InstanceInfo(instance_id=iid, grpc_address="127.0.0.1:1", load_report_interval_ms=own_ms)
        )
    cluster.report(quiet("q50", 1), 0.0)
    cluster.report(quiet("old", 1), 0.0)
    cluster.report(load("busy", 1), 0.0)
    assert cluster.bounds("q50") == pytest.approx((1.0, 0.3, 2.0)) and cluster.bounds("old") == cluster.bounds("busy")
    t, seq, tick = 0.0, 1, 0
    while t < 3.0:
        tick += 1
        t, seq = round(tick * fast, 3), seq + 1
        cluster.report(load("busy", seq, free_blocks=100 - seq % 50), t)
        if tick % (QUIET_KEEPALIVE_EVERY * 5) == 0:  # every 20 of its own 50 ms periods: 1 s
            assert cluster.keepalive("q50", 1, t)
            assert cluster.keepalive("old", 1, t)
        if tick % 10 == 0:
            assert "q50" in accepting(cluster, t + 1e-3), f"q50 stale at {t}"
    assert "old" not in accepting(cluster, t + 0.5)


def test_a_registered_report_period_is_clamped_to_the_configs_range() -> None:
    """REVIEW10 L1: a llumlet registering load_report_interval_ms=2^31-1 is judged by the range's top, 1000 ms
    (unhealthy after 20 s), not after ~500 days of silence; one registering 1 ms by the cluster's own bounds."""
    cluster = ClusterState()
    for iid, own_ms in (("huge", 2**31 - 1), ("tiny", 1)):
        cluster.upsert(
            common_pb2.InstanceInfo(instance_id=iid, grpc_address="127.0.0.1:1", load_report_interval_ms=own_ms)
        )
    assert cluster.bounds("huge") == pytest.approx(cluster_module.silence_bounds(1.0))
    assert cluster.bounds("tiny") == (cluster.stale_after, cluster.dispatch_stale_after, cluster.quiet_stale_after)


def test_a_silent_quiet_instance_stops_taking_requests_soon_after_the_first_one_sent_there() -> None:
    """The bound: dispatch_stale_after (+ one scan) after the first dispatch since its last message; and with nothing
    sent, quiet_stale_after."""
    cluster = quiet_cluster("q", "idle", "busy")
    cluster.report(quiet("q", 1), 0.0)
    cluster.report(quiet("idle", 1), 0.0)
    cluster.report(load("busy", 1), 0.0)
    t, seq, tick = 0.0, 1, 0

    def until(end: float) -> None:
        nonlocal t, seq, tick
        while t < end - 1e-9:  # busy reports every 50 ms; q and idle say nothing
            tick += 1
            t, seq = round(tick * 0.05, 3), seq + 1
            cluster.report(load("busy", seq, free_blocks=100 - seq % 50), t)

    until(1.0)
    assert accepting(cluster, t) == {"q", "idle", "busy"}, "silent 1 s, nothing sent there: within the quiet bound"
    cluster.record_dispatch("q", "r1", 1, common_pb2.PRIORITY_NORMAL, t)
    cluster.record_dispatch("q", "r2", 1, common_pb2.PRIORITY_NORMAL, t + 0.1)  # the first dispatch counts
    sent = t
    until(sent + cluster.dispatch_stale_after - 0.05)
    assert "q" in accepting(cluster, t)
    until(sent + cluster.dispatch_stale_after + STALE_SCAN_INTERVAL_S)
    assert accepting(cluster, t) == {"idle", "busy"}, "q took r1 and said nothing: no more requests"
    until(2.0 + STALE_SCAN_INTERVAL_S)
    assert accepting(cluster, t) == {"busy"}, "idle: silent past the quiet bound"
    cluster.report(load("q", 2), t)  # q speaks (it got r1): dispatchable at once, by the busy rules
    assert accepting(cluster, t) == {"q", "busy"} and "q" not in cluster.quiet and not cluster.expecting


def test_a_keepalive_ends_the_expectation_only_when_sent_after_the_request_would_have_been_reported() -> None:
    cluster = quiet_cluster("q", "busy")
    cluster.report(quiet("q", 1), 0.0)
    cluster.report(load("busy", 1), 0.0)
    cluster.snapshot(1.0)  # as the dispatch that chose q
    cluster.record_dispatch("q", "r1", 1, common_pb2.PRIORITY_NORMAL, 1.0)
    assert cluster.keepalive("q", 1, 1.05)  # may have left before r1 arrived: proves nothing about r1
    assert cluster.expecting == {"q": 1.0}
    cluster.report(load("busy", 2, free_blocks=90), 1.45)
    assert "q" not in accepting(cluster, 1.45)
    # r1 never reached q (its AddRequest failed): q's next keep-alive, a quiet period on, says it is alive and idle.
    assert cluster.keepalive("q", 1, 2.05)
    assert not cluster.expecting and "q" in accepting(cluster, 2.05)
    cluster.report(load("busy", 3, free_blocks=80), 3.0)
    assert "q" in accepting(cluster, 3.0), "judged by the quiet bound again"


async def test_a_quiet_load_held_by_the_rate_floor_sets_the_quiet_cadence() -> None:
    """The llumlet keeps alive at the period of the last load it sent; if the floor held that load back, the leader
    still waits for its keep-alives at that period (else: silent after 0.3 s until the keep-alive 1 s later)."""
    replica = leader()
    servicer = SchedulerServicer(replica, min_report_interval=60.0)
    assert servicer.take(scheduler_pb2.ReportLoadRequest(load=load("i-1", 1)), "i-1", False)
    assert "i-1" not in replica.cluster.quiet
    assert not servicer.take(scheduler_pb2.ReportLoadRequest(load=quiet("i-1", 2)), "i-1", False)  # held
    assert replica.cluster.loads["i-1"].seq == 1 and "i-1" in replica.cluster.quiet
    assert not servicer.take(scheduler_pb2.ReportLoadRequest(load=load("i-1", 3)), "i-1", False)  # held: busy again
    assert "i-1" not in replica.cluster.quiet


# --------------------------------------------------------------------------------------------- over gRPC, end to end
def leader() -> SchedulerReplica:
    """A leader's report path without etcd (the replica's other parts are never started here)."""
    r = SchedulerReplica(cast(Any, object()), KeyLayout("c1"), "s0", "127.0.0.1:1")
    r.require_leader = lambda: None  # type: ignore[method-assign]
    r.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:1"))
    return r


@pytest.fixture
async def served() -> AsyncIterator[tuple[SchedulerReplica, SchedulerServicer, str, str]]:
    """A leader's servicer on gRPC and on its framed listener (plaintext, as on an --insecure scheduler): load streams
    and Dispatch calls."""
    replica = leader()
    servicer = SchedulerServicer(replica)
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    framed, framed_port = await listen(servicer.serve_framed, "127.0.0.1", 0, None)
    replica.report_address = f"127.0.0.1:{framed_port}"
    try:
        yield replica, servicer, f"127.0.0.1:{port}", f"127.0.0.1:{framed_port}"
    finally:
        framed.close()
        await server.stop(None)


async def wait_for(condition: Any, what: str) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


@pytest.mark.parametrize("transport", ["grpc", "framed"])
async def test_the_leader_takes_keepalives_and_gets_the_full_load_back_when_it_lost_it(
    served: tuple[SchedulerReplica, SchedulerServicer, str, str], transport: str
) -> None:
    """Also over the leader's framed report stream: the same messages, and its refusal (the stale keep-alive) ends
    the stream as on gRPC (old behaviour: no framed stream)."""
    replica, servicer, address, framed_address = served
    llumlet = FakeLlumlet()
    rep = reporter(llumlet, interval_s=0.01)
    task = asyncio.get_running_loop().create_task(
        rep._stream_to(address, framed_address if transport == "framed" else "")
    )
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
        assert rep.framed_streams >= 2 if transport == "framed" else rep.framed_streams == 0
        assert rep.grpc_streams == 0 if transport == "framed" else rep.grpc_streams >= 2
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


async def test_an_instances_status_pairs_its_latest_load_with_the_freeness_of_that_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ListInstances (and the frontend's /metrics from it) showed the newest load beside the freeness of the view the
    fold timer had not updated yet: a live scrape once read used blocks 1234 beside a freeness of 1235 free blocks."""
    monkeypatch.setattr(cluster_module, "REPORT_FOLD_INTERVAL_S", 30.0)  # the timer never fires within the test
    cluster = cluster_of("a")
    config = PolicyConfig()
    cluster.report(load("a", 1, free_blocks=50, output_tokens=1), time.monotonic())
    cluster.snapshot(time.monotonic())
    cluster.report(load("a", 2, free_blocks=40, output_tokens=2), time.monotonic())
    status = cluster.status("a", config, time.monotonic())
    assert status.load.free_blocks == 40
    view = cluster.snapshot(time.monotonic()).get("a")
    assert view is not None and view.free_blocks == 40
    assert status.freeness == migration_freeness(view, config)


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


# ------------------------------------------------------------------------------ running requests' block growth (#20)
def decoding(free_blocks: int = 80, blocks: tuple[int, ...] = (10, 10), demand: tuple[int, ...] = (0, 0)) -> LoadKey:
    """The key of a load with running requests r0, r1, ... holding ``blocks`` and needing ``demand`` more."""
    pb = common_pb2.InstanceLoad(instance_id="i-1", total_blocks=100, free_blocks=free_blocks, block_size=16)
    pb.summary.running_blocks = sum(blocks)
    for i, (held, more) in enumerate(zip(blocks, demand, strict=True)):
        pb.requests.add(request_id=f"r{i}", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=held, demand_blocks=more)
    return load_key(pb)


def with_waiting(key: LoadKey) -> LoadKey:
    """The same load plus an admitted (waiting) request."""
    return LoadKey(key.rest + b"+waiting", key.growth)


FULL, ALIVE, NOTHING = ReportAction.FULL, ReportAction.KEEP_ALIVE, ReportAction.NOTHING
K = GROWTH_REPORT_EVERY


@pytest.mark.parametrize(
    ("case", "sent", "current", "since_full", "since_sent", "action"),
    [
        ("first tick of a stream", None, decoding(), 1, 1, FULL),
        ("unchanged, keep-alive not due", decoding(), decoding(), 1, 1, NOTHING),
        ("unchanged, keep-alive due", decoding(), decoding(), 5, LOAD_KEEPALIVE_EVERY, ALIVE),
        # Before: each of these growth-only changes was sent at the next tick.
        ("a block taken, throttled", decoding(80), decoding(79, (11, 10)), 1, 1, NOTHING),
        ("a block needed, throttled", decoding(), decoding(demand=(1, 0)), 1, 1, NOTHING),
        ("two blocks taken, throttled", decoding(80), decoding(78, (11, 11)), K - 1, K - 1, NOTHING),
        ("growth, its period come", decoding(80), decoding(79, (11, 10)), K, K, FULL),
        ("growth, keep-alive due instead", decoding(80), decoding(79, (11, 10)), K + 2, LOAD_KEEPALIVE_EVERY, FULL),
        # Every other change goes out at the next tick, whatever the growth period.
        ("an admission", decoding(), with_waiting(decoding()), 1, 1, FULL),
        ("an admission with growth", decoding(80), with_waiting(decoding(79, (11, 10))), 1, 1, FULL),
        ("a finish", decoding(80), decoding(90, (10,), (0,)), 1, 1, FULL),
        ("blocks freed (a shrink)", decoding(80), decoding(81, (9, 10)), 1, 1, FULL),
        ("free blocks moved alone", decoding(80), decoding(79), 1, 1, FULL),
        ("free blocks fell by more than the growth", decoding(80), decoding(77, (11, 10)), 1, 1, FULL),
        ("demand dropped without a block", decoding(demand=(1, 0)), decoding(), 1, 1, FULL),
    ],
)
def test_what_a_report_tick_sends(
    case: str, sent: LoadKey | None, current: LoadKey, since_full: int, since_sent: int, action: ReportAction
) -> None:
    assert report_action(sent, current, since_full, since_sent) is action, case


def test_a_preemption_or_phase_change_is_not_growth() -> None:
    running = common_pb2.InstanceLoad(instance_id="i-1", free_blocks=80)
    running.requests.add(request_id="r0", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=10)
    preempted = common_pb2.InstanceLoad()
    preempted.CopyFrom(running)
    preempted.requests[0].phase = common_pb2.REQUEST_PHASE_WAITING
    preempted.requests[0].num_blocks = 0
    preempted.free_blocks = 90
    migrating = common_pb2.InstanceLoad()
    migrating.CopyFrom(running)
    migrating.migrating_out = True
    for changed in (preempted, migrating):
        assert report_action(load_key(running), load_key(changed), 1, 1) is FULL
    # A waiting request's blocks and demand are not growth either (only running requests grow block by block).
    waiting = common_pb2.InstanceLoad(instance_id="i-1", free_blocks=80)
    waiting.requests.add(request_id="w", phase=common_pb2.REQUEST_PHASE_WAITING, demand_blocks=4)
    more = common_pb2.InstanceLoad()
    more.CopyFrom(waiting)
    more.requests[0].demand_blocks = 5
    assert report_action(load_key(waiting), load_key(more), 1, 1) is FULL


def test_the_change_key_bytes_still_see_growth() -> None:
    """``load_change_key`` (the whole key) differs for growth too: only the reporter's cadence treats it apart."""
    a = common_pb2.InstanceLoad(instance_id="i-1", free_blocks=80)
    a.requests.add(request_id="r0", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=10)
    b = common_pb2.InstanceLoad()
    b.CopyFrom(a)
    b.requests[0].num_blocks, b.free_blocks = 11, 79
    assert load_change_key(a) != load_change_key(b)
    b.requests[0].num_output_tokens = 99
    c = common_pb2.InstanceLoad()
    c.CopyFrom(b)
    c.requests[0].num_output_tokens = 3
    assert load_change_key(b) == load_change_key(c)


class ScriptedLlumlet:
    """A decoding llumlet whose load changes per report tick as a script says (``load_version`` is read once per
    tick): ``"grow"`` one running request takes a block, ``"admit"`` a request arrives, anything else: no change."""

    def __init__(self, script: list[str]) -> None:
        self.instance_id = "i-1"
        self.script = script
        self.tick = 0
        self.seq = 0
        self.free_blocks = 200
        self.blocks = [10, 10, 10]
        self.waiting = 0

    def load_version(self) -> None:
        step = self.script[self.tick] if self.tick < len(self.script) else ""
        self.tick += 1
        if step == "grow":
            self.blocks[self.tick % len(self.blocks)] += 1
            self.free_blocks -= 1
        elif step == "admit":
            self.waiting += 1

    def load_pb(self) -> common_pb2.InstanceLoad:
        self.seq += 1
        pb = common_pb2.InstanceLoad(
            instance_id=self.instance_id, seq=self.seq, free_blocks=self.free_blocks, num_waiting=self.waiting
        )
        for i, held in enumerate(self.blocks):
            pb.requests.add(request_id=f"r{i}", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=held)
        return pb


async def sent_per_tick(llumlet: ScriptedLlumlet, ticks: int) -> dict[int, scheduler_pb2.ReportLoadRequest]:
    """The messages of the first ``ticks`` report ticks, by the tick (from 1) that sent them."""
    stream = reporter(cast(Any, llumlet))._reports()
    sent: dict[int, scheduler_pb2.ReportLoadRequest] = {}
    while llumlet.tick < ticks:
        message = await anext(stream)
        sent[llumlet.tick] = message
    await stream.aclose()
    return {tick: m for tick, m in sent.items() if tick <= ticks}


async def test_a_steadily_decoding_instance_sends_its_growth_once_per_period_and_stays_fresh() -> None:
    ticks = 30
    llumlet = ScriptedLlumlet(["grow"] * ticks)
    sent = await sent_per_tick(llumlet, ticks)
    # Before: a full load at every tick (each one's blocks differ). Now: at the first tick, then every K ticks.
    assert sorted(sent) == list(range(1, ticks + 1, K))
    assert all(kind(m) == "load" for m in sent.values()), "the growth rides in place of the keep-alive"
    # Never a longer silence than the keep-alive period: the leader never takes a decoding instance for stale.
    gaps = [b - a for a, b in zip(sorted(sent), sorted(sent)[1:], strict=False)]
    assert max(gaps) <= LOAD_KEEPALIVE_EVERY
    # What the leader holds lags by at most the growth of K - 1 ticks.
    last = sent[max(sent)].load
    assert last.free_blocks == 200 - max(sent)


async def test_an_admission_goes_out_at_the_next_tick_with_the_growth_so_far() -> None:
    llumlet = ScriptedLlumlet(["grow", "grow", "admit", "grow", "grow", "grow", "grow", "grow"])
    sent = await sent_per_tick(llumlet, 8)
    assert sorted(sent) == [1, 3, 6], "the admission at tick 3 is not held back; growth resumes its period"
    admitted = sent[3].load
    assert admitted.num_waiting == 1 and admitted.free_blocks == 200 - 2


async def test_a_held_back_load_is_sent_with_a_fresh_timestamp() -> None:
    """The reporter sends the snapshot it built when the growth happened (the version says nothing changed since),
    stamped with the time it is sent."""
    llumlet = Llumlet(SimEngine("tiny", payload=False), "i-1")
    versions = iter([1, 2, 2, 2])  # moves in ``rest``: built at once (a change the version cannot tell from growth)
    llumlet.load_version = lambda: LoadVersion((next(versions),), 0)  # type: ignore[method-assign]
    built: list[common_pb2.InstanceLoad] = []
    load_pb = llumlet.load_pb

    def growing() -> common_pb2.InstanceLoad:
        pb = load_pb()
        pb.requests.add(request_id="r0", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=len(built))
        pb.free_blocks -= len(built)
        pb.timestamp = float(len(built))
        built.append(pb)
        return pb

    llumlet.load_pb = growing  # type: ignore[method-assign]
    stream = reporter(cast(Any, llumlet))._reports()
    first = await anext(stream)
    grown = await anext(stream)  # tick 4: the growth of tick 2, built once
    await stream.aclose()
    assert len(built) == 2 and first.load.seq == built[0].seq and grown.load.seq == built[1].seq
    assert grown.load.timestamp > 1e9, "stamped when sent, not when built"


async def test_a_decoding_sim_llumlet_sends_a_third_of_the_loads_and_the_leader_lags_by_at_most_a_block_each() -> None:
    """A real sim engine decoding 4 requests, one step per report tick: growth-only changes are most ticks' news."""
    engine = SimEngine("tiny", payload=False)
    llumlet = Llumlet(engine, "i-1")
    for i in range(4):
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id=f"r{i}",
                prompt_token_ids=list(range(1, 20 + 5 * i)),
                sampling=common_pb2.SamplingParams(max_tokens=300, ignore_eos=True),
                frontend_address="127.0.0.1:1",
            )
        )
    engine.step(0.0)  # the prefill: all running from here on
    version = llumlet.load_version
    held: common_pb2.InstanceLoad | None = None  # what the leader holds: the last full load sent
    ticks = changed = lag = 0
    last_key = b""

    def tick() -> Any:  # read once per report tick: the engine steps in between, as it would in 50 ms
        nonlocal ticks, changed, lag, last_key
        ticks += 1
        engine.step(float(ticks))
        truth = engine.load()
        assert all(r.phase is Phase.RUNNING for r in truth.requests) and len(truth.requests) == 4
        key = load_change_key(convert.load_to_pb(truth, "i-1", 0, 0.0))
        changed += key != last_key
        last_key = key
        if held is not None:  # as of the previous tick's message at the latest
            lag = max(lag, held.free_blocks - truth.free_blocks)
        return version()

    llumlet.load_version = tick  # type: ignore[method-assign]
    stream = reporter(cast(Any, llumlet))._reports()
    fulls = 0
    while ticks < 100:
        message = await anext(stream)
        if kind(message) == "load":
            held, fulls = message.load, fulls + 1
    await stream.aclose()
    # Before: a full load whenever the key changed (most ticks); now at most one per growth period.
    assert fulls <= ticks // GROWTH_REPORT_EVERY + 1 < changed
    # The leader's free blocks lag the engine's by at most one block per running request.
    assert 0 <= lag <= 4


class RandomlyDrivenLlumlet:
    """A real sim llumlet whose engine and migration flags change at random between report ticks (the reporter reads
    ``load_version`` once per tick, and that read applies the tick's operations). Two with the same seed go through the
    same states; ``track_version=False`` hides the version, so its reporter builds and compares every tick."""

    def __init__(self, seed: int, *, track_version: bool) -> None:
        self.engine = SimEngine("tiny", total_blocks=40, payload=False)
        self.llumlet = Llumlet(self.engine, "i-1")
        self.instance_id = "i-1"
        self.rng = random.Random(seed)
        self.track_version = track_version
        self.tick = 0
        self.builds = 0

    def load_version(self) -> LoadVersion | None:
        self.tick += 1
        self._operate()
        return self.llumlet.load_version() if self.track_version else None

    def load_pb(self) -> common_pb2.InstanceLoad:
        self.builds += 1
        return self.llumlet.load_pb()

    def _operate(self) -> None:
        rng, engine = self.rng, self.engine
        for _ in range(rng.choice((0, 1, 1, 1, 2))):  # 0-2 operations per 50 ms tick, mostly decode steps
            op = rng.random()
            ids = engine.request_ids()
            try:
                if op < 0.07:
                    rid = f"r{self.tick}-{rng.randint(0, 1 << 30)}"
                    prompt = tuple(range(1, rng.randint(2, 60)))
                    sampling = Sampling(max_tokens=rng.randint(1, 120), ignore_eos=True)
                    engine.add_request(RequestSpec(rid, prompt, sampling, arrival_time=float(self.tick)), 0.0)
                elif op < 0.9:
                    engine.step(float(self.tick))
                elif op < 0.92 and ids:
                    engine.abort_request(rng.choice(ids))
                elif op < 0.95 and ids:
                    rid = rng.choice(ids)
                    if engine.phase(rid) is Phase.SUSPENDED:
                        (engine.resume if rng.random() < 0.7 else engine.release_suspended)(rid)
                    else:
                        engine.suspend(rid)
                elif op < 0.97:
                    engine.free_reserved(engine.reserve_blocks(rng.randint(1, 3)))
                elif op < 0.98:
                    engine.reserve_blocks(1)
                else:
                    self.llumlet.set_migrating(outgoing=rng.random() < 0.5)
            except EngineError:
                pass


async def sent_sequence(llumlet: RandomlyDrivenLlumlet, ticks: int) -> list[tuple[int, str, bytes]]:
    """(tick, kind, change key of a full load) of each message the reporter sends in the first ``ticks`` ticks."""
    stream = reporter(cast(Any, llumlet))._reports()
    sent: list[tuple[int, str, bytes]] = []
    while llumlet.tick < ticks:
        message = await anext(stream)
        sent.append((llumlet.tick, kind(message), load_change_key(message.load) if kind(message) == "load" else b""))
    await stream.aclose()
    return sent


@pytest.mark.parametrize("seed", range(4))
async def test_skipping_the_build_on_held_back_growth_sends_what_building_every_tick_sends(seed: int) -> None:
    """The reporter builds the snapshot only when the version's ``rest`` moved or growth is due: over random engine
    operations (decode steps, admissions, preemptions, finishes, aborts, migrations' suspends and reservations,
    migration flags) it sends the same messages at the same ticks as a reporter that builds at every tick."""
    ticks = 400
    tracked = RandomlyDrivenLlumlet(seed, track_version=True)
    every_tick = RandomlyDrivenLlumlet(seed, track_version=False)
    sent = await sent_sequence(tracked, ticks)
    assert sent == await sent_sequence(every_tick, ticks)
    assert tracked.engine.load() == every_tick.engine.load(), "both went through the same states"
    kinds = {k for _, k, _ in sent}
    assert kinds == {"load", "keep_alive"} and len(sent) > ticks // LOAD_KEEPALIVE_EVERY
    # Useful too: before, every tick whose version moved built the snapshot; growth alone no longer does.
    assert every_tick.builds == every_tick.tick and tracked.builds < tracked.tick // 2


async def test_a_decoding_sim_llumlet_builds_its_load_only_when_the_growth_is_due() -> None:
    """Steady decoding, one step per tick: every tick's version moves (growth), but the snapshot is built only at
    the ticks that send it (before: at every tick whose version moved)."""
    engine = SimEngine("tiny", total_blocks=2000, payload=False)
    llumlet = Llumlet(engine, "i-1")
    for i in range(30):
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id=f"r{i}",
                prompt_token_ids=list(range(1, 30 + 3 * i)),
                sampling=common_pb2.SamplingParams(max_tokens=380, ignore_eos=True),
                frontend_address="127.0.0.1:1",
            )
        )
    engine.step(0.0)
    version, load_pb = llumlet.load_version, llumlet.load_pb
    ticks = builds = moved = 0
    last: LoadVersion | None = None

    def tick() -> LoadVersion | None:
        nonlocal ticks, moved, last
        ticks += 1
        engine.step(float(ticks))
        current = version()
        moved += current != last
        last = current
        return current

    def counting() -> common_pb2.InstanceLoad:
        nonlocal builds
        builds += 1
        return load_pb()

    llumlet.load_version = tick  # type: ignore[method-assign]
    llumlet.load_pb = counting  # type: ignore[method-assign]
    stream = reporter(cast(Any, llumlet))._reports()
    fulls = 0
    while ticks < 60:
        fulls += kind(await anext(stream)) == "load"
    await stream.aclose()
    assert moved > 40, "a decoding instance's version moves at most ticks (49 of 60)"
    assert builds == fulls <= ticks // GROWTH_REPORT_EVERY + 1


# ------------------------------------------------------------------------- busy ticks ride the engine's steps (#20)
class SignallingLlumlet(FakeLlumlet):
    """A busy FakeLlumlet with the real llumlet's ``load_changed`` signal; records when its load was read."""

    def __init__(self) -> None:
        super().__init__()
        self.load_changed = asyncio.Event()
        self.reads: list[float] = []

    def load_pb(self) -> common_pb2.InstanceLoad:
        self.reads.append(time.monotonic())
        return super().load_pb()


async def _collect(stream: AsyncIterator[scheduler_pb2.ReportLoadRequest], out: list[float]) -> None:
    async for _ in stream:
        out.append(time.monotonic())


async def test_a_stepping_instance_reads_its_load_at_its_step_ends_not_on_a_timer_of_its_own() -> None:
    """Each engine step ends with ``load_changed`` set (the engine lock's release). A busy stream ticks at the first
    such signal once an interval passed, in the wake-up the step already paid for: before, a 20 Hz timer of its own
    read the load between steps (an event-loop wake-up each, ~0.15 ms of CPU), ~10-25 % of reads within 10 ms after a
    step's end with 43 ms steps. The messages keep their cadence: one per keep-alive period, none later than
    ``BUSY_MESSAGE_GRACE`` past it."""
    llumlet = SignallingLlumlet()
    interval, step = 0.05, 0.043
    steps: list[float] = []
    sent: list[float] = []
    rep = reporter(cast(Any, llumlet), interval_s=interval)
    consumer = asyncio.create_task(_collect(rep._reports(), sent))
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            await asyncio.sleep(step)
            steps.append(time.monotonic())
            llumlet.load_changed.set()
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    reads = llumlet.reads[1:]  # the first one starts the stream
    # Within 20 ms of a step's end: a timer of its own (the old reporter) lands there by chance in ~45 % of reads with
    # 43 ms steps, a signalled read on a quiet host in ~100 %. The bound is 70 %: a loaded CI host (load 2-8) delays
    # some wake-ups past 10 ms (the earlier 10 ms / 80 % bound failed there: 18 of 23), rarely past 20 ms.
    aligned = sum(1 for r in reads if any(0 <= r - s < 0.020 for s in steps))
    assert len(reads) >= 10 and aligned >= 0.7 * len(reads), f"{aligned} of {len(reads)} reads at a step's end"
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps and max(gaps) < (LOAD_KEEPALIVE_EVERY + BUSY_MESSAGE_GRACE) * interval + 0.15, gaps
    assert min(gaps) >= LOAD_KEEPALIVE_EVERY * interval - 0.005, gaps


async def test_a_busy_instance_that_does_not_step_ticks_on_a_slower_timer_and_keeps_alive_in_time() -> None:
    """No step (e.g. only a migration's reserved blocks): the stream's timer ticks ``BUSY_TICK_GRACE`` intervals late
    (before: every interval, ~24 reads in 1.2 s at 50 ms), and its keep-alives still go out within
    ``BUSY_MESSAGE_GRACE`` intervals of their period."""
    llumlet = SignallingLlumlet()
    interval = 0.05
    sent: list[float] = []
    consumer = asyncio.create_task(_collect(reporter(cast(Any, llumlet), interval_s=interval)._reports(), sent))
    await asyncio.sleep(1.2)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    assert len(llumlet.reads) <= 1 + 1.2 / ((1 + BUSY_TICK_GRACE) * interval) + 2, llumlet.reads
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(gaps) >= 4 and max(gaps) < (LOAD_KEEPALIVE_EVERY + BUSY_MESSAGE_GRACE) * interval + 0.15, gaps
