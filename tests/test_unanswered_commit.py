"""A migration commit that the destination applied but whose answer never reached the source (REVIEW12).

The source cannot tell "installed" from "not installed" when every commit ask fails without an answer. Before, it
resumed the request and told the destination to abort, which an installed request ignores: both instances ran it and
both pushed, so a frontend could splice two continuations into one stream. Now the source asks the request's frontend
(TakeBack), the one place that knows whether the destination pushed: the request runs on exactly one instance, every
token index reaches the frontend once, and both instances end with every block free.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings
from pyllumnix.data_plane.llumlet.service import MigrationError
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import Node, make_node, migrate, request, settle, unmigrated_tokens, wait_tokens

OUTCOME = llumlet_pb2.MigrationOutcome


async def _run(
    sink: RecordingSink, *, destination_pushes_first: bool
) -> tuple[Node, Node, llumlet_pb2.MigrationResult]:
    """Migrates request "r" from a to b, b's commit installing the request and then losing every answer. With
    ``destination_pushes_first`` the answer is lost only once b has pushed the request's next tokens; otherwise b's
    outputs reach the frontend a second late (a slow link), so b has not pushed when the source asks."""
    a = await make_node("a", settings=MigrationSettings(verify_crc=True, transfer_timeout_s=1.0))
    b = await make_node("b")
    real_commit = b.coordinator.commit

    async def installed_then_lost(req: llumlet_pb2.CommitMigrationRequest) -> llumlet_pb2.CommitMigrationResponse:
        await real_commit(req)  # b installs (a repeated commit is answered with the same decision) ...
        if destination_pushes_first:
            for _ in range(2000):
                if any(o.instance_id == "b" and o.token_ids for o in sink.outputs.get("r", [])):
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("b never pushed for r")
        raise MigrationError(
            grpc.StatusCode.UNAVAILABLE, "connection reset after the install"
        )  # ... the answer is lost

    b.coordinator.commit = installed_then_lost  # type: ignore[method-assign,assignment]
    late: list[tuple[Any, ...]] = []  # b's outputs on their way (see below)
    if not destination_pushes_first:
        real_submit, loop = b.llumlet.pusher.submit, asyncio.get_running_loop()

        def deliver(*args: Any, **kwargs: Any) -> None:
            late.remove(args)
            real_submit(*args, **kwargs)

        def delay(*args: Any, **kwargs: Any) -> None:
            late.append(args)
            loop.call_later(1.0, lambda: deliver(*args, **kwargs))

        b.llumlet.pusher.submit = delay  # type: ignore[method-assign]
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 5)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        await sink.wait("r", timeout=60)
        await settle(a, b)
        for _ in range(400):  # b's late outputs reach the frontend (or are refused there) before anything is judged
            if not late:
                break
            await asyncio.sleep(0.01)
        await b.llumlet.pusher.drain(5.0)
        for _ in range(400):  # the refused copy is aborted when its refused push is answered
            if not a.engine.request_ids() and not b.engine.request_ids():
                break
            await asyncio.sleep(0.01)
    except BaseException:
        await a.close()
        await b.close()
        raise
    return a, b, result


def _check_ran_once(sink: RecordingSink, a: Node, b: Node, holder: str) -> None:
    raw = sink.raw_indices("r")
    assert raw == list(range(300)), f"{len(raw) - len(set(raw))} token indices pushed twice (two instances ran r)"
    assert sink.tokens("r") == unmigrated_tokens(20, 300)
    late = {o.instance_id for o in sink.outputs["r"][-3:]}
    assert late == {holder}, f"the request ended on {late}, expected {holder}"
    for node in (a, b):
        assert not node.engine.request_ids(), f"{node.llumlet.instance_id} still holds {node.engine.request_ids()}"
        assert node.free == node.engine.total_blocks, f"{node.llumlet.instance_id} leaked blocks"


async def test_the_source_takes_the_request_back_when_the_destination_has_not_pushed(sink: RecordingSink) -> None:
    a, b, result = await _run(sink, destination_pushes_first=False)
    try:
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, OUTCOME.Name(result.outcome)
        assert "3 times" in result.reason
        _check_ran_once(sink, a, b, "a")
    finally:
        await a.close()
        await b.close()


async def test_the_source_releases_the_request_when_the_destination_already_pushed(sink: RecordingSink) -> None:
    a, b, result = await _run(sink, destination_pushes_first=True)
    try:
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, (OUTCOME.Name(result.outcome), result.reason)
        _check_ran_once(sink, a, b, "b")
    finally:
        await a.close()
        await b.close()


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused")


async def _never_installed(sink: RecordingSink, frontend_silent_s: float) -> tuple[Node, Node, Any]:
    """r's commit never reaches b (its calls fail at once) and, for ``frontend_silent_s`` from the migration's start,
    neither does a's TakeBack: a short blip of the source's network (REVIEW13), or a long one."""
    a = await make_node("a", settings=MigrationSettings(verify_crc=True, transfer_timeout_s=1.0))
    b = await make_node("b")

    async def lost(req: llumlet_pb2.CommitMigrationRequest) -> llumlet_pb2.CommitMigrationResponse:
        raise MigrationError(grpc.StatusCode.UNAVAILABLE, "connection refused")

    b.coordinator.commit = lost  # type: ignore[method-assign,assignment]
    real_take_back, silent_until = a.llumlet.take_back, [0.0]

    async def take_back(*args: Any, **kwargs: Any) -> None:
        if time.monotonic() < silent_until[0]:
            raise _unavailable()
        await real_take_back(*args, **kwargs)

    a.llumlet.take_back = take_back  # type: ignore[method-assign]
    await a.stub.AddRequest(request("r", sink, 20, 300))
    await wait_tokens(sink, "r", 5)
    silent_until[0] = time.monotonic() + frontend_silent_s
    result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
    return a, b, result


async def test_a_short_blip_of_the_sources_network_keeps_the_request_on_the_source(sink: RecordingSink) -> None:
    """REVIEW13: commit and take-back asks failing at once for 0.8 s (a blip): the source keeps asking the frontend,
    is given the request back and resumes it. Before, three fast take-back asks failed and it released the request,
    which then ran nowhere until the frontend's idle timeout."""
    a, b, result = await _never_installed(sink, 0.8)
    try:
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, (
            OUTCOME.Name(result.outcome),
            result.reason,
        )
        await sink.wait("r", timeout=60)
        await settle(a, b)
        _check_ran_once(sink, a, b, "a")
    finally:
        await a.close()
        await b.close()


async def test_a_frontend_unreachable_past_the_budget_gets_a_clear_error(
    sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the destination nor the frontend answers for longer than TAKE_BACK_BUDGET_S: the source cannot know
    where the request runs, so it releases it (never two instances) and queues a final ERROR the frontend takes
    while the destination has not pushed: the client learns of it at once, not at the idle timeout."""
    monkeypatch.setattr("pyllumnix.data_plane.llumlet.migration.coordinator.TAKE_BACK_BUDGET_S", 0.5)
    a, b, result = await _never_installed(sink, 30.0)
    try:
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, OUTCOME.Name(result.outcome)
        assert "did not answer within 0.5 s" in result.reason, result.reason
        last = (await sink.wait("r", timeout=10))[-1]
        assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_ERROR and "neither b nor" in last.error
        await settle(a, b)
        for node in (a, b):
            assert not node.engine.request_ids() and node.free == node.engine.total_blocks
    finally:
        await a.close()
        await b.close()


async def test_a_close_while_the_frontend_is_asked_releases_the_request_with_an_error(sink: RecordingSink) -> None:
    """REVIEW14: closing the llumlet while it asks an unreachable frontend to settle an unanswered commit stopped the
    asking by cancellation, and a cancelled migration resumes its request here: a request the destination may run
    too. Now the asking stops at the close and ends as past the budget: released, with its final ERROR queued."""
    a, b = (
        await make_node("a", settings=MigrationSettings(verify_crc=True, transfer_timeout_s=1.0)),
        await make_node("b"),
    )

    async def lost(req: llumlet_pb2.CommitMigrationRequest) -> llumlet_pb2.CommitMigrationResponse:
        raise MigrationError(grpc.StatusCode.UNAVAILABLE, "connection refused")

    asked = asyncio.Event()

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        asked.set()
        raise _unavailable()

    b.coordinator.commit = lost  # type: ignore[method-assign,assignment]
    a.llumlet.take_back = unreachable  # type: ignore[method-assign]
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 5)
        migration = asyncio.ensure_future(a.stub.MigrateOut(migrate(a, b, "r")))
        await asyncio.wait_for(asked.wait(), 10)
        started = time.monotonic()
        await a.coordinator.close()
        assert time.monotonic() - started < 5.0, "close waited out the take-back budget"
        last = (await sink.wait("r", timeout=10))[-1]
        assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_ERROR, last
        assert "r" not in a.engine.request_ids(), "the request was resumed on the closing source"
        migration.cancel()  # its answer does not matter here (the coordinator it waits on is closed)
    finally:
        await a.close()
        await b.close()
