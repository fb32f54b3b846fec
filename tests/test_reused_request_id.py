"""A client that reuses a request id after its first request ended gets a served request, not an error.

A llumlet keeps a tombstone for an abort of an id it does not hold (``late_adds``: the abort may have overtaken its
AddRequest) and refuses the next AddRequest of that id (ABORTED). Such aborts also reach a llumlet for requests that
already left it (finished or migrated out just before the client's abort arrived), so a client reusing the id within
the tombstone's 60 s had its new request refused: the frontend answered INTERNAL ("ABORTED ... was aborted before it
arrived"). The frontend never aborts a request on an instance whose add it still awaits, so an ABORTED answer to a
live request is an earlier request's tombstone, which the refusal took: the frontend places the request again.
A duplicate *live* id is still refused (ALREADY_EXISTS).

A2 (attack8): an id reused right after its request was dropped. Each grant is a new token (the ledger's generations
are never reused), the id stays reserved until the abort its release started is answered (that abort names the
request by id only), and a llumlet told that an output was refused aborts only the incarnation that output belonged
to. Before, the new request ended ABORT with 0 tokens, or hung until the idle timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from pyllumnix.control_plane.frontend.core import Frontend, GenerationInput
from pyllumnix.control_plane.frontend.dispatch import Placement
from pyllumnix.control_plane.frontend.errors import DuplicateRequestError
from pyllumnix.control_plane.frontend.requests import HolderLedger, StaleCapabilityError, TrackedRequest
from pyllumnix.control_plane.frontend.service import FrontendGrpc, start_grpc
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.output_push import QueuedOutput
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_frontend_fakes import MAX_MODEL_LEN, MODEL, TOKENIZER, StaticDispatcher

TIMEOUT_S = 20.0


@dataclass
class Cluster:
    llumlet: Llumlet
    servicer: LlumletServicer
    llumlet_server: RunningServer
    frontend: Frontend
    frontend_grpc: FrontendGrpc


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A real llumlet (simulated engine, tombstones and all) behind a real frontend."""
    llumlet = Llumlet(SimEngine("tiny"), "i-reuse")
    servicer = LlumletServicer(llumlet)
    server = await start_server([(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, SERVICE_NAME)])
    llumlet.start()
    frontend = Frontend(
        model=MODEL,
        max_model_len=MAX_MODEL_LEN,
        tokenizer=TOKENIZER,
        dispatcher=StaticDispatcher([Placement("i-reuse", server.address)]),
    )
    frontend_grpc = await start_grpc(frontend)
    try:
        yield Cluster(llumlet, servicer, server, frontend, frontend_grpc)
    finally:  # the llumlet first: its last outputs still reach a serving frontend (no push retries to wait out)
        await llumlet.stop()
        await server.stop(None)
        await frontend_grpc.stop(None)
        await frontend.close()


async def generate(cluster: Cluster, request_id: str, max_tokens: int = 4) -> list[frontend_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(cluster.frontend_grpc.address) as channel:
        call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
            frontend_pb2.GenerateRequest(
                request_id=request_id, text="a b c", sampling=common_pb2.SamplingParams(max_tokens=max_tokens)
            ),
            timeout=TIMEOUT_S,
        )
        return [reply async for reply in call]


async def late_abort(cluster: Cluster, request_id: str) -> None:
    """An abort of ``request_id`` reaching the llumlet after the request left it (as a client's abort racing the
    request's end or its migration does): NOT_FOUND, and it leaves a tombstone."""
    async with grpc.aio.insecure_channel(cluster.llumlet_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await llumlet_pb2_grpc.LlumletServiceStub(channel).AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id=request_id), timeout=TIMEOUT_S
            )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert request_id in cluster.servicer.tombstones


async def test_an_id_reused_after_its_request_ended_is_served(cluster: Cluster) -> None:
    """Old behaviour: the second request failed, INTERNAL ("ABORTED request job-1 was aborted before it arrived")."""
    first = await generate(cluster, "job-1")
    assert first[-1].finished and first[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    await late_abort(cluster, "job-1")
    again = await generate(cluster, "job-1")
    assert again[-1].finished and again[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in again) == 4, "every token of the reused id's request, once"
    assert "job-1" not in cluster.servicer.tombstones, "the refusal took the tombstone"
    assert cluster.servicer.late_adds_refused == 1, "the llumlet still refused the add it was told was aborted"
    assert cluster.llumlet.engine.request_ids() == [], "nothing left behind on the instance"


async def test_a_duplicate_live_id_is_still_refused(cluster: Cluster) -> None:
    """Reuse while the first request runs stays a clear ALREADY_EXISTS (HTTP 409), before any instance is asked."""
    async with grpc.aio.insecure_channel(cluster.frontend_grpc.address) as channel:
        stub = frontend_pb2_grpc.FrontendServiceStub(channel)
        long = stub.Generate(
            frontend_pb2.GenerateRequest(
                request_id="job-2", text="a", sampling=common_pb2.SamplingParams(max_tokens=200)
            ),
            timeout=TIMEOUT_S,
        )
        await long.read()  # it runs
        with pytest.raises(grpc.aio.AioRpcError) as err:
            dup = stub.Generate(
                frontend_pb2.GenerateRequest(
                    request_id="job-2", text="a", sampling=common_pb2.SamplingParams(max_tokens=2)
                ),
                timeout=TIMEOUT_S,
            )
            await dup.read()
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        long.cancel()


ROUNDS = 20


async def test_an_id_reused_right_after_a_cancel_gets_its_own_tokens(cluster: Cluster) -> None:
    """A2: the client cancels request R after its first token and at once sends R again (max_tokens 5), 20 times.

    Old behaviour: the first request's abort (by bare id) and its late outputs (the same capability token: the ledger
    forgot the id and granted generation 0 again) landed on the second request, which ended ABORT with 0 tokens in
    most rounds. Now each answer is all 5 tokens (LENGTH), or a clear ALREADY_EXISTS, and nothing is left behind."""
    results: list[str] = []
    async with grpc.aio.insecure_channel(cluster.frontend_grpc.address) as channel:
        stub = frontend_pb2_grpc.FrontendServiceStub(channel)
        for i in range(ROUNDS):
            rid = f"reuse-{i % 3}"  # ids come back across rounds too
            first = stub.Generate(
                frontend_pb2.GenerateRequest(
                    request_id=rid, text="a b c", sampling=common_pb2.SamplingParams(max_tokens=200)
                ),
                timeout=TIMEOUT_S,
            )
            await first.read()  # its first token: it runs on the llumlet
            first.cancel()
            try:
                again = stub.Generate(
                    frontend_pb2.GenerateRequest(
                        request_id=rid, text="a b c", sampling=common_pb2.SamplingParams(max_tokens=5)
                    ),
                    timeout=TIMEOUT_S,
                )
                replies = [reply async for reply in again]
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, f"round {i}: {exc.code()} {exc.details()}"
                results.append("409")
                continue
            last = replies[-1]
            tokens = sum(len(r.token_ids) for r in replies)
            assert last.finished, f"round {i}: the stream ended unfinished"
            assert (last.finish_reason, tokens) == (common_pb2.FINISH_REASON_LENGTH, 5), (
                f"round {i}: {common_pb2.FinishReason.Name(last.finish_reason)} with {tokens} tokens"
            )
            results.append("ok")
    assert results.count("ok") >= ROUNDS // 2, f"most reuses are served, not refused: {results}"
    for _ in range(200):  # the cancelled requests' aborts settle
        if not cluster.llumlet.engine.request_ids() and not cluster.frontend.tracker:
            break
        await asyncio.sleep(0.02)
    assert cluster.llumlet.engine.request_ids() == [], "nothing left behind on the instance"
    assert len(cluster.frontend.tracker) == 0 and len(cluster.frontend.tracker.ledger) == 0


def test_a_grant_after_forget_is_a_new_token_and_the_old_one_is_refused() -> None:
    """A2 (token half): the old ledger reset the generation on ``forget``, so a reused id placed on the same
    instance got a byte-identical token, and the earlier request's late outputs passed ``check`` as the new one's."""
    ledger = HolderLedger()
    old = ledger.grant("R", "i-1")
    ledger.forget("R")
    new = ledger.grant("R", "i-1")
    assert new != old
    assert ledger.check(new, request_id="R", caller_instance_id="i-1").holder_instance_id == "i-1"
    with pytest.raises(StaleCapabilityError):
        ledger.check(old, request_id="R", caller_instance_id="i-1")
    assert ledger.outdated(old, request_id="R") and not ledger.outdated(new, request_id="R")
    assert not ledger.outdated("", request_id="R"), "a token-less output (insecure hand-over) is not outdated"
    # A hand-over's token is unique too, and the retired holder's token is stale once the destination pushes.
    moved = ledger.hand_over(new, request_id="R", caller_instance_id="i-1", new_instance_id="i-2")
    assert moved not in (old, new)
    ledger.check(moved, request_id="R", caller_instance_id="i-2")
    with pytest.raises(StaleCapabilityError):
        ledger.check(new, request_id="R", caller_instance_id="i-1")


def slow_aborts(frontend: Frontend, gate: asyncio.Event) -> list[str]:
    """Holds the frontend's aborts until ``gate`` is set (an abort still on its way to the instance); returns the ids
    whose abort reached the instance, in order."""
    real = frontend._abort_on_instance
    done: list[str] = []

    async def held(request_id: str, instance_id: str, capability: str = "") -> None:
        await gate.wait()
        await real(request_id, instance_id, capability)
        done.append(request_id)

    frontend._abort_on_instance = held  # type: ignore[method-assign]
    return done


async def run_to_end(request: TrackedRequest) -> tuple[int, int]:
    """(finish reason, tokens) of a tracked request."""
    tokens = 0
    async with asyncio.timeout(TIMEOUT_S):
        async for delta in request.deltas():
            tokens += len(delta.token_ids)
            if delta.finished:
                return delta.finish_reason, tokens
    raise AssertionError("unreachable")


def inp(request_id: str, max_tokens: int) -> GenerationInput:
    return GenerationInput(
        prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=max_tokens), request_id=request_id
    )


async def test_a_reused_id_waits_for_the_earlier_requests_abort(cluster: Cluster) -> None:
    """A2 (bare-id abort): the id stays reserved until the abort its release started is answered, so that abort never
    lands on the new request. Old behaviour: the new request went to the instance at once, while the old one (its
    abort still on the way) held the id there: ALREADY_EXISTS; had the old one just left, the abort killed the new."""
    frontend = cluster.frontend
    gate = asyncio.Event()
    aborted = slow_aborts(frontend, gate)
    first = await frontend.submit(inp("job-3", 200))
    frontend.release(first)  # the client left: an abort starts, held on its way
    second = asyncio.create_task(frontend.submit(inp("job-3", 5)))
    await asyncio.sleep(0.2)
    assert not second.done(), "the reuse waits while the earlier request's abort is on its way"
    gate.set()
    request = await asyncio.wait_for(second, TIMEOUT_S)
    assert aborted == ["job-3"], "the earlier request's abort was answered before the reuse was placed"
    try:
        assert await run_to_end(request) == (common_pb2.FINISH_REASON_LENGTH, 5)
    finally:
        frontend.release(request)


async def test_a_reused_id_whose_abort_does_not_come_back_is_refused_clearly(cluster: Cluster) -> None:
    """An abort that is not answered within twice the call timeout: the reuse is a clear 409 (ALREADY_EXISTS), not a
    request exposed to that abort."""
    frontend = cluster.frontend
    frontend.call_timeout = 0.2
    gate = asyncio.Event()
    slow_aborts(frontend, gate)
    first = await frontend.submit(inp("job-4", 200))
    frontend.release(first)
    try:
        with pytest.raises(DuplicateRequestError, match="still being aborted"):
            await asyncio.wait_for(frontend.submit(inp("job-4", 5)), TIMEOUT_S)
        assert frontend.inflight == 0, "the refused reuse holds no admission slot"
    finally:
        gate.set()


class RefusingSink(RecordingSink):
    """Answers every output that carries a capability in ``refuse`` as a frontend answers a stale one: unknown."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse
        self.answered = asyncio.Event()

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.PushOutputsResponse:
        await super().PushOutputs(request, context)
        unknown = [out.request_id for out in request.outputs if out.capability in self.refuse]
        if unknown:
            self.answered.set()
        return frontend_pb2.PushOutputsResponse(unknown_request_ids=unknown)


async def test_a_stale_output_aborts_only_its_own_incarnation_on_the_llumlet() -> None:
    """A2 (orphan abort): the frontend refuses a late output of an earlier request with a reused id (its token is
    outdated) and names the id as unknown. Old behaviour: the llumlet then silently aborted whatever request had that
    id, i.e. the live new one, which never produced anything again (the client's 30 s idle timeout, 504)."""
    sink = RefusingSink({"cap-old", "cap-new"})
    address = await sink.start()
    llumlet = Llumlet(SimEngine("tiny"), "i-orphan")  # not started: what is added stays queued
    try:
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id="R",
                prompt_token_ids=[1, 2, 3],
                sampling=common_pb2.SamplingParams(max_tokens=5),
                frontend_address=address,
                capability="cap-new",
            )
        )

        async def refused(capability: str) -> None:
            sink.answered.clear()
            late = common_pb2.RequestOutput(
                request_id="R", token_ids=[9], first_token_index=3, instance_id="i-orphan", capability=capability
            )
            llumlet.pusher.submit(address, [QueuedOutput.from_pb(late)])
            await asyncio.wait_for(sink.answered.wait(), TIMEOUT_S)
            for _ in range(10):  # the llumlet's abort task runs
                await asyncio.sleep(0.02)

        await refused("cap-old")  # the earlier incarnation's late output
        assert llumlet.engine.request_ids() == ["R"], "the new incarnation was aborted for the old one's output"
        await refused("cap-new")  # its own output refused: that incarnation is an orphan
        assert llumlet.engine.request_ids() == [], "the refused incarnation itself is aborted"
        assert "R" not in llumlet.owners
    finally:
        await llumlet.stop()
        await sink.stop()


async def test_on_plaintext_a_migrated_requests_late_outputs_miss_a_reused_id(cluster: Cluster) -> None:
    """Review 8: on an insecure cluster HandOver gave the migration's destination no token, so its outputs carried
    none and passed for any later request with the same id. Now the destination gets a grant of its own (the token
    it is handed over with names the holder), and once the id is reused its late outputs are dropped as stale."""
    frontend = cluster.frontend
    first = await frontend.submit(
        GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=200), request_id="mig")
    )
    async with asyncio.timeout(TIMEOUT_S):
        while "mig" not in cluster.llumlet.owners:
            await asyncio.sleep(0.005)
    source_token = cluster.llumlet.owners["mig"].capability
    async with grpc.aio.insecure_channel(frontend.sink_address) as channel:
        sink = frontend_pb2_grpc.OutputSinkServiceStub(channel)
        handed = await sink.HandOver(
            frontend_pb2.HandOverRequest(request_id="mig", capability=source_token, new_instance_id="i-dst"),
            timeout=TIMEOUT_S,
        )
        assert handed.capability and handed.capability != source_token
        frontend.release(first)
        again = await frontend.submit(
            GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=5), request_id="mig")
        )
        late = common_pb2.RequestOutput(
            request_id="mig",
            instance_id="i-dst",
            capability=handed.capability,
            token_ids=[123],
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_ABORT,
        )
        await sink.PushOutputs(frontend_pb2.PushOutputsRequest(instance_id="i-dst", outputs=[late]), timeout=TIMEOUT_S)
    tokens: list[int] = []
    async with asyncio.timeout(TIMEOUT_S):
        async for delta in again.deltas():
            tokens += list(delta.token_ids)
            if delta.finished:
                assert delta.finish_reason == common_pb2.FINISH_REASON_LENGTH
                break
    frontend.release(again)
    assert len(tokens) == 5 and 123 not in tokens


async def suspended_source(cluster: Cluster, request_id: str) -> tuple[TrackedRequest, str]:
    """A request running on the cluster's llumlet that pushes no more from now on (as while suspended for a
    migration's commit), everything it pushed landed; with its capability token."""
    request = await cluster.frontend.submit(
        GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=200), request_id=request_id)
    )
    async with asyncio.timeout(TIMEOUT_S):
        while request.num_received < 2:
            await asyncio.sleep(0.005)
    owner = cluster.llumlet.owners[request_id]
    token, owner.frontend_address = owner.capability, ""
    await cluster.llumlet.pusher.drain(5.0)
    return request, token


async def test_on_plaintext_take_back_is_decided_by_who_pushed_the_latest_tokens(cluster: Cluster) -> None:
    """REVIEW12 on an insecure cluster (no caller identity): a source's TakeBack after an unanswered commit is
    granted while the destination has pushed no tokens (its later outputs are then refused and reported back) and
    refused FAILED_PRECONDITION once it has (it runs the request now)."""
    frontend = cluster.frontend
    request, token = await suspended_source(cluster, "tb")
    ask = frontend_pb2.TakeBackRequest(
        request_id="tb", capability=token, from_instance_id="i-dst", instance_id="i-reuse"
    )
    async with grpc.aio.insecure_channel(frontend.sink_address) as channel:
        sink = frontend_pb2_grpc.OutputSinkServiceStub(channel)
        handed = await sink.HandOver(
            frontend_pb2.HandOverRequest(request_id="tb", capability=token, new_instance_id="i-dst"), timeout=TIMEOUT_S
        )
        await sink.TakeBack(ask, timeout=TIMEOUT_S)
        # The destination it was taken back from may not pass it on (REVIEW13: that outran the revocation).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sink.HandOver(
                frontend_pb2.HandOverRequest(request_id="tb", capability=handed.capability, new_instance_id="i-e"),
                timeout=TIMEOUT_S,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
        late = common_pb2.RequestOutput(
            request_id="tb", instance_id="i-dst", token_ids=[999], first_token_index=request.num_received + 50
        )
        reply = await sink.PushOutputs(frontend_pb2.PushOutputsRequest(instance_id="i-dst", outputs=[late]))
        assert list(reply.unknown_request_ids) == ["tb"], "the destination it was taken from is told to stop"

        # The id's next holder pushed the latest tokens: it holds the request, and the source may not take it back.
        await sink.HandOver(
            frontend_pb2.HandOverRequest(request_id="tb", capability=token, new_instance_id="i-next"), timeout=TIMEOUT_S
        )
        mine = common_pb2.RequestOutput(
            request_id="tb", instance_id="i-next", token_ids=[7], first_token_index=request.num_received
        )
        await sink.PushOutputs(frontend_pb2.PushOutputsRequest(instance_id="i-next", outputs=[mine]))
        ask.from_instance_id = "i-next"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sink.TakeBack(ask, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    await frontend.abort("tb")
    frontend.release(request)


async def test_on_plaintext_the_destinations_first_output_retires_the_sources_grant(cluster: Cluster) -> None:
    """REVIEW14: on a plaintext frontend nothing promoted a migration's pending grant, so the source's grant stayed
    current and a late ERROR from the source (a commit it could not settle) ended a request running fine on the
    destination. The destination's first output now makes it the holder, as on TLS."""
    frontend = cluster.frontend
    request, token = await suspended_source(cluster, "pr")
    n = request.num_received
    async with grpc.aio.insecure_channel(frontend.sink_address) as channel:
        sink = frontend_pb2_grpc.OutputSinkServiceStub(channel)
        handed = await sink.HandOver(
            frontend_pb2.HandOverRequest(request_id="pr", capability=token, new_instance_id="i-dst"), timeout=TIMEOUT_S
        )

        async def push(instance: str, out: common_pb2.RequestOutput) -> list[str]:
            reply = await sink.PushOutputs(frontend_pb2.PushOutputsRequest(instance_id=instance, outputs=[out]))
            return list(reply.unknown_request_ids)

        mine = common_pb2.RequestOutput(
            request_id="pr", instance_id="i-dst", capability=handed.capability, token_ids=[7, 8], first_token_index=n
        )
        assert await push("i-dst", mine) == []
        error = common_pb2.RequestOutput(
            request_id="pr",
            instance_id="i-reuse",
            capability=token,
            first_token_index=n,
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_ERROR,
            error="neither answered",
        )
        assert await push("i-reuse", error) == ["pr"], "the source's late ERROR is stale"
        assert (request.finished, request.num_received) == (False, n + 2)
        done = common_pb2.RequestOutput(
            request_id="pr",
            instance_id="i-dst",
            capability=handed.capability,
            token_ids=[9],
            first_token_index=n + 2,
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
        )
        assert await push("i-dst", done) == []
    assert request.finished and request.finish_reason == common_pb2.FINISH_REASON_LENGTH
    await frontend.abort("pr")
    frontend.release(request)


async def test_an_abort_naming_another_grant_does_not_end_the_request(cluster: Cluster) -> None:
    """REVIEW18-4: any frontend could abort any request on a llumlet by its id (e.g. one whose client left while its
    AddRequest, with the same client-chosen id, was in flight). A frontend's abort now names its grant, and ends only
    the request that carries it."""
    frontend = cluster.frontend
    request = await frontend.submit(
        GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=200), request_id="shared")
    )
    async with asyncio.timeout(TIMEOUT_S):
        while "shared" not in cluster.llumlet.owners:
            await asyncio.sleep(0.005)
    other = HolderLedger().grant("shared", "i-reuse")  # a grant of another frontend for the same id
    async with grpc.aio.insecure_channel(cluster.llumlet_server.address) as channel:
        stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id="shared", capability=other), timeout=TIMEOUT_S
            )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "shared" in cluster.llumlet.owners, "another frontend's abort ended the request"
    frontend.release(request)  # its own frontend's abort (naming its grant) ends it
    async with asyncio.timeout(TIMEOUT_S):
        while "shared" in cluster.llumlet.owners:
            await asyncio.sleep(0.005)


async def test_a_reused_ids_first_outputs_in_one_message_with_the_old_ones_refused_output_survive(
    cluster: Cluster,
) -> None:
    """The flaky test above, made deterministic: the old incarnation's last output (its grant now refused) and the
    new request's first outputs leave the llumlet in one message. The frontend's answer lists the id alone; the
    llumlet took the latest output's capability as the refused one and silently aborted the new request (its client
    waited for ever; two fresh-clone CI runs of session 13 timed out so)."""
    frontend = cluster.frontend
    first = await frontend.submit(
        GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=200), request_id="twice")
    )
    async with asyncio.timeout(TIMEOUT_S):
        while "twice" not in cluster.llumlet.owners:
            await asyncio.sleep(0.005)
    pusher = cluster.llumlet.pusher
    real_submit = pusher.submit
    held: list[tuple[Any, Any]] = []

    def hold(*args: Any, **kwargs: Any) -> None:
        held.append((args, kwargs))

    pusher.submit = hold  # type: ignore[method-assign]
    try:
        frontend.release(first)
        again = await frontend.submit(
            GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=100), request_id="twice")
        )
        async with asyncio.timeout(TIMEOUT_S):  # the old one's output and the new one's first, both held
            while not any(out.capability != held[0][0][1][0].capability for args, _ in held for out in args[1]):
                await asyncio.sleep(0.005)
    finally:
        pusher.submit = real_submit  # type: ignore[method-assign]
    for args, kwargs in held:  # one message: nothing is sent while they are queued here
        real_submit(*args, **kwargs)
    tokens: list[int] = []
    async with asyncio.timeout(TIMEOUT_S):
        async for delta in again.deltas():
            tokens += list(delta.token_ids)
            if delta.finished:
                assert delta.finish_reason == common_pb2.FINISH_REASON_LENGTH, delta
                break
    frontend.release(again)
    assert len(tokens) == 100
