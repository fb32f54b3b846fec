"""Stopping a frontend ends the llumlets' push streams (``StreamOutputs``) cleanly and quietly.

A push stream never ends on its own. Before, ``FrontendGrpc.stop`` left it open: the stop waited out its whole grace
period, the server then cancelled the stream (the pusher saw CANCELLED), and when the process's loop closed before
grpc's cancelled handler had finished, grpc logged "Exception not handled by _handle_exceptions in servicer method
[/llumnix.v1.OutputSinkService/StreamOutputs] ... CancelledError" with a traceback: noise in every worker frontend's
shutdown (``bench peers``, ``serve``). A real error in a stream's handler is still logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from tests.test_frontend_fakes import running_stack

GRACE_S = 30.0  # the stop must not wait for it: the stream is ended at once
DEADLINE_S = 15.0
BATCHES = 100  # of ~200 KiB of replies each: more than grpc buffers for a reader that reads none


class PushStream:
    """A llumlet's side of one ``StreamOutputs`` stream, held open by the test."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.outbox: asyncio.Queue[frontend_pb2.StreamOutputsRequest] = asyncio.Queue()

        async def messages() -> AsyncIterator[frontend_pb2.StreamOutputsRequest]:
            while True:
                yield await self.outbox.get()

        self.call = frontend_pb2_grpc.OutputSinkServiceStub(self.channel).StreamOutputs(messages())

    async def push(self, seq: int, outputs: Sequence[common_pb2.RequestOutput]) -> frontend_pb2.StreamOutputsResponse:
        batch = frontend_pb2.PushOutputsRequest(instance_id="i-0", outputs=outputs)
        await self.outbox.put(frontend_pb2.StreamOutputsRequest(seq=seq, pusher_id=1, batch=batch, ack_requested=True))
        reply = await asyncio.wait_for(self.call.read(), DEADLINE_S)
        assert isinstance(reply, frontend_pb2.StreamOutputsResponse)
        return reply

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def unknown_output() -> common_pb2.RequestOutput:
    return common_pb2.RequestOutput(request_id="nobody", token_ids=[5], first_token_index=0)


def own_errors(records: Sequence[logging.LogRecord]) -> list[logging.LogRecord]:
    """The error records of this test's own process, less one from an earlier test's loop.

    grpc's poller thread is process-wide: an event that completes a call left over by an earlier test in this worker is
    handed, from this test's loop, to that test's loop, which pytest has closed ("Event loop is closed" inside
    ``PollerCompletionQueue._handle_events``, once in a CI run). This test's own loop runs while it logs, so such a
    record is never about this test's frontend.
    """

    def foreign(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return (
            isinstance(error, RuntimeError)
            and str(error) == "Event loop is closed"
            and "PollerCompletionQueue._handle_events" in record.getMessage()
        )

    return [r for r in records if (r.levelno >= logging.ERROR or r.exc_info) and not foreign(r)]


async def cancel_leftover_tasks() -> None:
    """What ``asyncio.run`` does when the process's main coroutine returns (where grpc logged the error)."""
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


@pytest.mark.parametrize("grace", [GRACE_S, None])
async def test_stopping_a_frontend_ends_an_open_push_stream_cleanly_and_logs_nothing(
    grace: float | None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old behaviour: a stop with a grace took all of it (TimeoutError here); either way the stream ended CANCELLED,
    and grpc logged the handler's CancelledError with a traceback whenever the process's loop closed first (3 of 10
    runs of a bare frontend stop; 0 of 10 now)."""
    caplog.set_level(logging.INFO)
    async with running_stack([]) as stack:
        stream = PushStream(stack.frontend.sink_address)
        try:
            reply = await stream.push(1, [unknown_output()])
            assert reply.acked_seq == 1 and list(reply.unknown_request_ids) == ["nobody"], "the stream is served"
            await asyncio.wait_for(stack.grpc.stop(grace), DEADLINE_S)
            assert await asyncio.wait_for(stream.call.code(), DEADLINE_S) == grpc.StatusCode.OK
        finally:
            await stream.close()
    await cancel_leftover_tasks()
    errors = own_errors(caplog.records)
    assert not errors, [r.getMessage() for r in errors]
    assert "Traceback" not in capsys.readouterr().err


async def test_a_real_error_in_a_push_stream_is_still_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the frontend's own ending of its streams is quiet: a handler that fails still logs why."""

    def explode(instance_id: str, outputs: Sequence[common_pb2.RequestOutput]) -> list[str]:
        raise RuntimeError("routing exploded")

    async with running_stack([]) as stack:
        monkeypatch.setattr(stack.frontend.tracker, "route", explode)
        stream = PushStream(stack.frontend.sink_address)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stream.push(1, [unknown_output()])
            assert failed.value.code() == grpc.StatusCode.UNKNOWN
        finally:
            await stream.close()
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any("routing exploded" in str(r.exc_info[1]) for r in logged if r.exc_info), [
        r.getMessage() for r in caplog.records
    ]


async def test_a_stream_opened_while_the_frontend_stops_is_ended_at_once_and_not_counted() -> None:
    """``streams`` counts the push streams served. Old: it also counted a stream the stopping sink ended at once."""
    async with running_stack([]) as stack:
        servicer = stack.grpc.sink_servicer
        assert servicer is not None
        first = PushStream(stack.frontend.sink_address)
        try:
            await first.push(1, [unknown_output()])
            assert servicer.streams == 1
            await asyncio.wait_for(servicer.end_streams(DEADLINE_S), DEADLINE_S)  # what a stop does first
            assert await asyncio.wait_for(first.call.code(), DEADLINE_S) == grpc.StatusCode.OK
        finally:
            await first.close()
        late = PushStream(stack.frontend.sink_address)
        try:
            assert await asyncio.wait_for(late.call.code(), DEADLINE_S) == grpc.StatusCode.OK, "ended at once"
        finally:
            await late.close()
        assert servicer.streams == 1


async def test_a_stream_whose_reply_is_being_written_when_the_frontend_stops_still_ends_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``end_streams`` cancelled every stream's task. One suspended in grpc's write of a reply (this handler's generator
    parked at ``yield``) took the cancel in grpc's own frames: the handler ended with no status, the stream stayed
    open and the stop waited out its whole grace ("task cancellation failed" in a CI run, where that stop is bounded
    by ``DEADLINE_S``). Here the pusher reads no replies until the stop has begun, so flow control holds the sink's
    write of a large one (every id unknown)."""
    caplog.set_level(logging.INFO)
    async with running_stack([]) as stack:
        servicer = stack.grpc.sink_servicer
        assert servicer is not None
        stream = PushStream(stack.frontend.sink_address)
        try:
            outputs = [
                common_pb2.RequestOutput(request_id=f"nobody-{i:04d}-{'x' * 200}", token_ids=[5]) for i in range(1000)
            ]
            batch = frontend_pb2.PushOutputsRequest(instance_id="i-0", outputs=outputs)
            for seq in range(1, BATCHES + 1):
                await stream.outbox.put(
                    frontend_pb2.StreamOutputsRequest(seq=seq, pusher_id=1, batch=batch, ack_requested=True)
                )
            seen = -1
            while seen != servicer.pushes:  # until the sink stops applying: it is blocked in a write
                seen = servicer.pushes
                await asyncio.sleep(0.3)
            assert 0 < seen < BATCHES, f"the sink applied {seen} of {BATCHES} batches: it never blocked writing"

            async def read_later() -> None:
                await asyncio.sleep(0.5)  # the stop has begun
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while await stream.call.read() is not grpc.aio.EOF:
                        pass

            reader = asyncio.create_task(read_later())
            await asyncio.wait_for(stack.grpc.stop(GRACE_S), DEADLINE_S)
            await asyncio.wait_for(reader, DEADLINE_S)
        finally:
            await stream.close()
    await cancel_leftover_tasks()
    errors = own_errors(caplog.records)
    assert not errors, [r.getMessage() for r in errors]


def test_only_a_closed_loop_record_from_grpcs_poller_is_left_out() -> None:
    """The filter above hides no error of this test's own: the same RuntimeError elsewhere, or another error, stays."""

    def record(message: str, error: BaseException | None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, exc_info)

    closed = RuntimeError("Event loop is closed")
    poller = "Exception in callback PollerCompletionQueue._handle_events(<_UnixSelectorEventLoop>)()"
    kept = [
        record("Exception in callback Sink.end_streams()", closed),
        record(poller, RuntimeError("other")),
        record("Exception not handled by _handle_exceptions in servicer method", None),
    ]
    assert own_errors([record(poller, closed), *kept]) == kept
