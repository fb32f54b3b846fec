"""With ``--max-out`` > 1 a source runs several migrations at once, but a request moves in one of them only: an order
naming a request already migrating out is refused up front, and a selection skips the requests other orders took.
Before, both migrations ran (reserving on the destination, copying) until one found the request suspended by the
other and aborted (session 10's leftover). Real gRPC servers and sim engines, as in test_migration_paths."""

from __future__ import annotations

import grpc
import pytest

from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings
from pyllumnix.protos.llumnix.v1 import llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import (
    Delay,
    make_node,
    migrate,
    request,
    settle,
    unmigrated_tokens,
    until,
    wait_tokens,
)

OUTCOME = llumlet_pb2.MigrationOutcome


async def test_an_order_for_a_request_already_migrating_out_is_refused_up_front(sink: RecordingSink) -> None:
    slow = Delay(0.02)  # per chunk: the first migration is still copying when the second order comes
    a = await make_node("a", delay=slow, settings=MigrationSettings(verify_crc=True, max_out=2))
    b = await make_node("b", delay=slow)
    try:
        await a.stub.AddRequest(request("r", sink, 100, 300))
        await wait_tokens(sink, "r", 1)
        first = await a.stub.MigrateOut(migrate(a, b, "r", wait=False))
        assert len(first.migration_ids) == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await a.stub.MigrateOut(migrate(a, b, "r", wait=False))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == "request r is already migrating out of a"
        await until(lambda: len(a.coordinator.results) == 1, "the first migration to end", timeout=30)
        assert a.coordinator.results[0].outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, a.coordinator.results[0]
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 300)
        # The claim is released with the migration: the request can move on (here: back from b; a is free again).
        assert not a.coordinator._claimed_out
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_concurrent_selections_take_different_requests(sink: RecordingSink) -> None:
    slow = Delay(0.02)
    a = await make_node("a", delay=slow, settings=MigrationSettings(verify_crc=True, max_out=2))
    b = await make_node("b", delay=slow, settings=MigrationSettings(verify_crc=True, max_in=2))
    try:
        for rid in ("r1", "r2"):
            await a.stub.AddRequest(request(rid, sink, 100, 300))
        for rid in ("r1", "r2"):
            await wait_tokens(sink, rid, 1)
        first = await a.stub.MigrateOut(migrate(a, b, wait=False))
        second = await a.stub.MigrateOut(migrate(a, b, wait=False))
        assert len(first.migration_ids) == len(second.migration_ids) == 1
        await until(lambda: len(a.coordinator.results) == 2, "both migrations to end", timeout=30)
        results = a.coordinator.results
        assert {r.request_id for r in results} == {"r1", "r2"}, [(r.request_id, r.reason) for r in results]
        assert all(r.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED for r in results), [r.reason for r in results]
        for rid in ("r1", "r2"):
            await sink.wait(rid, timeout=60)
            assert sink.tokens(rid) == unmigrated_tokens(100, 300)
        await settle(a, b)
        assert not a.coordinator._claimed_out
    finally:
        await a.close()
        await b.close()


async def test_an_order_cancelled_before_it_ran_gives_its_claim_and_slot_back(sink: RecordingSink) -> None:
    """A migration task cancelled before its first step (the coordinator closing) runs no ``finally``: before, the
    request's claim, the out slot and the migrating-out flag stayed taken (REVIEW11)."""
    a = await make_node("a", settings=MigrationSettings(verify_crc=True, max_out=2))
    b = await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))
        await wait_tokens(sink, "r", 1)
        reply = await a.coordinator.migrate_out(migrate(a, b, "r", wait=False))  # no await inside: not started yet
        assert len(reply.migration_ids) == 1 and a.coordinator._claimed_out
        for task in list(a.coordinator._tasks):
            task.cancel()
        await until(lambda: not a.coordinator._tasks, "the cancelled order to end")
        assert not a.coordinator._claimed_out
        assert not a.coordinator._out_slots.held
        assert not a.llumlet._migrating_out
    finally:
        await a.close()
        await b.close()
