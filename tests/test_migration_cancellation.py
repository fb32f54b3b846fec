"""Migration calls whose caller stops waiting (ATTACK10 F1, F1b, F3, L2): real gRPC servers and sim engines.

The destination's engine lock is held by its step loop for a whole step, so a migration call can wait there past
its caller's deadline, or its caller can go away (a source shutting down). Whatever the caller does, the destination
must end with the request installed once or with nothing reserved, and the request must live on exactly one
instance: its stream is token-exact, each index once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings
from pyllumnix.protos.llumnix.v1 import frontend_pb2, llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import (
    Hooks,
    Node,
    make_node,
    migrate,
    request,
    settle,
    unmigrated_tokens,
    until,
    wait_tokens,
)

OUTCOME = llumlet_pb2.MigrationOutcome


def hold_lock(node: Node, seconds: float) -> asyncio.Event:
    """Holds ``node``'s engine lock for ``seconds`` from now (one long step, or a CPU stall); set once it is held."""
    held = asyncio.Event()

    async def hold() -> None:
        async with node.llumlet.engine_lock:
            held.set()
            await asyncio.sleep(seconds)

    keep(asyncio.get_running_loop().create_task(hold()))
    return held


_KEPT: set[asyncio.Task[Any]] = set()


def keep(task: asyncio.Task[Any]) -> None:
    """Holds a reference to a background task until it ends (the loop keeps only weak ones)."""
    _KEPT.add(task)
    task.add_done_callback(_KEPT.discard)


async def assert_clean(node: Node) -> None:
    """Nothing reserved, no migration entry, no slot, not busy (the destination exits a drain)."""
    await until(lambda: not node.coordinator.busy, f"{node.llumlet.instance_id} to end its migrations", timeout=10)
    assert not node.coordinator._incoming
    assert node.engine.load().reserved_blocks == 0


def assert_exactly_once(sink: RecordingSink, rid: str, prompt_len: int, max_tokens: int) -> None:
    assert sink.tokens(rid) == unmigrated_tokens(prompt_len, max_tokens)
    assert sink.raw_indices(rid) == list(range(max_tokens))


@pytest.mark.parametrize("hold", [0.998, 1.0, 1.6])
async def test_a_commit_answered_after_the_sources_deadline_installs_the_request_once(
    sink: RecordingSink, hold: float
) -> None:
    """The destination's step outlasts the commit call's 1 s deadline. Before: the handler was cancelled in the
    install (1.6 s: b stuck INSTALLING for good, blocks, slot and the migrating flag leaked) or just after it (about
    1 s: a resumed the request while b ran it too). Now the install finishes regardless and the source, asking
    again, learns that it happened: the request moves to b once."""
    a = await make_node("a", settings=MigrationSettings(verify_crc=True, transfer_timeout_s=1.0))
    b = await make_node("b", settings=MigrationSettings(verify_crc=True, pending_timeout_s=1.0))

    async def busy_destination() -> None:
        await hold_lock(b, hold).wait()

    a.coordinator.hooks = hooks = Hooks({("before_commit", 1): busy_destination})
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert "r" not in a.engine.request_ids()
        await sink.wait("r", timeout=60)
        assert_exactly_once(sink, "r", 20, 300)
        assert sink.outputs["r"][-1].instance_id == "b"
        await settle(a, b)
        await assert_clean(b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_a_commit_the_destination_never_answered_leaves_the_request_on_the_source(sink: RecordingSink) -> None:
    """The destination's step outlasts all the source's commit calls (3 x 0.3 s): the source gives up, tells the
    destination and resumes the request. The install, still waiting for the engine, must then not run: before, it
    ran after the source's abort (ignored while installing) and the request ran on both instances."""
    a = await make_node("a", settings=MigrationSettings(verify_crc=True, transfer_timeout_s=0.3))
    b = await make_node("b", settings=MigrationSettings(verify_crc=True, pending_timeout_s=5.0))

    async def busy_destination() -> None:
        await hold_lock(b, 2.0).wait()

    a.coordinator.hooks = hooks = Hooks({("before_commit", 1): busy_destination})
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason.startswith("commit: ") and result.reason.endswith(" (3 times)"), result.reason
        await assert_clean(b)  # after the 2 s step: the install saw the abort and freed
        assert "r" not in b.engine.request_ids()
        await sink.wait("r", timeout=60)
        assert_exactly_once(sink, "r", 20, 300)
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
        assert b.free == b.engine.total_blocks
    finally:
        await a.close()
        await b.close()


async def test_a_source_shutting_down_during_its_commit_hands_the_request_over(sink: RecordingSink) -> None:
    """The source closes (SIGTERM, scale-down) while its commit waits for one 0.3 s destination step. Before: the
    cancelled call cancelled the destination's install half-way: b stuck INSTALLING for ever. Now b installs, and
    the closing source waits for that answer and releases the request instead of resuming it."""
    a = await make_node("a")
    b = await make_node("b", settings=MigrationSettings(verify_crc=True, pending_timeout_s=1.0))

    async def busy_destination_then_close_source() -> None:
        held = hold_lock(b, 0.3)

        async def close_source() -> None:
            await asyncio.sleep(0.1)
            await a.coordinator.close()

        keep(asyncio.get_running_loop().create_task(close_source()))
        await held.wait()

    a.coordinator.hooks = hooks = Hooks({("before_commit", 1): busy_destination_then_close_source})
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 1)
        await a.stub.MigrateOut(migrate(a, b, "r", wait=False))
        await until(lambda: bool(a.coordinator.results), "the migration to end", timeout=10)
        hooks.assert_all_ran()
        result = a.coordinator.results[-1]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert "r" not in a.engine.request_ids()
        await sink.wait("r", timeout=60)
        assert_exactly_once(sink, "r", 20, 300)
        await settle(b)
        await assert_clean(b)
        assert b.free == b.engine.total_blocks
    finally:
        await a.close()
        await b.close()


async def test_an_abort_answered_after_the_sources_deadline_still_frees_the_destination(sink: RecordingSink) -> None:
    """The client aborts mid pre-copy while the destination is in one 2.5 s step, past AbortMigration's 2 s
    deadline. Before: the cancelled handler never freed the reservation nor closed the entry (6 blocks and the slot
    leaked for good, the reaper ignored the closed entry). Now the free completes after the step."""
    a = await make_node("a")
    b = await make_node("b", settings=MigrationSettings(verify_crc=True, pending_timeout_s=1.0))

    async def busy_destination_and_abort() -> None:
        await hold_lock(b, 2.5).wait()
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))

    a.coordinator.hooks = hooks = Hooks({("before_stage", 1): busy_destination_and_abort})
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))  # 7 blocks: stage 0 is a pre-copy stage
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, result.reason
        await assert_clean(b)
        assert b.free == b.engine.total_blocks
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("install", ["blocks", "raises"])
async def test_an_install_that_never_completes_gives_its_blocks_and_slot_back(
    sink: RecordingSink, install: str, caplog: pytest.LogCaptureFixture
) -> None:
    """FIXD: b's install never completes (it blocks, or it raises). The source gives up on its commit and resumes
    the request; b's entry stays INSTALLING, which the source's abort and silence do not end. Before: its blocks,
    its max_in slot and its migrating flag leaked for good. Now the reaper collects it past the pending timeout plus
    the transfer timeout, with a WARNING."""
    a = await make_node("a", settings=MigrationSettings(verify_crc=True, transfer_timeout_s=0.3))
    b = await make_node("b", settings=MigrationSettings(verify_crc=True, pending_timeout_s=1.0, transfer_timeout_s=0.5))
    entered = asyncio.Event()

    async def stuck_install(incoming: Any, block_ids: Any) -> Any:
        entered.set()
        if install == "raises":
            raise RuntimeError("engine refused the install")
        await asyncio.Event().wait()  # a hook that never returns

    b.coordinator._install = stuck_install  # type: ignore[method-assign]
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert entered.is_set()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, result.reason
        assert b.free < b.engine.total_blocks and b.coordinator._in_slots.held  # held while installing
        await assert_clean(b)
        assert b.free == b.engine.total_blocks and not b.coordinator._in_slots.held
        assert any("stuck installing" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        await sink.wait("r", timeout=60)
        assert_exactly_once(sink, "r", 20, 300)
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
    finally:
        await a.close()
        await b.close()


async def test_a_closed_entry_whose_free_failed_is_collected_with_its_blocks(
    sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    """FIXD: the client aborts mid pre-copy and b's free of the reservation fails once (an engine error): the step
    ended between the close and the entry's removal. Before: the CLOSED entry and its 7 blocks stayed for good (the
    reaper skipped closed entries). Now the reaper frees them and drops the entry, with a WARNING."""
    a = await make_node("a")
    b = await make_node("b", settings=MigrationSettings(verify_crc=True, pending_timeout_s=1.0, transfer_timeout_s=0.5))
    real_free = b.engine.free_reserved
    failures: list[tuple[int, ...]] = []

    def failing_once(block_ids: Any) -> None:
        if not failures:
            failures.append(tuple(block_ids))
            raise RuntimeError("engine error while freeing")
        real_free(block_ids)

    b.engine.free_reserved = failing_once  # type: ignore[method-assign]

    async def abort() -> None:
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))

    a.coordinator.hooks = hooks = Hooks({("before_stage", 1): abort})
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))  # 7 blocks: stage 0 is a pre-copy stage
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, result.reason
        assert failures and b.free < b.engine.total_blocks
        await assert_clean(b)
        assert b.free == b.engine.total_blocks and not b.coordinator._in_slots.held
        assert any("stuck closed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    finally:
        await a.close()
        await b.close()


class StallingSink(RecordingSink):
    """Answers pushes only after ``stall_until`` (a frontend slow to acknowledge)."""

    stall_until = 0.0

    async def PushOutputs(self, request: frontend_pb2.PushOutputsRequest, context: Any) -> Any:
        delay = self.stall_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await super().PushOutputs(request, context)


async def test_a_frontend_slow_to_acknowledge_the_flush_aborts_with_a_clear_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: 'internal error: TimeoutError()' and a logged traceback. Now the reason names the frontend and the
    bound, no traceback, and the request runs on at the source."""
    sink = StallingSink()
    await sink.start()
    a, b = await make_node("a"), await make_node("b")
    pusher = a.llumlet.pusher
    pusher.settings = dataclasses.replace(pusher.settings, flush_timeout_s=1.0)

    async def stall() -> None:
        sink.stall_until = time.monotonic() + 3.0

    a.coordinator.hooks = Hooks({("before_last_stage", 0): stall})
    try:
        await a.stub.AddRequest(request("r", sink, 20, 200))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert sink.server is not None
        assert result.reason == f"frontend {sink.server.address} did not acknowledge outputs within 1 s"
        assert not [r for r in caplog.records if r.exc_info], "a documented flush outcome logged a traceback"
        sink.stall_until = 0.0
        await sink.wait("r", timeout=60)
        assert_exactly_once(sink, "r", 20, 200)
        await assert_clean(b)
    finally:
        sink.stall_until = 0.0
        await a.close()
        await b.close()
        await sink.stop()


async def test_close_is_bounded_when_the_engine_never_gives_its_lock_back(
    sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REVIEW12: shutdown closes the coordinator before the llumlet; freeing an incoming reservation takes the engine
    lock, which a wedged step (a hung device call in its worker thread) never releases. ``close`` waited for it
    without a deadline, so the llumlet's own stop (and its final outputs) was never reached."""
    monkeypatch.setattr("pyllumnix.data_plane.llumlet.migration.coordinator.CLOSE_WAIT_S", 0.5)
    a, b = await make_node("a"), await make_node("b")
    reserved, go_on, wedge = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def park() -> None:  # b holds the first stage's reservation: an incoming entry
        reserved.set()
        await go_on.wait()

    async def wedged_step() -> None:
        async with b.llumlet.engine_lock:
            await wedge.wait()

    a.coordinator.hooks = Hooks({("before_copy", 0): park})
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 1)
        migration = asyncio.ensure_future(a.stub.MigrateOut(migrate(a, b, "r")))
        await asyncio.wait_for(reserved.wait(), 10)
        assert b.coordinator._incoming
        holder = asyncio.ensure_future(wedged_step())
        await until(b.llumlet.engine_lock.locked, "the wedged step to hold b's engine")
        started = time.monotonic()
        await asyncio.wait_for(b.coordinator.close(), 10)
        assert time.monotonic() - started < 3.0, "close waited for the engine lock"
        wedge.set()
        go_on.set()
        await holder
        await asyncio.wait([migration], timeout=10)
    finally:
        wedge.set()
        go_on.set()
        await a.close()
        await b.close()
