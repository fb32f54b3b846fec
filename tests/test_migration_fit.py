"""Migrations that cannot fit are not ordered: the order carries the destination's room (``MigrateOrder.max_blocks``)
and the source picks only a request that fits it.

Why: the source's selection did not know the destination's room. In a 4-instance simulation of the live demo (S-L,
1.2 req/s, seed 1) a source running two requests of 321 and 328 blocks with a 200-block queue head was paired every
round with a destination of 207 free blocks; SR picked the 321-block request, the destination refused the
pre-allocation, and the same order came back the next round: ~10 futile migrations a second for tens of seconds,
holding both instances' migration slots. Each test here fails on the code before ``max_blocks``.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.pairing import MigrateOrder, order_room, pair_instances
from pyllumnix.control_plane.policy.selection import select_request
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, RequestView
from pyllumnix.infra.vocabulary import Priority, RequestPhase
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from pyllumnix.tools.sim.cluster import ClusterSimulator
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.migration import MigrationProcess, Outcome
from pyllumnix.tools.workload.request import RequestArrival
from tests.test_migration_paths import (
    OUTCOME,
    Node,
    assert_stream_exact,
    engine_phase,
    make_node,
    migrate,
    request,
    settle,
    unmigrated_tokens,
    wait_tokens,
)
from tests.test_policy_helpers import view
from tests.test_replica_leadership import FakeLeadership, make_replica

R, W = RequestPhase.RUNNING, RequestPhase.WAITING
# The lead's evidence, reduced: two big running requests, a queue with a 200-block head and a small later one.
SOURCE = [
    RequestView("run-321", R, num_blocks=321, arrival_time=1.0),
    RequestView("run-328", R, num_blocks=328, arrival_time=2.0),
    RequestView("run-40", R, num_blocks=40, arrival_time=3.0),
    RequestView("vip", R, Priority.HIGH, num_blocks=5, arrival_time=4.0),  # never picked, even when it fits
    RequestView("head-200", W, demand_blocks=200, arrival_time=5.0),
    RequestView("small-30", W, demand_blocks=30, arrival_time=6.0),
]


@pytest.mark.parametrize(
    ("name", "requests", "selection", "max_blocks", "expected"),
    [
        ("no limit: SR's pick, whatever its size", SOURCE, Selection.SR, 0, "run-40"),
        ("no limit: LR's pick", SOURCE, Selection.LR, 0, "run-328"),
        # LR keeps its order among the running requests that fit: 321 + 1 block of growth fits 322, 328 does not.
        ("too large candidate skipped (LR)", SOURCE, Selection.LR, 322, "run-321"),
        ("growth block counted (LR)", SOURCE, Selection.LR, 321, "run-40"),
        # The limit keeps the selection's kind (session 8): running requests exist, none fits, so nothing moves. Before
        # the limit: run-321, refused by a destination with room 207; with the limit before session 8: the fitting
        # waiting head-200 / small-30 (the fallback taken for want of a fitting running request; it cost the simulated
        # Llumnix its prefill latency).
        ("SR: only big running ones, none fits: nothing", SOURCE[:2] + SOURCE[4:], Selection.SR, 207, None),
        ("SR: none fits, a small waiting one would: nothing", SOURCE[:2] + SOURCE[4:], Selection.SR, 100, None),
        ("SR: nothing running: the fitting waiting head", SOURCE[4:], Selection.SR, 207, "head-200"),
        ("SR: nothing running: head too big, the next waiting one", SOURCE[4:], Selection.SR, 100, "small-30"),
        ("FCW: the head does not fit, a running one would: nothing", SOURCE[:3] + SOURCE[4:5], Selection.FCW, 41, None),
        ("FCW: the head fits", SOURCE, Selection.FCW, 200, "head-200"),
        ("FCW: head too big, the next waiting one", SOURCE, Selection.FCW, 199, "small-30"),
        ("FCW: no waiting one fits, nor a running one", SOURCE, Selection.FCW, 29, None),
        ("FCW: fallback to a fitting running one", SOURCE[:3], Selection.FCW, 41, "run-40"),
        ("LCR: the last-come running one that fits", SOURCE[:2], Selection.LCR, 325, "run-321"),
        ("nothing fits: no migration", SOURCE, Selection.SR, 20, None),
    ],
)
def test_select_only_what_fits(
    name: str, requests: list[RequestView], selection: Selection, max_blocks: int, expected: str | None
) -> None:
    assert select_request(requests, selection, max_blocks=max_blocks) == expected, name


def test_the_limit_leaves_the_no_fallback_rule_alone() -> None:
    waiting_only = [r for r in SOURCE if r.phase == W]
    assert select_request(waiting_only, Selection.SR, fallback=False, max_blocks=1000) is None
    assert select_request(waiting_only, Selection.SR, max_blocks=1000) == "head-200"


def test_the_order_carries_the_destination_room() -> None:
    """free - waiting demand - watermark of the destination, as in the snapshot. Old: no room on the order."""
    source = view(
        "src", free_blocks=5, num_running=2, running_blocks=649, num_waiting=9, head_of_line_demand_blocks=200
    )
    dest = view(
        "dst",
        free_blocks=207,
        num_running=3,
        watermark_blocks=7,
        num_waiting=1,
        head_of_line_demand_blocks=20,
        waiting_demand_blocks=20,
    )
    orders = pair_instances(ClusterSnapshot.of([source, dest]), PolicyConfig())
    assert orders == [MigrateOrder("src", "dst", Selection.SR, 207 - 20 - 7)]
    assert order_room(dest) == 180


def test_no_order_to_a_destination_without_room() -> None:
    """A destination above the threshold on freeness but with nothing left above its watermark (its queue's demand
    takes the rest) would refuse whatever it got. Old: ordered every round."""
    source = view(
        "src", free_blocks=5, num_running=2, running_blocks=649, num_waiting=9, head_of_line_demand_blocks=200
    )
    dest = view(
        "dst",
        free_blocks=100,
        num_running=1,
        watermark_blocks=8,
        num_waiting=1,
        head_of_line_demand_blocks=92,
        waiting_demand_blocks=92,
    )
    assert order_room(dest) == 0
    assert pair_instances(ClusterSnapshot.of([source, dest]), PolicyConfig()) == []


# F4 (review 7): requests dispatched to the destination and not yet listed by its report arrive there as waiting
# requests; the room leaves their demand free, as the dispatch freeness counts it. Each row fails on the room that
# ignored them (``max_blocks`` 300 / 500: a waiting pick refused at pre-allocation, or a running one taking the blocks
# the just-dispatched queue needs).
@pytest.mark.parametrize(
    ("name", "dispatched", "expected"),
    [
        ("ordinary pair", (250,), [MigrateOrder("s", "d", Selection.SR, 300 - 250)]),
        ("ordinary pair, two dispatches", (100, 150), [MigrateOrder("s", "d", Selection.SR, 300 - 250)]),
        ("ordinary pair, the dispatched demand takes the room", (300,), []),
    ],
)
def test_the_room_leaves_the_demand_dispatched_there_free(
    name: str, dispatched: tuple[int, ...], expected: list[MigrateOrder]
) -> None:
    source = view("s", free_blocks=5, num_running=4, running_blocks=400)
    dest = view("d", free_blocks=300, num_running=1, running_blocks=100)
    for demand in dispatched:
        dest = dest.with_dispatch(demand)
    assert pair_instances(ClusterSnapshot.of([source, dest]), PolicyConfig()) == expected, name


def test_the_spill_room_leaves_the_demand_dispatched_there_free() -> None:
    """A high-priority instance's room above the spill floor less what was dispatched there: 600 - 100 - 200 = 300
    still takes the queueing instance's 20-block head; 600 - 100 - 480 = 20 takes it exactly; 481 leaves none."""
    config = PolicyConfig(normal_spill_floor_blocks=100)
    high = view("h", free_blocks=600, num_running=3, num_running_high=3, running_high_blocks=300)
    queueing = view(
        "n", free_blocks=5, num_running=10, num_waiting=40, head_of_line_demand_blocks=20, waiting_demand_blocks=400
    )
    for demand, expected in (
        (200, [MigrateOrder("n", "h", Selection.FCW, 300)]),
        (480, [MigrateOrder("n", "h", Selection.FCW, 20)]),
        (481, []),
    ):
        snap = ClusterSnapshot.of([high.with_dispatch(demand, Priority.HIGH), queueing])
        assert pair_instances(snap, config) == expected, demand


# --- the simulator: the same code path as the live llumlet (select_request with the order's room).
BLOCK = 16


def _arrival(rid: str, t: float, prompt_blocks: int, output: int) -> RequestArrival:
    return RequestArrival(rid, t, prompt_blocks * BLOCK, output)


def _run_crafted() -> list[MigrationProcess]:
    """Two llama-7b-a10 instances (792 blocks, watermark 7). The source runs two 320-block requests and queues
    four 150-block ones; the destination runs one 560-block request (232 free, room 225). Placement is fixed (the
    dispatch policy is replaced by it), everything else is the simulator: reports, pairing every 100 ms, migrations
    on real sim engines."""
    placement = {"big-a": "inst-0000", "big-b": "inst-0000", "dst-run": "inst-0001"}
    arrivals = [
        _arrival("big-a", 0.0, 320, 150),
        _arrival("big-b", 0.0, 320, 150),
        _arrival("dst-run", 0.0, 560, 150),
    ]
    for i in range(4):
        rid = f"q{i}"
        placement[rid] = "inst-0000"
        arrivals.append(_arrival(rid, 0.05 + 0.01 * i, 150, 20))
    config = SimConfig(instances=2, seed=0, max_virtual_s=120.0)
    sim = ClusterSimulator(config, arrivals)

    def place(_snapshot: ClusterSnapshot, request: DispatchRequestView) -> str:
        return placement[request.request_id]

    sim.core.dispatch = place  # type: ignore[method-assign,assignment]
    result = sim.run()
    assert not result.stalled and all(r.finish_time is not None for r in result.records)
    assert config.report_interval_ms == REPORT_MS
    return result.migrations


REPORT_MS = 100


def test_the_simulator_neither_repeats_a_refused_migration_nor_moves_the_queue_instead() -> None:
    """Before the limit: SR picked the 320-block running request big-a every round and the destination refused it
    (dozens of refusals, ~10 a second). With the limit before session 8: the big requests were never tried, and the
    fallback moved the queued q0-q3 instead (a kind of migration the source never made before: it runs requests).
    Now: nothing is tried while the destination's room holds no running request, no queued request moves, and the
    queue is served where it is (docs/sim/REPORT.md, session 8: that fallback, ~200 waiting requests moved per
    10,000, cost the simulated Llumnix its prefill). Once dst-run finishes a big request may move (it fits then)."""
    migrations = _run_crafted()
    assert not [m.request_id for m in migrations if m.request_id.startswith("q")]
    assert not [m for m in migrations if m.outcome is Outcome.ABORTED_BY_DESTINATION]
    assert all(m.request_id in ("big-a", "big-b") for m in migrations)


# --- the live llumlet: MigrateOut.max_blocks reaches the selection (two in-process llumlets, real gRPC, sim engines).
LR = common_pb2.MIGRATION_SELECTION_LR


def _order(src: Node, dst: Node, max_blocks: int, selection: int = LR) -> llumlet_pb2.MigrateOutRequest:
    order = migrate(src, dst, selection=selection)
    order.max_blocks = max_blocks
    return order


async def test_migrate_out_with_nothing_fitting_starts_nothing(sink: RecordingSink) -> None:
    """The running request holds 7 blocks (needs 8 with growth): a room of 7 takes nothing, the answer is empty and
    the source's slot is free again at once (the next order, without a limit, moves it). Old: it was migrated into
    any room (the destination then refused it when it did not fit)."""
    a, b = await make_node("a"), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 100, 200))
        await wait_tokens(sink, "r", 1)
        reply = await a.stub.MigrateOut(_order(a, b, 7))
        assert list(reply.results) == [] and not a.coordinator.busy
        assert engine_phase(a, "r") == "RUNNING" and b.free == b.engine.total_blocks
        moved = (await a.stub.MigrateOut(_order(a, b, 8))).results
        assert [(m.request_id, m.outcome) for m in moved] == [("r", OUTCOME.MIGRATION_OUTCOME_COMMITTED)]
        await sink.wait("r")
        assert_stream_exact(sink, "r")
        assert sink.tokens("r") == unmigrated_tokens(100, 200)
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_an_order_without_wait_names_only_a_migration_that_starts(sink: RecordingSink) -> None:
    """``wait=False`` answers when a migration starts: with nothing fitting the room the answer names none and the
    slot is free at once; with room it names the migration, which then commits. Old: the first answer named a
    migration id although nothing was ever migrated."""
    a, b = await make_node("a"), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 100, 200))
        await wait_tokens(sink, "r", 1)
        order = _order(a, b, 7)
        order.wait = False
        reply = await a.stub.MigrateOut(order)
        assert list(reply.migration_ids) == [] and list(reply.results) == [] and not a.coordinator.busy
        order.max_blocks = 8
        (mid,) = (await a.stub.MigrateOut(order)).migration_ids
        await sink.wait("r")
        assert_stream_exact(sink, "r")
        assert sink.tokens("r") == unmigrated_tokens(100, 200)
        assert {o.instance_id for o in sink.outputs["r"]} == {"a", "b"} and mid.startswith("a-")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_migrate_out_picks_the_request_that_fits(sink: RecordingSink) -> None:
    """LR picks the 19-block request without a limit; with a room of 10 it takes the 4-block one. Old: the 19-block
    one whatever the room."""
    a, b = await make_node("a"), await make_node("b")
    try:
        await a.stub.AddRequest(request("big", sink, 300, 150))
        await a.stub.AddRequest(request("small", sink, 50, 150))
        await wait_tokens(sink, "big", 1)
        await wait_tokens(sink, "small", 1)
        results = (await a.stub.MigrateOut(_order(a, b, 10))).results
        assert [(m.request_id, m.outcome) for m in results] == [("small", OUTCOME.MIGRATION_OUTCOME_COMMITTED)]
        assert engine_phase(a, "big") == "RUNNING" and engine_phase(b, "small") == "RUNNING"
        for rid, prompt in (("big", 300), ("small", 50)):
            await sink.wait(rid)
            assert_stream_exact(sink, rid)
            assert sink.tokens(rid) == unmigrated_tokens(prompt, 150)
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_a_negative_room_is_refused(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 50, 20))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.stub.MigrateOut(_order(a, b, -1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_blocks" in (err.value.details() or "")
        await sink.wait("r")
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
    finally:
        await a.close()
        await b.close()


class _CapturingLlumlet:
    def __init__(self) -> None:
        self.orders: list[llumlet_pb2.MigrateOutRequest] = []

    async def MigrateOut(
        self, request: llumlet_pb2.MigrateOutRequest, *, timeout: float, metadata: Any
    ) -> llumlet_pb2.MigrateOutResponse:
        self.orders.append(request)
        return llumlet_pb2.MigrateOutResponse()


async def test_the_scheduler_sends_the_room_with_the_order() -> None:
    """Old: the MigrateOut order had no room, whatever the pairing knew."""
    replica, _ = make_replica(("a", "c"), [])
    replica.leadership = cast(Any, FakeLeadership())
    stub = _CapturingLlumlet()
    replica._llumlet = lambda instance_id: cast(Any, stub)  # type: ignore[method-assign]
    await replica._order_migration(MigrateOrder("a", "c", Selection.LR, 123))
    assert [(o.destination_instance_id, o.selection, o.max_blocks) for o in stub.orders] == [("c", LR, 123)]
