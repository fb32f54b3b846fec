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

import grpc
import pytest

from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.data_plane.llumlet.output_push import OutputPusher, PushSettings
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
    status_frame,
)
from pyllumnix.infra.security.bootstrap import ClusterSecurity
from pyllumnix.infra.security.ca import CertPaths, role_name
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, scheduler_pb2
from tests.test_llumlet_output_push import StallingSink, free_port, until
from tests.test_load_reporting import leader, load
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


def output(rid: str, index: int, *, finished: bool = False) -> common_pb2.RequestOutput:
    return common_pb2.RequestOutput(
        request_id=rid,
        token_ids=[100 + index],
        first_token_index=index,
        finished=finished,
        finish_reason=common_pb2.FINISH_REASON_LENGTH if finished else common_pb2.FINISH_REASON_UNSPECIFIED,
    )


class FramedCountingSink(StallingSink):
    """Counts gRPC StreamOutputs streams beside the framed ones (``framed_streams``)."""

    def __init__(self) -> None:
        super().__init__()
        self.grpc_streams = 0

    async def StreamOutputs(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.grpc_streams += 1
        async for reply in super().StreamOutputs(request_iterator, context):
            yield reply


async def test_a_llumlet_pushes_over_the_framed_stream_and_resends_only_what_was_not_applied() -> None:
    """Old behaviour: every batch went over gRPC's StreamOutputs (no DescribeSink, no framed stream)."""
    sink = FramedCountingSink()
    address = await sink.start()
    stream_port = free_port()
    await sink.start_framed(port=stream_port)
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0, attempt_timeout_s=1.0))
    try:
        for i in range(5):
            pusher.submit(address, [output("a", i)])
            await until(lambda n=i + 1: sink.calls == n, 5, f"batch {i + 1} applied")
        assert sink.framed_streams == 1 and sink.grpc_streams == 0, "the batches went over the framed stream"
        await sink.stop_framed()  # the stream breaks; the sink remembers what it applied
        await sink.start_framed(port=stream_port)
        pusher.submit(address, [output("a", 5, finished=True)])
        await pusher.flush(address, timeout=10)
        assert sink.raw_indices("a") == list(range(6)), "each batch applied once, in order"
        assert sink.framed_streams == 2 and sink.grpc_streams == 0 and pusher.retries >= 1
        assert pusher.given_up == 0
    finally:
        await pusher.close()
        await sink.stop()


async def test_an_unreachable_framed_stream_falls_back_to_grpc() -> None:
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
    finally:
        await pusher.close()
        await sink.stop()


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
    finally:
        server.close()
