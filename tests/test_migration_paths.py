"""Live migration between two in-process llumlets (real gRPC servers, real sim engines with payload, the in-process
transport with a modelled cost): KV bytes and token streams on success, and every abort path leak-free.

Each abort path is driven to a known stage by a coordinator hook (``MigrationHooks``): the test acts (aborts the
request, stops the destination, waits for a preemption) at that point, asserts the hook ran, and asserts the exact
outcome and reason. A guessed sleep would let the abort land at another stage, testing a different path."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import MigrationState, RequestSpec, Sampling
from pyllumnix.data_plane.engine.payload import expected_block_bytes
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.coordinator import (
    MigrationCoordinator,
    MigrationHooks,
    MigrationSettings,
)
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.data_plane.transport.inproc import InprocTransport
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc
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


Action = Callable[[], Awaitable[None]]


class Hooks(MigrationHooks):
    """Runs one action at each (point, stage) it was given, once; records every point the migration passed."""

    def __init__(self, actions: dict[tuple[str, int], Action] | None = None) -> None:
        self.actions = dict(actions or {})
        self.seen: list[tuple[str, int]] = []
        self.ran: list[tuple[str, int]] = []

    async def _at(self, point: str, stage: int) -> None:
        self.seen.append((point, stage))
        action = self.actions.pop((point, stage), None)
        if action is not None:
            self.ran.append((point, stage))
            await action()

    async def before_stage(self, migration_id: str, request_id: str, stage: int) -> None:
        await self._at("before_stage", stage)

    async def before_last_stage(self, migration_id: str, request_id: str, stage: int) -> None:
        await self._at("before_last_stage", stage)

    async def before_copy(self, migration_id: str, request_id: str, stage: int) -> None:
        await self._at("before_copy", stage)

    async def before_commit(self, migration_id: str, request_id: str, stage: int) -> None:
        await self._at("before_commit", stage)

    def assert_all_ran(self) -> None:
        assert not self.actions, f"the migration never reached {sorted(self.actions)}; it passed {self.seen}"


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Polls an in-process condition (the event loop keeps the engines stepping meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


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
    hooks: MigrationHooks | None = None,
    engine: SimEngine | None = None,
) -> Node:
    if engine is None:
        max_len = min(512, total_blocks * 16) if total_blocks else None
        engine = SimEngine("tiny", total_blocks=total_blocks, max_model_len=max_len)
    llumlet = Llumlet(engine, name)
    transport = InprocTransport(cost_fn=delay)
    await transport.start()
    coordinator = MigrationCoordinator(llumlet, transport, settings or MigrationSettings(verify_crc=True), hooks)
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


def engine_phase(node: Node, rid: str) -> str:
    """The request's phase on ``node``'s engine, or "gone" once it finished or was aborted there."""
    return node.engine.phase(rid).label.upper() if rid in node.engine.request_ids() else "gone"


def assert_stream_exact(sink: RecordingSink, rid: str) -> None:
    """Every index exactly once and in order: nothing lost, nothing pushed twice (the raw stream, before dedup)."""
    assert sink.raw_indices(rid) == list(range(len(sink.tokens(rid)))), f"{rid}: a token lost or pushed twice"


async def test_source_abort_when_request_finishes_during_migration(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks

    async def finish() -> None:  # stage 0 (12 of 13 blocks) is copied; the request runs to its end before stage 1
        assert engine_phase(a, "short") == "RUNNING", "the request finished before stage 0 was copied"
        await sink.wait("short")

    hooks.actions[("before_stage", 1)] = finish
    try:
        await a.stub.AddRequest(request("short", sink, 200, 120))
        await wait_tokens(sink, "short", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "short"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert result.reason == "request short finished or was aborted during migration"
        assert result.stages == 1
        assert sink.tokens("short") == unmigrated_tokens(200, 120)
        assert_stream_exact(sink, "short")
        assert {o.instance_id for o in sink.outputs["short"]} == {"a"}
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_source_abort_when_client_aborts_during_precopy(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks

    async def abort() -> None:  # stage 0 copied, the request still decoding: the abort ends it on the source
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        assert engine_phase(a, "r") == "gone"

    hooks.actions[("before_stage", 1)] = abort
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert result.reason == "request r finished or was aborted during migration"
        outs = await sink.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT and outs[-1].instance_id == "a"
        assert 0 < len(sink.tokens("r")) < 400
        assert sink.tokens("r") == unmigrated_tokens(100, 400)[: len(sink.tokens("r"))]
        assert_stream_exact(sink, "r")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(("prompt_len", "last_stage"), [(20, 0), (100, 1)])
async def test_source_abort_when_client_aborts_during_last_stage(
    sink: RecordingSink, prompt_len: int, last_stage: int
) -> None:
    """The request is suspended for the stop-and-copy: the abort is held, the migration gives up before the commit,
    and the held abort then ends the request on the source."""
    a, b = await make_node("a"), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks

    async def abort() -> None:
        assert engine_phase(a, "r") == "SUSPENDED"
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        assert engine_phase(a, "r") == "SUSPENDED", "a suspended request's abort waits for the migration's end"

    hooks.actions[("before_last_stage", last_stage)] = abort
    try:
        await a.stub.AddRequest(request("r", sink, prompt_len, 400))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert result.reason == "request r was aborted by its client during migration"
        assert result.stages == last_stage + 1, "every stage was copied before the source gave up"
        assert ("before_commit", last_stage + 1) not in hooks.seen
        outs = await sink.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert {o.instance_id for o in outs} == {"a"}
        assert 0 < len(sink.tokens("r")) < 400
        assert_stream_exact(sink, "r")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_client_abort_while_the_commit_is_in_flight_reaches_the_destination(sink: RecordingSink) -> None:
    """The abort arrives after the source's last check: the migration commits, and the source forwards the abort to
    the destination, which now holds the request and ends it there."""
    a, b = await make_node("a"), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks

    async def abort() -> None:
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        assert engine_phase(a, "r") == "SUSPENDED"

    hooks.actions[("before_commit", 1)] = abort
    try:
        await a.stub.AddRequest(request("r", sink, 20, 400))  # 2 blocks: stage 0 is the stop-and-copy stage
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert result.reason == "" and result.stages == 1
        outs = await sink.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert outs[-1].instance_id == "b", "the abort ended the request where it lives after the commit"
        assert 0 < len(sink.tokens("r")) < 400
        assert sink.tokens("r") == unmigrated_tokens(20, 400)[: len(sink.tokens("r"))]
        assert_stream_exact(sink, "r")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


class HeldAborts:
    """Holds a source's forwarded AbortRequest calls until ``release`` is set (the RPC delayed in flight), and
    records how the destination answered each; every other call goes through at once."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.answers: list[grpc.StatusCode] = []
        self.requests: list[llumlet_pb2.AbortRequestRequest] = []

    def wrap(self, stub: llumlet_pb2_grpc.LlumletServiceStub) -> Any:
        gate = self

        class Stub:
            def __getattr__(self, name: str) -> Any:
                return getattr(stub, name)

            async def AbortRequest(self, request: llumlet_pb2.AbortRequestRequest, **kwargs: Any) -> Any:
                gate.requests.append(request)
                gate.held.set()
                await gate.release.wait()
                try:
                    reply = await stub.AbortRequest(request, **kwargs)
                except grpc.aio.AioRpcError as exc:
                    gate.answers.append(exc.code())
                    raise
                gate.answers.append(grpc.StatusCode.OK)
                return reply

        return Stub()


@pytest.mark.parametrize("reused_by", ["frontend", "migration"])
async def test_a_forwarded_abort_hits_only_the_incarnation_that_migrated(sink: RecordingSink, reused_by: str) -> None:
    """The client's abort lands on the source while the commit is in flight, and the source's forward of it to the
    destination is slow. Meanwhile the migrated request ends on the destination and the client reuses its id: the new
    request reaches the destination from its frontend, or by a second migration from the same source. The late
    forward names the migration that moved the old request (``llumnix-migration-id``), so it ends only that one: the
    new request runs to its end. Before, it named the request by id only and aborted the new request (plaintext: the
    destination checked nothing; over mTLS, a second migration from the same source passed its source check)."""
    a, b = await make_node("a"), await make_node("b")
    gate = HeldAborts()
    stub_for = a.coordinator._stub
    a.coordinator._stub = lambda address: gate.wrap(stub_for(address))  # type: ignore[method-assign]

    async def client_abort() -> None:
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))

    a.coordinator.hooks = hooks = Hooks({("before_commit", 1): client_abort})
    second = RecordingSink()
    await second.start()
    try:
        await a.stub.AddRequest(request("r", sink, 20, 400))  # 2 blocks: stage 0 is the stop-and-copy stage
        await wait_tokens(sink, "r", 1)
        reply = await a.stub.MigrateOut(migrate(a, b, "r", wait=False))
        assert len(reply.migration_ids) == 1
        await asyncio.wait_for(gate.held.wait(), 20)  # committed; the forward of the client's abort is in flight
        hooks.assert_all_ran()
        assert engine_phase(b, "r") != "gone", "the old request lives on the destination"
        # It ends there (its frontend's abort), and the client reuses the id.
        await b.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        assert (await sink.wait("r"))[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        if reused_by == "frontend":
            await b.stub.AddRequest(request("r", second, 20, 60))
        else:
            await a.stub.AddRequest(request("r", second, 20, 60))
            await wait_tokens(second, "r", 1)
            result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
            assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        gate.release.set()
        await until(lambda: len(gate.answers) == 1, "the destination to answer the forwarded abort")
        assert gate.answers == [grpc.StatusCode.NOT_FOUND], "the migrated request has ended: nothing to abort"
        outs = await second.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, outs[-1].error
        assert second.tokens("r") == unmigrated_tokens(20, 60)
        assert_stream_exact(second, "r")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        gate.release.set()
        await a.close()
        await b.close()
        await second.stop()


async def migrate_the_preempted_one(
    sink: RecordingSink, hook: str, check: Callable[[Node, Node], None] = lambda a, b: None
) -> llumlet_pb2.MigrationResult:
    """Two requests on a 32-block source; "new" (the newest, the preemption victim) migrates, and at ``hook`` of the
    first stage that point allows, both grow until "new" is preempted. ``check(a, b)`` runs on the migration's answer.
    Both requests then finish on the source, unmigrated, and every block comes back."""
    a, b = await make_node("a", total_blocks=32), await make_node("b")

    def preempted() -> bool:
        return any(r.request_id == "new" and r.num_preemptions > 0 for r in a.engine.load().requests)

    async def wait_for_preemption() -> None:
        assert not preempted(), f"preempted before {hook}"
        if hook == "before_copy":
            assert b.engine.load().reserved_blocks > 0
        await until(preempted, "the preemption of 'new'")

    hooks = Hooks({(hook, 1 if hook == "before_stage" else 0): wait_for_preemption})
    a.coordinator.hooks = hooks
    try:
        # 12 blocks each; together they outgrow a's 32 after ~64 tokens each; "old" alone then grows to 30
        await a.stub.AddRequest(request("old", sink, 180, 300))
        await wait_tokens(sink, "old", 1)
        await a.stub.AddRequest(request("new", sink, 180, 300))
        await wait_tokens(sink, "new", 1)
        result: llumlet_pb2.MigrationResult = (await a.stub.MigrateOut(migrate(a, b, "new"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, result.reason
        assert result.reason == "request new was preempted during migration"
        check(a, b)
        for rid in ("old", "new"):
            await sink.wait(rid, timeout=60)
            assert sink.tokens(rid) == unmigrated_tokens(180, 300)
            assert_stream_exact(sink, rid)
            assert {o.instance_id for o in sink.outputs[rid]} == {"a"}
        await settle(a, b)
        assert (a.free, b.free) == (32, b.engine.total_blocks)
        return result
    finally:
        await a.close()
        await b.close()


async def test_source_abort_when_request_is_preempted(sink: RecordingSink) -> None:
    """Preempted after stage 0 was copied: the source aborts before the next stage."""
    await migrate_the_preempted_one(sink, "before_stage")


async def test_request_preempted_between_reservation_and_copy_frees_the_destination_at_once(
    sink: RecordingSink,
) -> None:
    """The request loses its blocks to a preemption after stage 0's reservation and before the source reads them:
    the source aborts (tell-abort) instead of sending nothing and announcing the stage, which left the destination
    holding the reservation until its stall timeout (5 s) ran out (the lingering reservation of #12's benchmark)."""

    def told_not_timed_out(a: Node, b: Node) -> None:  # the reservation is gone when the migration's answer arrives
        assert b.engine.load().reserved_blocks == 0 and not b.coordinator.busy

    result = await migrate_the_preempted_one(sink, "before_copy", told_not_timed_out)
    assert result.stages == 0 and result.bytes_sent == 0


async def test_request_finished_between_reservation_and_copy_frees_the_destination_at_once(
    sink: RecordingSink,
) -> None:
    """The request runs to its end after stage 0's reservation and before the copy: the source tells the destination,
    which frees the reservation before the migration's answer arrives."""
    a, b = await make_node("a"), await make_node("b")

    async def finish() -> None:
        assert b.engine.load().reserved_blocks > 0
        await sink.wait("short")

    hooks = Hooks({("before_copy", 0): finish})
    a.coordinator.hooks = hooks
    try:
        await a.stub.AddRequest(request("short", sink, 200, 120))
        await wait_tokens(sink, "short", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "short"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, result.reason
        assert result.reason == "request short finished or was aborted during migration"
        assert result.stages == 0
        assert b.engine.load().reserved_blocks == 0 and not b.coordinator.busy
        assert sink.tokens("short") == unmigrated_tokens(200, 120)
        assert_stream_exact(sink, "short")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_destination_refuses_a_short_stage_at_once(sink: RecordingSink) -> None:
    """A stage announced with fewer bytes than its reservation holds cannot complete: the destination refuses it and
    frees the reservation at once, instead of waiting for bytes that will not come until its stall timeout (30 s
    here; before, the call hung that long)."""
    b = await make_node("b", settings=MigrationSettings(stall_timeout_s=30.0, transfer_timeout_s=60.0))
    try:
        donor = SimEngine("tiny")
        spec = RequestSpec("r", tuple(range(1, 41)), Sampling(20, seed=1, ignore_eos=True))
        donor.add_request(spec, 0.0)
        donor.step(0.0)
        assert sink.server is not None
        reply = await b.stub.PreAllocate(
            llumlet_pb2.PreAllocateRequest(
                migration_id="m",
                source_instance_id="a",
                stage=0,
                num_blocks=2,
                request=convert.migration_state_to_pb(donor.export_state("r"), sink.server.address),
                kv_layout=b.engine.kv_layout().encode(),
            )
        )
        assert len(reply.block_ids) == 2 and b.engine.load().reserved_blocks == 2
        notice = llumlet_pb2.TransferStageRequest(
            migration_id="m", stage=0, block_ids=reply.block_ids, num_bytes=b.engine.block_bytes, crc32=0
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await b.stub.TransferStage(notice, timeout=5)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
        assert f"the source sent {b.engine.block_bytes} bytes for 2 reserved blocks" in (err.value.details() or "")
        assert b.engine.load().reserved_blocks == 0 and not b.coordinator.busy
        assert b.free == b.engine.total_blocks
    finally:
        await b.close()


async def test_source_gives_up_when_stages_do_not_converge(sink: RecordingSink) -> None:
    settings = MigrationSettings(limits=MigrationLimits(last_stage_max_blocks=1, max_stages=1))
    a, b = await make_node("a", settings=settings), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks
    blocks: list[int] = []

    async def note_blocks() -> None:
        blocks.append(len(a.engine.block_ids("r")))

    async def grow() -> None:  # stage 0 left one block; two more completed meanwhile: 3 > 1 left, no stage allowed
        await until(lambda: len(a.engine.block_ids("r")) >= blocks[0] + 2, "the request to grow by two blocks")

    hooks.actions[("before_stage", 0)] = note_blocks
    hooks.actions[("before_stage", 1)] = grow
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert re.fullmatch(r"no convergence after 1 stages \(\d+ blocks still to copy\)", result.reason), result.reason
        assert int(result.reason.split("(")[1].split()[0]) >= 3
        assert result.stages == 1
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 400)
        assert_stream_exact(sink, "r")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_destination_refuses_without_blocks_slot_or_when_cordoned(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b", total_blocks=32)
    try:
        async with b.llumlet.engine_lock:  # b keeps 10 blocks free throughout (a request could finish too early)
            held = b.engine.reserve_blocks(22)
        await a.stub.AddRequest(request("r", sink, 200, 200))  # 13+ blocks: more than b has free
        await wait_tokens(sink, "r", 2)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason.startswith("pre-allocate: RESOURCE_EXHAUSTED: "), result.reason
        assert result.stages == 0
        assert b.free == 10, "the refused pre-allocation left nothing reserved"
        async with b.llumlet.engine_lock:
            b.engine.free_reserved(held)
        await b.stub.SetInstanceState(llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_CORDONED))
        await a.stub.AddRequest(request("small", sink, 20, 200))
        result = (await a.stub.MigrateOut(migrate(a, b, "small"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason == "pre-allocate: FAILED_PRECONDITION: b takes no requests"
        await b.stub.SetInstanceState(llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_ACTIVE))
        # a second migration into b while one holds its only in-slot is refused (ABORTED)
        second: list[llumlet_pb2.MigrationResult] = []

        async def migrate_second() -> None:  # c1's stages are on b, its commit not sent: b's slot is taken
            assert b.coordinator.busy
            second.append((await a.stub.MigrateOut(migrate(a, b, "small"))).results[0])

        c_hooks = Hooks({("before_commit", 1): migrate_second})
        c = await make_node("c", hooks=c_hooks)
        try:
            await c.stub.AddRequest(request("c1", sink, 20, 300))
            await wait_tokens(sink, "c1", 1)
            first = (await c.stub.MigrateOut(migrate(c, b, "c1"))).results[0]
            c_hooks.assert_all_ran()
            assert second[0].outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
            assert second[0].reason == "pre-allocate: ABORTED: b has no free migration slot"
            assert first.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, first.reason
            for rid, p, n in (("r", 200, 200), ("small", 20, 200), ("c1", 20, 300)):
                await sink.wait(rid, timeout=60)
                assert sink.tokens(rid) == unmigrated_tokens(p, n)
                assert_stream_exact(sink, rid)
            await settle(a, b, c)
            assert c.free == c.engine.total_blocks
        finally:
            await c.close()
        assert (a.free, b.free) == (a.engine.total_blocks, 32)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("point", ["before_stage", "before_last_stage"])
async def test_destination_abort_when_transfer_times_out(sink: RecordingSink, point: str) -> None:
    """The data plane stalls (a modelled 3 s per chunk against the destination's 1 s): in the pre-copy stage 0, or
    in the stop-and-copy stage 1 while the request is suspended; either way the source keeps the request."""
    delay = Delay(0.0)
    stage = 0 if point == "before_stage" else 1

    async def stall() -> None:
        delay.seconds = 3.0

    hooks = Hooks({(point, stage): stall})
    a = await make_node("a", delay=delay, hooks=hooks)
    b = await make_node("b", settings=MigrationSettings(transfer_timeout_s=1.0, verify_crc=True))
    try:
        await a.stub.AddRequest(request("r", sink, 100, 300))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, result.reason
        assert result.reason.startswith("transfer: DEADLINE_EXCEEDED: stage bytes did not arrive"), result.reason
        assert result.stages == stage, "the stages before the stalled one completed"
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 300)
        assert sink.raw_indices("r") == list(range(300))
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_destination_abort_when_commit_fails(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b")

    async def collide() -> None:  # the same id arrives at the destination directly before the commit
        await b.stub.AddRequest(request("r", sink, 10, 400))

    hooks = Hooks({("before_commit", 1): collide})
    a.coordinator.hooks = hooks
    try:
        await a.stub.AddRequest(request("r", sink, 20, 300))  # 2 blocks: one stop-and-copy stage
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason.startswith("commit: FAILED_PRECONDITION: commit failed: "), result.reason
        await b.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(("point", "stage"), [("before_stage", 1), ("before_last_stage", 1)])
async def test_destination_dead_mid_migration_source_keeps_the_request(
    sink: RecordingSink, point: str, stage: int
) -> None:
    """The destination's server goes away after stage 0 (pre-copy: the request still decoding; last stage: suspended).
    The source's next call fails, it resumes the request, and the destination's reaper frees stage 0's reservation."""
    b = await make_node("b", settings=MigrationSettings(pending_timeout_s=0.5, verify_crc=True))

    async def kill_destination() -> None:
        assert b.llumlet.engine.load().reserved_blocks > 0
        await b.server.stop(None)

    hooks = Hooks({(point, stage): kill_destination})
    a = await make_node("a", hooks=hooks)
    try:
        await a.stub.AddRequest(request("r", sink, 100, 300))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason.startswith("pre-allocate: UNAVAILABLE: "), result.reason
        assert result.stages == 1
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 300)
        assert sink.raw_indices("r") == list(range(300))
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
        await settle(a)
        await until(lambda: not b.coordinator.busy, "the destination's reaper", timeout=10)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_silent_source_loses_its_reservation_and_is_refused_after(sink: RecordingSink) -> None:
    """The source stalls after stage 0 for longer than the destination's pending timeout: the destination frees the
    reservation by itself, and the source's late next stage gets NOT_FOUND and keeps the request."""
    b = await make_node("b", settings=MigrationSettings(pending_timeout_s=0.5, verify_crc=True))

    async def stall() -> None:
        assert b.coordinator.busy
        await until(lambda: not b.coordinator.busy, "the destination's reaper", timeout=10)
        assert b.free == b.engine.total_blocks

    hooks = Hooks({("before_stage", 1): stall})
    a = await make_node("a", hooks=hooks)
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        hooks.assert_all_ran()
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason.startswith(f"pre-allocate: NOT_FOUND: unknown migration {result.migration_id}")
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 400)
        assert sink.raw_indices("r") == list(range(400))
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_source_shutting_down_mid_migration_frees_the_destination_at_once(sink: RecordingSink) -> None:
    """The source llumlet closes while a migration waits between stages: it tells the destination, which frees the
    reservation now, not after its pending timeout (10 s here)."""
    b = await make_node("b")
    reached = asyncio.Event()

    async def hold() -> None:
        reached.set()
        await asyncio.Event().wait()  # until the coordinator's close cancels the migration

    hooks = Hooks({("before_stage", 1): hold})
    a = await make_node("a", hooks=hooks)
    try:
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        ids = (await a.stub.MigrateOut(migrate(a, b, "r", wait=False))).migration_ids
        await asyncio.wait_for(reached.wait(), 10)
        assert b.coordinator.busy and b.engine.load().reserved_blocks > 0
        t0 = time.monotonic()
        await a.coordinator.close()
        await until(lambda: not b.coordinator.busy, "the destination to free the reservation", timeout=5)
        assert time.monotonic() - t0 < b.coordinator.settings.pending_timeout_s / 2
        assert b.free == b.engine.total_blocks
        result = a.coordinator.results[-1]
        assert list(ids) == [result.migration_id]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
        assert result.reason == "source shutting down"
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


async def test_recording_sink_shows_a_pushed_duplicate(sink: RecordingSink) -> None:
    """The strict stream checks (``raw_indices == list(range(n))``) rely on the sink keeping every pushed index,
    duplicates included: a token pushed twice must show up there even though the frontend-style ``tokens`` drops it."""
    assert sink.server is not None
    outputs = [
        common_pb2.RequestOutput(request_id="d", first_token_index=0, token_ids=[5, 6], instance_id="a"),
        common_pb2.RequestOutput(request_id="d", first_token_index=1, token_ids=[6, 7], instance_id="b"),
    ]
    async with grpc.aio.insecure_channel(sink.server.address) as ch:
        await frontend_pb2_grpc.OutputSinkServiceStub(ch).PushOutputs(
            frontend_pb2.PushOutputsRequest(outputs=outputs), timeout=5
        )
    assert sink.tokens("d") == [5, 6, 7]
    assert sink.raw_indices("d") == [0, 1, 1, 2] != list(range(len(sink.tokens("d"))))


async def test_a_forwarded_abort_follows_the_request_through_a_second_migration(sink: RecordingSink) -> None:
    """The client's abort lands on A while the commit A->B is in flight, and A's forward of it to B is slow; meanwhile
    B migrates the request on to C. The forward reaches B, which no longer holds the request: B passes it on to C,
    naming its own migration, and the request ends there (ABORT, every block free on all three). Before, B answered
    NOT_FOUND and the request ran on to its last token on C with nobody waiting for it."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    gate = HeldAborts()
    stub_for = a.coordinator._stub
    a.coordinator._stub = lambda address: gate.wrap(stub_for(address))  # type: ignore[method-assign]

    async def client_abort() -> None:
        await a.stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r"))

    a.coordinator.hooks = hooks = Hooks({("before_commit", 1): client_abort})
    try:
        await a.stub.AddRequest(request("r", sink, 20, 400))  # 2 blocks: stage 0 is the stop-and-copy stage
        await wait_tokens(sink, "r", 1)
        reply = await a.stub.MigrateOut(migrate(a, b, "r", wait=False))
        assert len(reply.migration_ids) == 1
        await asyncio.wait_for(gate.held.wait(), 20)  # committed on B; the forward of the client's abort is held
        hooks.assert_all_ran()
        assert gate.requests[0].migration_id == reply.migration_ids[0], "the forward names its migration (field)"
        await until(lambda: engine_phase(b, "r") == "RUNNING", "the request to run on B")
        onward = (await b.stub.MigrateOut(migrate(b, c, "r"))).results[0]
        assert onward.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, onward.reason
        assert engine_phase(b, "r") == "gone" and engine_phase(c, "r") == "RUNNING"
        gate.release.set()
        await until(lambda: len(gate.answers) == 1, "B to answer the forwarded abort")
        assert gate.answers == [grpc.StatusCode.OK], "B passed the abort on to C, which ended the request"
        outs = await sink.wait("r")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT, outs[-1].error
        assert outs[-1].instance_id == "c", "the abort ended the request where it lives after two migrations"
        assert 0 < len(sink.tokens("r")) < 400
        assert_stream_exact(sink, "r")
        await settle(a, b, c)
        assert (a.free, b.free, c.free) == (a.engine.total_blocks, b.engine.total_blocks, c.engine.total_blocks)
    finally:
        gate.release.set()
        await a.close()
        await b.close()
        await c.close()
