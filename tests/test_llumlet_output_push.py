"""Output push reliability: a slow frontend is waited for, a dead one is given up only after the whole budget, in
order, with per-request coalescing while it stalls; idle senders close. A real grpc.aio OutputSinkService server."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from typing import Any

import grpc
import pytest

from pyllumnix.data_plane.engine.profile import get_profile
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import output_push
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.output_push import FrontendUnreachableError, OutputPusher, PushSettings, QueuedOutput
from pyllumnix.infra.grpc_server import start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink


class StallingSink(RecordingSink):
    """A frontend whose PushOutputs handler can hang (as an overloaded frontend does) until ``resume``.

    A push whose deadline passes while hanging is cancelled by grpc before it records anything, like a frontend that
    never got to it; ``calls`` counts every attempt that reached the server.
    """

    def __init__(self) -> None:
        super().__init__()
        self.running = asyncio.Event()
        self.running.set()
        self.calls = 0

    def stall(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.PushOutputsResponse:
        self.calls += 1
        await self.running.wait()
        return await super().PushOutputs(request, context)

    async def start_on(self, port: int) -> str:
        self.server = await start_server(
            [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, self, "llumnix.v1.OutputSinkService")],
            port=port,
        )
        return self.server.address

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address


def slow_engine(step_ms: float = 20.0) -> SimEngine:
    """The tiny profile with ~``step_ms`` decode steps, so a request lives for seconds."""
    return SimEngine(dataclasses.replace(get_profile("tiny"), decode_c_ms=step_ms), payload=False)


def engine_request(rid: str, frontend: str, max_tokens: int) -> common_pb2.EngineRequest:
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=[1, 2, 3, 4],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=3, ignore_eos=True),
        frontend_address=frontend,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        await asyncio.sleep(0.02)


async def test_a_frontend_stalled_longer_than_the_old_budget_gets_every_output_once_in_order() -> None:
    """Old behaviour: 3 pushes of 2 s, then the requests were aborted and the stream hung. A 7 s stall now only
    delays the outputs (default settings but the answer interval: two failed attempts, 2 s and 4 s deadlines, must fit
    in the stall after the first ask, which at the default 1 s could come late on a loaded machine)."""
    sink = StallingSink()
    await sink.start()
    engine = slow_engine(step_ms=10.0)
    llumlet = Llumlet(engine, "i", push=PushSettings(ack_interval_s=0.25))
    llumlet.start()
    try:
        await llumlet.add_request(engine_request("r0", sink.address, max_tokens=60))
        await until(lambda: "r0" in sink.outputs, 10, "the first token")
        sink.stall()
        await llumlet.add_request(engine_request("r1", sink.address, max_tokens=200))
        await asyncio.sleep(7.0)
        assert "r1" not in sink.outputs, "the frontend really stalled"
        sink.resume()
        for rid, n in (("r0", 60), ("r1", 200)):
            outs = await sink.wait(rid, timeout=30)
            assert sink.raw_indices(rid) == list(range(n)), "every token index exactly once, in order"
            assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert llumlet.pusher.retries >= 2 and llumlet.pusher.given_up == 0
        assert engine.load().free_blocks == engine.total_blocks
    finally:
        await llumlet.stop()
        await sink.stop()


async def test_a_frontend_gone_longer_than_the_budget_aborts_its_requests_and_tells_it_if_it_returns() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    engine = slow_engine()
    budget = 3.0
    llumlet = Llumlet(engine, "i", push=PushSettings(budget_s=budget, attempt_timeout_s=0.5, max_backoff_s=0.5))
    llumlet.start()
    sink = StallingSink()
    try:
        t0 = time.monotonic()
        await llumlet.add_request(engine_request("r", address, max_tokens=400))
        await asyncio.sleep(budget / 2)
        # nobody listens (UNAVAILABLE at once): still retrying, the request still runs
        assert engine.request_ids() == ["r"] and llumlet.pusher.given_up == 0
        await until(lambda: not engine.request_ids(), budget * 4, "the request's abort")
        assert time.monotonic() - t0 >= budget
        assert engine.load().free_blocks == engine.total_blocks, "its blocks are freed"
        assert llumlet.owners == {}
        # The frontend comes back: it learns that the request failed instead of waiting for ever.
        await sink.start_on(port)
        outs = await sink.wait("r", timeout=budget * 3)
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "could not deliver outputs to frontend" in outs[-1].error and "instance i" in outs[-1].error
    finally:
        await llumlet.stop()
        await sink.stop()


async def test_outputs_of_one_request_coalesce_while_the_frontend_stalls() -> None:
    sink = StallingSink()
    await sink.start()
    pusher = OutputPusher("i", lambda _: None)
    requests, tokens = 20, 300
    try:
        sink.stall()
        for index in range(tokens):
            pusher.submit(
                sink.address,
                [
                    QueuedOutput(
                        f"r{r}",
                        [index % 7],
                        index,
                        finished=index == tokens - 1,
                        finish_reason=(
                            common_pb2.FINISH_REASON_LENGTH
                            if index == tokens - 1
                            else common_pb2.FINISH_REASON_UNSPECIFIED
                        ),
                    )
                    for r in range(requests)
                ],
            )
            if index == 0:
                await until(lambda: sink.calls == 1, 5, "the first push in flight")
        assert pusher.queued(sink.address) == requests, "one queued message per request, not per token"
        sink.resume()
        await pusher.flush(sink.address, timeout=10)
        for r in range(requests):
            assert sink.raw_indices(f"r{r}") == list(range(tokens))
            assert sink.tokens(f"r{r}") == [i % 7 for i in range(tokens)]
            assert len(sink.outputs[f"r{r}"]) == 2  # the first output, then everything else merged
            assert sink.outputs[f"r{r}"][-1].finished
        assert pusher.coalesced == requests * (tokens - 2)
    finally:
        await pusher.close()
        await sink.stop()


async def test_flush_waits_for_delivery_and_fails_when_the_frontend_is_given_up() -> None:
    sink = StallingSink()
    await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(budget_s=2.0, attempt_timeout_s=0.3))
    try:
        sink.stall()
        pusher.submit(sink.address, [QueuedOutput("a", [1], 0)])
        with pytest.raises(TimeoutError):
            await pusher.flush(sink.address, timeout=0.5)
        sink.resume()
        await pusher.flush(sink.address, timeout=5)
        assert sink.raw_indices("a") == [0]

        address = f"127.0.0.1:{free_port()}"
        pusher.submit(address, [QueuedOutput("b", [1], 0)])
        with pytest.raises(FrontendUnreachableError):
            await pusher.flush(address, timeout=10)
    finally:
        await pusher.close()
        await sink.stop()


async def test_idle_output_senders_close_and_reopen_on_demand() -> None:
    sink = StallingSink()
    await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(idle_close_s=0.3))
    try:
        pusher.submit(sink.address, [QueuedOutput("a", [1], 0)])
        await pusher.flush(sink.address, timeout=5)
        assert pusher.addresses == [sink.address]
        await until(lambda: not pusher.addresses, 5, "the idle sender closing")
        assert pusher.sinks_closed == 1
        pusher.submit(sink.address, [QueuedOutput("a", [2], 1)])
        await pusher.flush(sink.address, timeout=5)
        assert sink.tokens("a") == [1, 2]
    finally:
        await pusher.close()
        await sink.stop()


async def gave_up(pusher: OutputPusher, address: str) -> None:
    """What the sender does once the frontend was unreachable for its whole budget (here with the queue as it is)."""
    await pusher._give_up(pusher._sinks[address], [], TimeoutError("frontend unreachable"), 30.0)


async def test_after_a_give_up_a_request_reusing_the_id_is_delivered() -> None:
    """REVIEW19-9: the given-up requests were remembered by id alone, so for 60 s every output of a later request
    reusing the id (a client's retry placed here again) was dropped, its finish included."""
    sink = RecordingSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, on_unreachable=lambda a, r: None)
    try:
        old = QueuedOutput("r", [1], 0, capability="cap-old")
        pusher.submit(address, [old], hold_s=30.0)  # still queued when the sender gives up
        await gave_up(pusher, address)
        pusher.submit(address, [old])  # the given-up incarnation's late output: dropped
        new = QueuedOutput(
            "r", [7, 8], 0, finished=True, finish_reason=common_pb2.FINISH_REASON_STOP, capability="cap-new"
        )
        pusher.submit(address, [new])
        await pusher.flush(address, timeout=5)
        got = [(list(o.token_ids), o.capability) for o in sink.outputs["r"] if o.token_ids]
        assert got == [([7, 8], "cap-new")], got
    finally:
        await pusher.close()
        await sink.stop()


async def test_a_final_error_queued_when_the_sender_gives_up_is_queued_again() -> None:
    """REVIEW19-11: a request whose dropped outputs already held its final ERROR got no notice of the pusher's (right)
    and lost that final too: a frontend that came back never learnt how the request ended."""
    sink = RecordingSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, on_unreachable=lambda a, r: None)
    try:
        final = QueuedOutput(
            "e",
            [5],
            3,
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_ERROR,
            error="engine failed",
            capability="cap-e",
        )
        pusher.submit(address, [final], hold_s=30.0)
        await gave_up(pusher, address)
        await pusher.flush(address, timeout=5)
        outs = await sink.wait("e", timeout=5)
        assert outs[-1].finished and outs[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert outs[-1].error == "engine failed" and list(outs[-1].token_ids) == []
    finally:
        await pusher.close()
        await sink.stop()


def test_an_id_refused_in_a_message_holding_two_of_its_incarnations_aborts_neither() -> None:
    """A message can carry an ended request's late final (its grant refused by the frontend) and the first outputs
    of a new request reusing the id. The answer lists the id alone; taking the latest output's capability aborted
    the new request silently (the flaky test_on_plaintext_a_migrated_requests_late_outputs_miss_a_reused_id)."""
    late = common_pb2.RequestOutput(request_id="r", finished=True, capability="cap-old")
    new = common_pb2.RequestOutput(request_id="r", token_ids=[1], first_token_index=0, capability="cap-new")
    other = common_pb2.RequestOutput(request_id="s", token_ids=[2], capability="cap-s")
    assert output_push._orphans(["r", "s", "gone"], [late, new, other]) == {"s": "cap-s", "gone": ""}
    assert output_push._orphans(["r"], [new, new]) == {"r": "cap-new"}


def test_a_queued_output_builds_the_message_it_was_made_from() -> None:
    """The pusher keeps outputs as plain values and builds each message once, when its batch is written: every field
    must survive the round trip, the pusher's instance id is set on the built message, and the queued value never
    aliases the message (a later merge must not change what was already built)."""
    message = common_pb2.RequestOutput(
        request_id="r",
        token_ids=[4, 5],
        first_token_index=7,
        finished=True,
        finish_reason=common_pb2.FINISH_REASON_ERROR,
        error="engine failed",
        instance_id="i-1",
        num_prompt_tokens=12,
        capability="cap",
    )
    queued = QueuedOutput.from_pb(message)
    built = frontend_pb2.PushOutputsRequest()
    queued.add_to(built.outputs, "i-1")
    assert built.outputs[0] == message
    queued.token_ids.append(6)
    assert list(built.outputs[0].token_ids) == [4, 5]
    final = queued.final()
    assert final.token_ids == [] and final.first_token_index == 7 and final.error == "engine failed"
    assert final.capability == "cap" and queued.token_ids == [4, 5, 6]


async def test_a_sink_merges_a_requests_next_outputs_into_its_queued_one() -> None:
    """Contiguous outputs of one request share one queued output (tokens appended, the finish taken); a gap or an
    output after the finish starts a new one."""
    sink = output_push._Sink("127.0.0.1:9")
    assert not sink.add(QueuedOutput("r", [1], 0))
    assert sink.add(QueuedOutput("r", [2, 3], 1))
    assert sink.add(QueuedOutput("r", [4], 3, finished=True, finish_reason=common_pb2.FINISH_REASON_LENGTH))
    assert not sink.add(QueuedOutput("r", [9], 4))  # after the finish: a new incarnation's, never merged
    assert not sink.add(QueuedOutput("s", [1], 5))
    assert not sink.add(QueuedOutput("s", [2], 7))  # a gap
    pending, _ = sink.take()
    assert [(q.request_id, q.token_ids, q.first_token_index, q.finished) for q in pending] == [
        ("r", [1, 2, 3, 4], 0, True),
        ("r", [9], 4, False),
        ("s", [1], 5, False),
        ("s", [2], 7, False),
    ]
    assert pending[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    await sink.channel.close()
