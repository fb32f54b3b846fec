"""Live migration between two in-process llumlets (real gRPC servers, real sim engines with payload, the in-process
transport with a modelled cost): KV bytes and token streams on success, and every abort path leak-free."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from pyllumnix.control_plane.grpc_server import RunningServer, start_server
from pyllumnix.data_plane.engine.base import MigrationState, RequestSpec, Sampling
from pyllumnix.data_plane.engine.payload import expected_block_bytes
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator, MigrationSettings
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.data_plane.transport.inproc import InprocTransport
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink

OUTCOME = llumlet_pb2.MigrationOutcome


@dataclass
class Node:
    llumlet: Llumlet
    coordinator: MigrationCoordinator
    server: RunningServer
    transport: InprocTransport
    engine: SimEngine
    stub: llumlet_pb2_grpc.LlumletServiceStub
    channel: grpc.aio.Channel

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await self.coordinator.close()
        await self.llumlet.stop()
        await self.transport.close()

    @property
    def free(self) -> int:
        return self.engine.load().free_blocks


class Delay:
    """A mutable per-chunk transfer cost, so a test can slow a stage down while it runs."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def __call__(self, nbytes: int) -> float:
        return self.seconds


async def make_node(
    name: str,
    *,
    delay: Callable[[int], float] | None = None,
    settings: MigrationSettings | None = None,
    total_blocks: int | None = None,
) -> Node:
    max_len = min(512, total_blocks * 16) if total_blocks else None
    engine = SimEngine("tiny", total_blocks=total_blocks, max_model_len=max_len)
    llumlet = Llumlet(engine, name)
    transport = InprocTransport(cost_fn=delay)
    await transport.start()
    coordinator = MigrationCoordinator(llumlet, transport, settings or MigrationSettings(verify_crc=True))
    server = await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, LlumletServicer(llumlet, coordinator), SERVICE_NAME)]
    )
    llumlet.start()
    coordinator.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Node(llumlet, coordinator, server, transport, engine, llumlet_pb2_grpc.LlumletServiceStub(channel), channel)


def request(rid: str, sink: RecordingSink, prompt_len: int, max_tokens: int) -> llumlet_pb2.AddRequestRequest:
    assert sink.server is not None
    return llumlet_pb2.AddRequestRequest(
        request=common_pb2.EngineRequest(
            request_id=rid,
            prompt_token_ids=[(7 * i) % 250 + 1 for i in range(prompt_len)],
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=11, ignore_eos=True),
            frontend_address=sink.server.address,
        )
    )


def unmigrated_tokens(prompt_len: int, max_tokens: int) -> list[int]:
    engine = SimEngine("tiny", payload=False)
    spec = RequestSpec(
        "x", tuple((7 * i) % 250 + 1 for i in range(prompt_len)), Sampling(max_tokens, seed=11, ignore_eos=True)
    )
    engine.add_request(spec, 0.0)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step(0.0).outputs:
            tokens.extend(out.token_ids)
    return tokens


def migrate(
    src: Node, dst: Node, rid: str = "", *, wait: bool = True, selection: int = 0
) -> llumlet_pb2.MigrateOutRequest:
    return llumlet_pb2.MigrateOutRequest(
        destination_instance_id=dst.llumlet.instance_id,
        destination_grpc_address=dst.server.address,
        request_id=rid,
        selection=selection,  # type: ignore[arg-type]
        wait=wait,
    )


async def wait_tokens(sink: RecordingSink, rid: str, n: int) -> None:
    for _ in range(2000):
        if len(sink.tokens(rid)) >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{rid} did not reach {n} tokens")


async def settle(*nodes: Node) -> None:
    """Waits until every engine is idle and no migration is in flight."""
    for _ in range(2000):
        if all(not n.engine.has_work() and not n.coordinator.busy for n in nodes):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("nodes did not settle")


@pytest.mark.parametrize("progress", [1, 40, 150])
async def test_migration_moves_kv_bytes_and_keeps_the_token_stream(sink: RecordingSink, progress: int) -> None:
    a, b = await make_node("a"), await make_node("b")
    try:
        base = (a.free, b.free)
        await a.stub.AddRequest(request("r", sink, 100, 250))
        await wait_tokens(sink, "r", progress)
        captured: dict[str, object] = {}
        original_commit = b.engine.commit_incoming

        def spy(state: MigrationState, block_ids: Sequence[int], now: float) -> None:
            # the destination's bytes, right before it resumes the request, against the deterministic KV content
            captured["blocks"] = b.engine.read_blocks(block_ids)
            captured["tokens"] = state.num_computed_tokens
            original_commit(state, block_ids, now)

        b.engine.commit_incoming = spy  # type: ignore[method-assign]
        reply = await a.stub.MigrateOut(migrate(a, b, "r"))
        result = reply.results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert result.stages >= 1 and result.downtime_ms > 0 and result.bytes_sent > 0
        blocks = captured["blocks"]
        assert isinstance(blocks, np.ndarray)
        n_tokens = int(captured["tokens"])  # type: ignore[call-overload]
        for i in range(blocks.shape[0]):
            expected = expected_block_bytes("r", i, n_tokens, block_size=16, bytes_per_token=2048)
            assert np.array_equal(blocks[i], expected), f"block {i} differs"
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(100, 250)
        assert sink.raw_indices("r") == list(range(250)), "no token pushed twice, none missing"
        assert {o.instance_id for o in sink.outputs["r"]} == {"a", "b"}
        await settle(a, b)
        assert (a.free, b.free) == base
    finally:
        await a.close()
        await b.close()


async def test_waiting_request_migrates_without_kv(sink: RecordingSink) -> None:
    a, b = await make_node("a", total_blocks=12), await make_node("b")
    try:
        await a.stub.AddRequest(request("big", sink, 150, 30))  # 10 blocks: blocks the queue behind it
        await a.stub.AddRequest(request("queued", sink, 60, 20))
        await asyncio.sleep(0.01)
        reply = await a.stub.MigrateOut(migrate(a, b, selection=common_pb2.MIGRATION_SELECTION_FCW))
        assert reply.results[0].request_id == "queued"
        assert reply.results[0].outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED
        assert reply.results[0].bytes_sent == 0
        await sink.wait("queued")
        assert sink.tokens("queued") == unmigrated_tokens(60, 20)
        assert {o.instance_id for o in sink.outputs["queued"]} == {"b"}
        await sink.wait("big")
        await settle(a, b)
        assert a.free == 12 and b.free == b.engine.total_blocks
    finally:
        await a.close()
        await b.close()


async def test_source_abort_when_request_finishes_during_migration(sink: RecordingSink) -> None:
    delay = Delay(0.3)
    a, b = await make_node("a", delay=delay), await make_node("b")
    try:
        await a.stub.AddRequest(request("short", sink, 200, 40))
        await wait_tokens(sink, "short", 1)
        reply = await a.stub.MigrateOut(migrate(a, b, "short"))
        result = reply.results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert "finished" in result.reason
        await sink.wait("short")
        assert sink.tokens("short") == unmigrated_tokens(200, 40)
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_source_abort_when_client_aborts_during_precopy(sink: RecordingSink) -> None:
    delay = Delay(0.3)
    a, b = await make_node("a", delay=delay), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        migration = asyncio.ensure_future(a.stub.MigrateOut(migrate(a, b, "r")))
        await asyncio.sleep(0.1)
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        result = (await migration).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        outs = await sink.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_client_abort_during_last_stage_reaches_the_destination(sink: RecordingSink) -> None:
    delay = Delay(0.3)
    a, b = await make_node("a", delay=delay), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 20, 400))  # 2 blocks: one (last) stage, suspended throughout
        await wait_tokens(sink, "r", 1)
        migration = asyncio.ensure_future(a.stub.MigrateOut(migrate(a, b, "r")))
        await asyncio.sleep(0.1)
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        result = (await migration).results[0]
        outs = await sink.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert result.outcome in (OUTCOME.MIGRATION_OUTCOME_COMMITTED, OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE)
        assert len(sink.tokens("r")) < 400
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_source_abort_when_request_is_preempted(sink: RecordingSink) -> None:
    delay = Delay(0.4)
    a, b = await make_node("a", delay=delay, total_blocks=30), await make_node("b")
    try:
        await a.stub.AddRequest(request("old", sink, 180, 300))  # 12 blocks, grows
        await wait_tokens(sink, "old", 1)
        await a.stub.AddRequest(request("new", sink, 180, 300))  # most recent: the preemption victim
        await wait_tokens(sink, "new", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "new"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, result.reason
        for rid in ("old", "new"):
            await sink.wait(rid, timeout=60)
            assert sink.tokens(rid) == unmigrated_tokens(180, 300)
        await settle(a, b)
        assert (a.free, b.free) == (30, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_source_gives_up_when_stages_do_not_converge(sink: RecordingSink) -> None:
    delay = Delay(0.15)
    settings = MigrationSettings(limits=MigrationLimits(last_stage_max_blocks=1, max_stages=1))
    a, b = await make_node("a", delay=delay, settings=settings), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert "convergence" in result.reason
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 400)
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_destination_refuses_without_blocks_slot_or_when_cordoned(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b", total_blocks=32)
    try:
        await b.stub.AddRequest(request("filler", sink, 350, 150))  # 22 blocks: b keeps fewer than 13 free
        await a.stub.AddRequest(request("r", sink, 200, 200))  # 13+ blocks: more than b has free
        await wait_tokens(sink, "r", 2)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert "RESOURCE_EXHAUSTED" in result.reason
        await b.stub.SetInstanceState(llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_CORDONED))
        await a.stub.AddRequest(request("small", sink, 20, 200))
        result = (await a.stub.MigrateOut(migrate(a, b, "small"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert "FAILED_PRECONDITION" in result.reason
        await b.stub.SetInstanceState(llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_ACTIVE))
        # a second migration into b while one holds its only in-slot is refused (ABORTED)
        c = await make_node("c", delay=Delay(0.3))
        try:
            await c.stub.AddRequest(request("c1", sink, 20, 300))
            await wait_tokens(sink, "c1", 1)
            first = asyncio.ensure_future(c.stub.MigrateOut(migrate(c, b, "c1")))
            await asyncio.sleep(0.1)
            second = (await a.stub.MigrateOut(migrate(a, b, "small"))).results[0]
            assert second.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
            assert "ABORTED" in second.reason
            assert (await first).results[0].outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED
            for rid, p, n in (("r", 200, 200), ("small", 20, 200), ("c1", 20, 300), ("filler", 350, 150)):
                await sink.wait(rid, timeout=60)
                assert sink.tokens(rid) == unmigrated_tokens(p, n)
            await settle(a, b, c)
            assert c.free == c.engine.total_blocks
        finally:
            await c.close()
        assert (a.free, b.free) == (a.engine.total_blocks, 32)
    finally:
        await a.close()
        await b.close()


async def test_destination_abort_when_transfer_times_out(sink: RecordingSink) -> None:
    a = await make_node("a", delay=Delay(1.0))
    b = await make_node("b", settings=MigrationSettings(transfer_timeout_s=0.3))
    try:
        await a.stub.AddRequest(request("r", sink, 100, 300))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, result.reason
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 300)
        assert sink.raw_indices("r") == list(range(300))
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_destination_abort_when_commit_fails(sink: RecordingSink) -> None:
    a, b = await make_node("a", delay=Delay(0.3)), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))  # 2 blocks: one stop-and-copy stage
        await wait_tokens(sink, "r", 1)
        migration = asyncio.ensure_future(a.stub.MigrateOut(migrate(a, b, "r")))
        await asyncio.sleep(0.1)
        # the same id arrives at the destination directly while the stages run: the commit must fail
        await b.stub.AddRequest(request("r", sink, 10, 400))
        result = (await migration).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert "commit" in result.reason
        await b.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_bad_migrate_out_orders_change_nothing(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 50, 100))
        cases = [
            (migrate(a, a, "r"), grpc.StatusCode.INVALID_ARGUMENT),
            (migrate(a, b, "nope"), grpc.StatusCode.NOT_FOUND),
            (
                llumlet_pb2.MigrateOutRequest(destination_instance_id="x", request_id="r"),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]
        for order, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await a.stub.MigrateOut(order)
            assert err.value.code() == code
        dead = llumlet_pb2.MigrateOutRequest(
            destination_instance_id="dead", destination_grpc_address="127.0.0.1:1", request_id="r", wait=True
        )
        result = (await a.stub.MigrateOut(dead)).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert "UNAVAILABLE" in result.reason
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(50, 100)
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()
