"""The engine lock while a sim step's modelled duration passes (``EngineLock``).

A sim step's state is final once computed; before, the llumlet held the engine lock through the step's modelled
sleep, so every migration handshake on a busy instance waited out the step in progress (a live migration stage cost
~105 ms on the calibrated 7B profile against the paper's ~20 ms). Now ``light()`` users (a destination's reservation
and install, a source's reads) go during that time, and everything else still waits for the step's outputs, so no
output can be overtaken: an abort's final output comes after the tokens of the step it waited for.

Real objects: in-process llumlets with sim engines, a real output sink (gRPC), two llumlets migrating over the
in-process transport. The assertions are about order (what ran while a step was in flight), not durations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pyllumnix.data_plane.engine.base import MigrationState
from pyllumnix.data_plane.engine.profile import TINY, with_overrides
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import EngineLock, Llumlet
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import make_node, migrate, request, settle, unmigrated_tokens, until

OUTCOME = llumlet_pb2.MigrationOutcome
LONG_STEP_MS = 600.0  # a step long enough that the test's calls land inside it on any host


async def test_light_users_go_while_full_ones_wait_for_settled() -> None:
    changed = asyncio.Event()
    lock = EngineLock(changed)
    lock.settled.clear()  # a step's duration is passing
    order: list[str] = []

    async def full() -> None:
        async with lock:
            order.append("full")

    waiter = asyncio.create_task(full())
    await asyncio.sleep(0.01)
    assert not waiter.done() and not lock.locked(), "a full user waits for settled without holding the lock"
    changed.clear()
    async with lock.light():
        order.append("light")
        assert lock.locked()
    assert changed.is_set(), "a light release signals a possible load change like any release"
    lock.settled.set()
    await asyncio.wait_for(waiter, 5)
    assert order == ["light", "full"]
    # a full user that got the lock while a step was being computed steps back until its outputs are out
    async with lock.light():
        again = asyncio.create_task(full())
        await asyncio.sleep(0.01)
        lock.settled.clear()
    await asyncio.sleep(0.01)
    assert not again.done() and not lock.locked()
    lock.settled.set()
    await asyncio.wait_for(again, 5)
    assert order == ["light", "full", "full"]


def _slow_engine(step_ms: float = LONG_STEP_MS) -> SimEngine:
    return SimEngine(with_overrides(TINY, prefill_b_ms=step_ms, decode_c_ms=step_ms))


async def test_a_full_user_waits_for_the_outputs_of_the_step_in_flight_and_a_light_one_does_not(
    sink: RecordingSink,
) -> None:
    llumlet = Llumlet(_slow_engine(), "inst-lock", heartbeat_s=None)
    order: list[str] = []
    llumlet.after_step.append(lambda: order.append("step"))
    llumlet.start()
    try:
        add = request("r", sink, 20, 3).request
        await llumlet.add_request(add)
        lock = llumlet.engine_lock
        await until(lambda: not lock.settled.is_set(), "the first step to be computed")
        steps = llumlet.stats.steps
        async with lock.light():
            order.append("light")
            assert llumlet.stats.steps == steps and not sink.tokens("r"), "inside the step, before its outputs"
        async with lock:
            order.append("full")
            assert llumlet.stats.steps == steps + 1 and lock.settled.is_set()
        assert order == ["light", "step", "full"]
        await sink.wait("r")
        assert sink.raw_indices("r") == [0, 1, 2]
    finally:
        await llumlet.stop()


async def test_an_abort_during_a_modelled_step_ends_after_that_steps_tokens(sink: RecordingSink) -> None:
    llumlet = Llumlet(_slow_engine(), "inst-abort", heartbeat_s=None)
    llumlet.start()
    try:
        await llumlet.add_request(request("r", sink, 20, 50).request)
        lock = llumlet.engine_lock
        await until(lambda: llumlet.stats.steps >= 1 and not lock.settled.is_set(), "a decode step in flight")
        steps = llumlet.stats.steps
        await llumlet.abort_request("r")
        assert llumlet.stats.steps == steps + 1, "the abort waited for the step in flight"
        outs = await sink.wait("r")
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        tokens = sink.raw_indices("r")
        assert tokens == list(range(steps + 1)), "every token of the steps run, the one in flight included, in order"
        # (the pusher may merge the step's token into the final output: contiguous either way)
        assert final.first_token_index + len(final.token_ids) == len(tokens)
        assert final.finish_reason == common_pb2.FINISH_REASON_ABORT
    finally:
        await llumlet.stop()


async def test_a_destination_reserves_and_installs_while_its_own_step_runs(sink: RecordingSink) -> None:
    """The destination is busy with long steps; the migration's reservations and its install happen inside them
    (before: each waited for the step in progress to end), and both token streams stay exact."""
    a, b = await make_node("a"), await make_node("b", engine=_slow_engine(250.0))
    try:
        await b.stub.AddRequest(request("busy", sink, 20, 200))  # b steps throughout the migration
        await until(lambda: not b.llumlet.engine_lock.settled.is_set(), "b's first step in flight")
        await a.stub.AddRequest(request("r", sink, 100, 300))
        await until(lambda: len(sink.tokens("r")) >= 20, "r decoding on a")
        during: list[tuple[str, bool]] = []
        reserve, install = b.engine.reserve_blocks, b.engine.commit_incoming

        def spy_reserve(n: int) -> list[int]:
            during.append(("reserve", not b.llumlet.engine_lock.settled.is_set()))
            return reserve(n)

        def spy_install(state: MigrationState, block_ids: Sequence[int], now: float) -> None:
            during.append(("install", not b.llumlet.engine_lock.settled.is_set()))
            install(state, block_ids, now)

        b.engine.reserve_blocks = spy_reserve  # type: ignore[method-assign]
        b.engine.commit_incoming = spy_install  # type: ignore[method-assign]
        reply = await a.stub.MigrateOut(migrate(a, b, "r"))
        result = reply.results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        b.engine.profile = TINY  # b's remaining steps at the tiny profile's pace: the test need not wait them out
        assert [what for what, _ in during][-1] == "install" and "reserve" in {what for what, _ in during}
        assert all(in_step for _, in_step in during), f"every handshake ran inside b's step: {during}"
        await sink.wait("r", timeout=120)
        await sink.wait("busy", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 300)
        assert sink.raw_indices("r") == list(range(300)) and sink.raw_indices("busy") == list(range(200))
        await settle(a, b)
    finally:
        await a.close()
        await b.close()
