"""#20 lean token path: ``infra.framed``, a protobuf stream as length-prefixed frames (the llumlets' output push
without gRPC's per-message work), and the pusher over it.

Checked here: messages cross both ways intact and a status ends the stream as ``AioRpcError`` (one error model for
both transports); a broken or hostile peer (oversized frame, unknown kind, a connection cut inside a frame) ends the
connection instead of being trusted; a llumlet pushes every output over the frontend's framed stream when offered
(none over gRPC's StreamOutputs), resends after a break exactly what was not applied, and falls back to gRPC when the
framed address cannot be reached.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.frontend.requests import RequestTracker
from pyllumnix.control_plane.frontend.sink import OutputSinkServicer
from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.data_plane.llumlet.output_push import FRAMED_RETRY_S, OutputPusher, PushSettings
from pyllumnix.infra import framed
from pyllumnix.infra.framed import (
    DONE,
    MESSAGE,
    FramedCall,
    FramedContext,
    FramedServerStream,
    FrameError,
    frame,
    listen,
    read_frame,
    serve_connection,
    status_frame,
)
from pyllumnix.infra.security.bootstrap import ClusterSecurity
from pyllumnix.infra.security.ca import CertPaths, role_name
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context
from pyllumnix.protos.llumnix.v1 import frontend_pb2, scheduler_pb2
from tests.test_llumlet_output_push import StallingSink, free_port, until
from tests.test_load_reporting import leader, load
from tests.test_output_stream import output
from tests.test_security_outputs import CLUSTER, pki

__all__ = ["pki"]  # fixtures used here

REQ = frontend_pb2.StreamOutputsRequest
RESP = frontend_pb2.StreamOutputsResponse


async def _feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_read_back_and_a_clean_end_is_none() -> None:
    body = REQ(seq=3, pusher_id=9).SerializeToString()
    reader = await _feed(frame(MESSAGE, body) + frame(DONE, b""))
    assert await read_frame(reader, 1024) == (MESSAGE, body)
    assert await read_frame(reader, 1024) == (DONE, b"")
    assert await read_frame(reader, 1024) is None


@pytest.mark.parametrize(
    "data, why",
    [
        (frame(MESSAGE, b"x" * 2048), "bad frame"),  # longer than the limit
        (struct.pack(">BI", 7, 1) + b"x", "bad frame"),  # unknown kind
        (frame(MESSAGE, b"abcdef")[:7], "inside a frame"),  # cut inside the body
        (frame(MESSAGE, b"abc")[:3], "inside a frame header"),  # cut inside the header
    ],
)
async def test_a_broken_or_hostile_peer_ends_the_connection(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        await read_frame(await _feed(data), 1024)


async def _serve_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with its seq; ends PERMISSION_DENIED at seq 99, as a refusing sink does."""
    stream = FramedServerStream(reader, writer, REQ)
    async for message in stream.messages():
        if message.seq == 99:
            try:
                await FramedContext().abort(grpc.StatusCode.PERMISSION_DENIED, "caller llumlet x may not push")
            except Exception as exc:
                await stream.end(exc.code, exc.details)  # type: ignore[attr-defined]
                return
        await stream.send(RESP(acked_seq=message.seq))
    await stream.end()


async def test_a_call_carries_messages_both_ways_and_ends_with_eof_or_the_status() -> None:
    server = await asyncio.start_server(_serve_echo, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        call = await FramedCall.open(address, RESP, ssl_context=None, server_name=None, timeout=5)
        for seq in (1, 2, 3):
            await call.write(REQ(seq=seq))
        await call.done_writing()
        replies = [await call.read() for _ in range(4)]
        assert [r.acked_seq for r in replies[:3]] == [1, 2, 3]  # type: ignore[attr-defined]
        assert replies[3] is grpc.aio.EOF, "the server's clean close after DONE reads as EOF"

        call = await FramedCall.open(address, RESP, ssl_context=None, server_name=None, timeout=5)
        await call.write(REQ(seq=99))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not push" in (info.value.details() or "")
        call.cancel()
    finally:
        server.close()
        await server.wait_closed()


def test_a_status_frame_names_its_code() -> None:
    data = status_frame(grpc.StatusCode.UNAVAILABLE, "stopping")
    assert data[0] == 1 and data[5:7] == struct.pack(">H", grpc.StatusCode.UNAVAILABLE.value[0])


class FramedCountingSink(StallingSink):
    """Counts gRPC StreamOutputs streams beside the framed ones (``framed_streams``)."""

    def __init__(self) -> None:
        super().__init__()
        self.grpc_streams = 0

    async def StreamOutputs(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.grpc_streams += 1
        async for reply in super().StreamOutputs(request_iterator, context):
            yield reply


async def test_a_llumlet_pushes_over_the_framed_stream_and_resends_nothing_already_applied() -> None:
    """Old behaviour: every batch went over gRPC's StreamOutputs (no DescribeSink, no framed stream). After a break
    the new framed stream asks (seq 0) what was applied: five applied, unanswered batches are not applied again."""
    sink = FramedCountingSink()
    address = await sink.start(framed=True)
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0, attempt_timeout_s=1.0))
    try:
        for i in range(5):
            pusher.submit(address, [output("a", i)])
            await until(lambda n=i + 1: sink.calls == n, 5, f"batch {i + 1} applied")
        assert sink.framed_streams == 1 and sink.grpc_streams == 0, "the batches went over the framed stream"
        sink.drop_framed_connections()  # the stream breaks; the sink remembers what it applied
        pusher.submit(address, [output("a", 5, finished=True)])
        await pusher.flush(address, timeout=10)
        assert sink.raw_indices("a") == list(range(6)), "each batch applied once, in order"
        assert sink.framed_streams == 2 and sink.grpc_streams == 0 and pusher.retries >= 1
        assert (pusher.framed_streams, pusher.grpc_streams) == (2, 0), "the pusher counts what it opened"
        assert pusher.given_up == 0
    finally:
        await pusher.close()
        await sink.stop()


async def test_an_unreachable_framed_stream_falls_back_to_grpc_for_a_while() -> None:
    """Old behaviour (review of 22cc452): one failed connect moved the sender to gRPC until it retired, so a frontend
    restarted at the same address was never pushed to over frames again."""
    sink = FramedCountingSink()
    address = await sink.start()
    sink.stream_address = f"127.0.0.1:{free_port()}"  # offered, but nobody listens there (a firewall, say)
    pusher = OutputPusher("i", lambda _: None)
    try:
        for i in range(4):
            pusher.submit(address, [output("b", i, finished=i == 3)])
        await pusher.flush(address, timeout=10)
        assert sink.raw_indices("b") == list(range(4)) and pusher.given_up == 0
        assert sink.grpc_streams == 1 and sink.framed_streams == 0
        assert (pusher.framed_streams, pusher.grpc_streams) == (0, 1)
        held = pusher._sinks[address]
        assert held.framed_off_until > time.monotonic() + FRAMED_RETRY_S - 5, "not tried again for a while"
        await sink.start_framed()  # it comes back (elsewhere): once the while is over, a new stream goes framed
        assert await pusher._framed(held) is None, "still within the while"
        held.framed_off_until = 0.0
        call = await pusher._framed(held)
        assert call is not None, "asked where it listens now and connected"
        call.cancel()
    finally:
        await pusher.close()
        await sink.stop()


async def test_listen_takes_bracketed_and_wildcard_hosts() -> None:
    """Old behaviour: ``--host [::1]`` or ``--host [::]`` crashed the frontend and the scheduler at start
    (``asyncio.start_server`` takes no brackets); a wildcard bound IPv6 only (or two sockets on two ports)."""
    for host, dial in (("[::1]", "[::1]"), ("::", "127.0.0.1"), ("[::]", "[::1]"), ("", "127.0.0.1")):
        server, port = await listen(_serve_echo, host, 0, None)
        try:
            call = await FramedCall.open(f"{dial}:{port}", RESP, ssl_context=None, server_name=None, timeout=5)
            await call.write(REQ(seq=5))
            assert getattr(await call.read(), "acked_seq", None) == 5, (host, dial)
            call.cancel()
        finally:
            server.close()


async def test_an_undecodable_message_ends_the_stream_invalid_argument_and_a_silent_client_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Old behaviour: a DecodeError escaped the connection callback (asyncio logged it, no status was sent); a
    connection that never sent a frame held its socket and handler for ever."""
    monkeypatch.setattr(framed, "FIRST_FRAME_TIMEOUT_S", 0.2)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def run(stream: FramedServerStream[frontend_pb2.StreamOutputsRequest]) -> None:
            async for message in stream.messages():
                await stream.send(RESP(acked_seq=message.seq))

        await serve_connection(reader, writer, REQ, run)

    server, port = await listen(handler, "127.0.0.1", 0, None)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(MESSAGE, b"\xff\xff\xff"))
        call = FramedCall(reader, writer, RESP)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        call.cancel()

        silent = await FramedCall.open(f"127.0.0.1:{port}", RESP, ssl_context=None, server_name=None, timeout=5)
        assert await asyncio.wait_for(silent.read(), 5) is grpc.aio.EOF, "dropped after the first-frame timeout"
        silent.cancel()
    finally:
        server.close()


async def _report(
    address: str, paths: CertPaths, *reports: scheduler_pb2.ReportLoadRequest
) -> scheduler_pb2.ReportLoadResponse:
    call = await FramedCall.open(
        address,
        scheduler_pb2.ReportLoadResponse,
        ssl_context=client_ssl_context(paths),
        server_name=role_name("scheduler"),
        timeout=5,
    )
    try:
        for report in reports:
            await call.write(report)
        await call.done_writing()
        reply = await asyncio.wait_for(call.read(), 5)
        assert isinstance(reply, scheduler_pb2.ReportLoadResponse)
        return reply
    finally:
        call.cancel()


async def test_the_framed_load_stream_keeps_reportloads_checks(pki: ClusterSecurity) -> None:
    """The leader's framed report stream admits llumlets only, each reporting only itself (old behaviour: no framed
    stream; on gRPC the role table and ``require_self`` say the same)."""
    replica = leader()
    servicer = SchedulerServicer(replica)
    servicer.framed_cluster = CLUSTER
    server, port = await listen(
        servicer.serve_framed_reports, "127.0.0.1", 0, server_ssl_context(pki.paths("scheduler", "s1"))
    )
    address = f"127.0.0.1:{port}"
    try:
        own = scheduler_pb2.ReportLoadRequest(load=load("i-1", 1))
        reply = await _report(address, pki.paths("llumlet", "i-1"), own)
        assert reply.reports_accepted == 1 and replica.cluster.loads["i-1"].seq == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _report(address, pki.paths("llumlet", "i-2"), scheduler_pb2.ReportLoadRequest(load=load("i-1", 2)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert replica.cluster.loads["i-1"].seq == 1, "another llumlet's report for i-1 was not taken"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _report(address, pki.paths("client", "u1"), scheduler_pb2.ReportLoadRequest(load=load("i-1", 3)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "ReportLoad" in (info.value.details() or "")
        assert replica.cluster.loads["i-1"].seq == 1
        servicer.framed_cluster = None  # a TLS listener wired without its trust domain admits nobody
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _report(address, pki.paths("llumlet", "i-1"), scheduler_pb2.ReportLoadRequest(load=load("i-1", 4)))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert replica.cluster.loads["i-1"].seq == 1
    finally:
        server.close()
        servicer.close_framed()


async def test_a_stopping_frontend_offers_no_framed_stream() -> None:
    """Old behaviour (review of 22cc452): between closing its framed listener and ending its streams a frontend still
    named the closed port, and the pushers reconnecting then took it for unreachable."""
    sink = OutputSinkServicer(RequestTracker())
    sink.stream_address = "127.0.0.1:1"
    request = frontend_pb2.DescribeSinkRequest()
    assert (await sink.DescribeSink(request, cast(Any, None))).stream_address == "127.0.0.1:1"
    await sink.end_streams(0.1)
    assert (await sink.DescribeSink(request, cast(Any, None))).stream_address == ""
