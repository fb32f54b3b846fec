"""#20 lean token path: a llumlet pushes its outputs over one long-lived ``StreamOutputs`` stream per frontend.

Before #20 every engine step cost one unary ``PushOutputs`` call (its per-call gRPC cost was most of the token path's
CPU). Checked here: one stream carries every step and is answered only now and then; a broken stream resends only
the batches the frontend did not apply (it asks first); a frontend without the stream still gets everything (unary
fallback); and the stream keeps #13's checks: the stream's TLS peer is the pusher, every output needs its capability
token, a refused batch ends the stream, nothing beyond ``max_tokens`` is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.output_push import OutputPusher, PushSettings, QueuedOutput
from pyllumnix.infra.framed import FramedCall
from pyllumnix.infra.grpc_server import start_server
from pyllumnix.infra.security.ca import role_name
from pyllumnix.infra.security.tls import client_ssl_context, secure_channel, server_ssl_context
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from tests.test_llumlet_output_push import StallingSink, engine_request, free_port, slow_engine, until
from tests.test_security_outputs import DEADLINE, LENGTH, VICTIM, Stack, collect, out, pki, stack, submit

__all__ = ["pki", "stack"]  # fixtures used here


class CountingSink(StallingSink):
    """Counts streams, stream messages and the answers sent on them (``calls`` counts batches applied)."""

    def __init__(self) -> None:
        super().__init__()
        self.streams = 0
        self.messages = 0
        self.answers = 0

    async def StreamOutputs(
        self,
        request_iterator: AsyncIterator[frontend_pb2.StreamOutputsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[frontend_pb2.StreamOutputsResponse]:
        self.streams += 1

        async def counted() -> AsyncIterator[frontend_pb2.StreamOutputsRequest]:
            async for message in request_iterator:
                self.messages += 1
                yield message

        async for reply in super().StreamOutputs(counted(), context):
            self.answers += 1
            yield reply


def output(rid: str, index: int, *, finished: bool = False) -> QueuedOutput:
    return QueuedOutput(
        rid,
        [100 + index],
        index,
        finished=finished,
        finish_reason=LENGTH if finished else common_pb2.FINISH_REASON_UNSPECIFIED,
    )


async def test_one_stream_carries_every_engine_step_and_is_answered_only_now_and_then() -> None:
    """Old behaviour: one unary PushOutputs per step (no stream at all)."""
    sink = CountingSink()
    await sink.start()
    engine = slow_engine(step_ms=10.0)
    llumlet = Llumlet(engine, "i", push=PushSettings(ack_interval_s=0.25))
    llumlet.start()
    try:
        await llumlet.add_request(engine_request("r", sink.address, max_tokens=120))
        outs = await sink.wait("r", timeout=30)
        await llumlet.pusher.flush(sink.address, timeout=5)
        assert sink.raw_indices("r") == list(range(120)) and outs[-1].finish_reason == LENGTH
        assert sink.streams == 1, "one stream for the whole request"
        assert sink.calls == sink.messages, "every batch came over the stream (no unary push)"
        assert sink.calls >= 20, "the 10 ms steps were not all merged: a batch per step"
        assert sink.answers <= sink.calls / 3, f"{sink.answers} answers for {sink.calls} batches: answered on demand"
    finally:
        await llumlet.stop()
        await sink.stop()


async def test_a_broken_stream_resends_only_the_batches_the_frontend_did_not_apply() -> None:
    """The new stream asks (seq 0) what was applied; resending every unanswered batch would duplicate them."""
    port = free_port()
    sink = CountingSink()
    address = await sink.start_on(port)
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0, attempt_timeout_s=1.0))
    try:
        for i in range(5):
            pusher.submit(address, [output("a", i)])
            await until(lambda n=i + 1: sink.calls == n, 5, f"batch {i + 1} applied")
        assert sink.answers == 0, "nothing asked yet: five applied batches are unanswered"
        assert sink.server is not None
        await sink.server.stop(None)  # the stream breaks (a frontend restart would forget; this one remembers)
        await sink.start_on(port)
        pusher.submit(address, [output("a", 5, finished=True)])
        await pusher.flush(address, timeout=10)
        assert sink.raw_indices("a") == list(range(6)), "each batch applied once"
        assert sink.streams == 2 and pusher.retries >= 1 and pusher.given_up == 0
    finally:
        await pusher.close()
        await sink.stop()


class UnaryOnlySink(frontend_pb2_grpc.OutputSinkServiceServicer):
    """A frontend from before #20: PushOutputs only (StreamOutputs answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.PushOutputsResponse:
        for o in request.outputs:
            self.indices.extend(range(o.first_token_index, o.first_token_index + len(o.token_ids)))
        return frontend_pb2.PushOutputsResponse()


async def test_a_frontend_without_the_stream_gets_every_output_by_unary_pushes() -> None:
    sink = UnaryOnlySink()  # type: ignore[abstract]
    server = await start_server(
        [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, sink, "llumnix.v1.OutputSinkService")]
    )
    pusher = OutputPusher("i", lambda _: None)
    try:
        for i in range(3):
            pusher.submit(server.address, [output("a", i)])
        await pusher.flush(server.address, timeout=10)
        for i in range(3, 6):
            pusher.submit(server.address, [output("a", i, finished=i == 5)])
            await asyncio.sleep(0.01)
        await pusher.flush(server.address, timeout=10)
        assert sink.indices == list(range(6)) and pusher.given_up == 0
    finally:
        await pusher.close()
        await server.stop(None)


# -- #13 over the stream -------------------------------------------------------------------------------------------
def batch(
    seq: int, instance_id: str, *outputs: common_pb2.RequestOutput, ask: bool = False, pusher: int = 7
) -> frontend_pb2.StreamOutputsRequest:
    message = frontend_pb2.StreamOutputsRequest(seq=seq, ack_requested=ask, pusher_id=pusher)
    message.batch.instance_id = instance_id
    message.batch.outputs.extend(outputs)
    return message


async def grpc_stream(
    stack: Stack, role: str, id: str, *messages: frontend_pb2.StreamOutputsRequest
) -> list[frontend_pb2.StreamOutputsResponse]:
    async with secure_channel(stack.sink_address, stack.pki.paths(role, id)) as channel:
        call = frontend_pb2_grpc.OutputSinkServiceStub(channel).StreamOutputs(timeout=DEADLINE)
        for message in messages:
            await call.write(message)
        await call.done_writing()
        return [reply async for reply in call]


async def framed_stream(
    stack: Stack, role: str, id: str, *messages: frontend_pb2.StreamOutputsRequest
) -> list[frontend_pb2.StreamOutputsResponse]:
    """The same exchange over the sink's framed stream (``DescribeSink``), as a llumlet's pusher opens it."""
    call = await FramedCall.open(
        stack.sink.stream_address,
        frontend_pb2.StreamOutputsResponse,
        ssl_context=client_ssl_context(stack.pki.paths(role, id)),
        server_name=role_name("frontend"),
        timeout=DEADLINE,
    )
    try:
        for message in messages:
            await call.write(message)
        await call.done_writing()
        replies: list[frontend_pb2.StreamOutputsResponse] = []
        async with asyncio.timeout(DEADLINE):
            while (reply := await call.read()) is not grpc.aio.EOF:
                assert isinstance(reply, frontend_pb2.StreamOutputsResponse)
                replies.append(reply)
        return replies
    finally:
        call.cancel()


@pytest.mark.parametrize("transport", ["grpc", "framed"])
async def test_the_stream_keeps_the_capability_checks_and_max_tokens(stack: Stack, transport: str) -> None:
    """The framed stream is the same exchange: every #13 check holds on it too (old behaviour: no framed stream)."""
    stream = grpc_stream if transport == "grpc" else framed_stream
    request, cap = await submit(stack)
    replies = await stream(stack, "llumlet", "i-1", batch(1, "i-1", out("victim", 0, VICTIM[:3], cap)))
    assert replies == [], "an unasked batch of known requests gets no answer"
    foreign = [1000, 1001, 1002]
    # Another llumlet (its own certificate) as the victim's instance, or as itself with the stolen token.
    await stack.refused(
        stream(stack, "llumlet", "i-2", batch(1, "i-1", out("victim", 3, foreign, cap))),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller llumlet i-2 may not push outputs as 'i-1'",
    )
    # with the stolen token: that output alone is refused (listed as unknown), the stream goes on
    replies = await stream(stack, "llumlet", "i-2", batch(1, "i-2", out("victim", 3, foreign, cap, instance_id="i-2")))
    assert [list(r.unknown_request_ids) for r in replies] == [["victim"]]
    assert stack.sink.refused_outputs == 1
    # Only llumlets stream (the scheduler keeps the unary push for its lost-instance notices). Refused by its role
    # before any message is read: the call writes none (a write racing the refusal fails in grpc's core, and the call
    # then ends INTERNAL "Internal error from Core" instead of with the server's status: seen once in ~8 loaded runs).
    await stack.refused(stream(stack, "scheduler", "s0"), grpc.StatusCode.PERMISSION_DENIED, "StreamOutputs")
    # The holder: the rest, then tokens beyond max_tokens (8), in one asked batch; a new stream's question (seq 0)
    # is answered with the last batch applied, per verified pusher (another llumlet learns nothing of i-1's).
    extra = out("victim", 3, [*VICTIM[3:], 900, 901], cap, finish=LENGTH)
    replies = await stream(stack, "llumlet", "i-1", batch(2, "i-1", extra, ask=True), batch(0, "i-1", ask=True))
    assert [(r.acked_seq, list(r.unknown_request_ids)) for r in replies] == [(2, []), (2, [])]
    # i-2 learns its own last batch (1, whose one output was refused), never i-1's (2)
    assert [r.acked_seq for r in await stream(stack, "llumlet", "i-2", batch(0, "i-1", ask=True))] == [1]
    tokens, reason, _ = await collect(request)
    assert tokens == VICTIM and reason == LENGTH, "exactly the holder's tokens, none past max_tokens"
    # A batch naming a request the frontend no longer tracks is answered at once, asked or not.
    replies = await stream(stack, "llumlet", "i-1", batch(3, "i-1", out("gone", 0, [1], cap)))
    assert [(r.acked_seq, list(r.unknown_request_ids)) for r in replies] == [(3, ["gone"])]


async def test_nothing_follows_the_final_error_of_a_request_given_up() -> None:
    """Old behaviour: an output the llumlet produced after the give-up (before its abort landed) was pushed after the
    request's final ERROR, so the frontend's last word on it was an unfinished output."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(budget_s=4.0, attempt_timeout_s=0.5))
    sink = CountingSink()
    try:
        pusher.submit(address, [output("r", 0)])
        await until(lambda: pusher.given_up == 1, 20, "the give-up")
        pusher.submit(address, [output("r", 1)])  # the llumlet's next step, before its abort of "r" ran
        await sink.start_on(port)  # back within the notice's own budget (the channel redials within ~2 s)
        await pusher.flush(address, timeout=20)
        outs = sink.outputs["r"]
        assert outs[-1].finished and outs[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "could not deliver outputs to frontend" in outs[-1].error
        assert [o.first_token_index for o in outs if o.token_ids] == [], "nothing of r after (or before) its ERROR"
    finally:
        await pusher.close()
        await sink.stop()


async def test_a_decoding_stream_keeps_one_wake_up_timer_between_answers() -> None:
    """A batch schedules at most its write's deadline and the moved quiet-gap deadline of the next empty ask (since
    b8af584 that deadline follows the last outputs, so its timer is re-armed per batch instead of ringing mid-flow: a
    heap push of a few microseconds against an event-loop wake-up of ~0.15 ms; ``test_output_hold`` bounds the rings).
    So the bound here is 2 per batch again, as before session 6 kept the wait's timer; it still catches a wait that
    adds timers of its own on top."""
    sink = CountingSink()
    await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0))
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        task = asyncio.current_task()
        timers += task is not None and task.get_name().startswith("push-")  # the sender's, not this test's polls
        return call_at(when, callback, *args, **kwargs)

    try:
        pusher.submit(sink.address, [output("r", 0)])
        await pusher.flush(sink.address, timeout=5)
        loop.call_at = counting_call_at  # type: ignore[method-assign,assignment]
        for i in range(1, 41):
            pusher.submit(sink.address, [output("r", i)])
            await until(lambda n=i + 1: sink.messages == n, 5, f"batch {i}")
        assert sink.raw_indices("r") == list(range(41))
        # Per batch: its write's deadline and the re-armed ask deadline.
        assert timers <= 2 * 40 + 10, f"{timers} timers for 40 batches"
    finally:
        loop.call_at = call_at  # type: ignore[method-assign]
        await pusher.close()
        await sink.stop()


async def test_the_senders_wait_ends_at_its_deadline_or_at_a_wake_and_rearms_after_ringing() -> None:
    from pyllumnix.data_plane.llumlet.output_push import _Sink

    sink = _Sink("127.0.0.1:1")
    try:
        start = time.monotonic()
        assert not await OutputPusher._sleep(sink, start + 0.05), "the deadline came first"
        assert time.monotonic() - start >= 0.04
        assert not await OutputPusher._sleep(sink, time.monotonic() - 1), "a past deadline does not wait"
        deadline = time.monotonic() + 5
        asyncio.get_running_loop().call_later(0.02, sink.wake.set)
        assert await OutputPusher._sleep(sink, deadline), "woken before the deadline"
        kept = sink.alarm
        asyncio.get_running_loop().call_later(0.02, sink.wake.set)
        assert await OutputPusher._sleep(sink, deadline) and sink.alarm is kept, "the same deadline keeps its timer"
        # An alarm that rang (a hair early, say) is armed again rather than waited for for ever.
        assert kept is not None
        kept.cancel()
        sink.alarm = None
        assert not await asyncio.wait_for(OutputPusher._sleep(sink, time.monotonic() + 0.05), 2)
    finally:
        if sink.alarm is not None:
            sink.alarm.cancel()
        await sink.channel.close()


async def test_the_framed_stream_checks_both_peers(stack: Stack) -> None:
    """A plaintext client gets no batch applied (the port is mutual TLS only); a llumlet refuses a listener whose
    certificate does not name the frontend role (another component on that host cannot pose as the sink)."""
    plain = await FramedCall.open(
        stack.sink.stream_address, frontend_pb2.StreamOutputsResponse, ssl_context=None, server_name=None, timeout=5
    )
    try:
        with contextlib.suppress(ConnectionError):
            await plain.write(batch(1, "i-1", ask=True))
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(plain.read(), DEADLINE) is grpc.aio.EOF
    finally:
        plain.cancel()
    assert stack.sink.pushes == 0 and stack.sink.streams == 0

    impostor = await asyncio.start_server(
        stack.sink.serve_framed, "127.0.0.1", 0, ssl=server_ssl_context(stack.pki.paths("llumlet", "i-2"))
    )
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await FramedCall.open(
                f"127.0.0.1:{impostor.sockets[0].getsockname()[1]}",
                frontend_pb2.StreamOutputsResponse,
                ssl_context=client_ssl_context(stack.pki.paths("llumlet", "i-1")),
                server_name=role_name("frontend"),
                timeout=DEADLINE,
            )
    finally:
        impostor.close()
