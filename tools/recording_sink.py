"""A minimal OutputSinkService that records every pushed output, as a frontend would receive them (tests and
benchmarks use it in place of a frontend)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from pyllumnix.control_plane.frontend.sink import serve_output_stream
from pyllumnix.infra.framed import FramedContext, FramedServerStream, drop_connections, serve_connection
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.runtime import SecuritySettings
from pyllumnix.infra.security.tls import server_ssl_context
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc


class RecordingSink(frontend_pb2_grpc.OutputSinkServiceServicer):
    def __init__(self) -> None:
        self.outputs: dict[str, list[common_pb2.RequestOutput]] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.server: RunningServer | None = None
        self.applied: dict[tuple[str, int], int] = {}  # per pusher: its last batch applied (StreamOutputs)
        # Per request, the instances it was taken back from (TakeBack): their outputs are refused, as a frontend does.
        self.revoked: dict[str, set[str]] = {}
        # The framed push stream (``start(framed=True)``), its address as DescribeSink tells it, streams served.
        self.framed: asyncio.Server | None = None
        self.stream_address = ""
        self.framed_streams = 0
        self._framed_writers: set[asyncio.StreamWriter] = set()

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.PushOutputsResponse:
        unknown: list[str] = []
        for out in request.outputs:
            if (out.instance_id or request.instance_id) in self.revoked.get(out.request_id, ()):
                if out.request_id not in unknown:
                    unknown.append(out.request_id)
                continue
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                self.event(out.request_id).set()
        return frontend_pb2.PushOutputsResponse(unknown_request_ids=unknown)

    async def StreamOutputs(
        self,
        request_iterator: AsyncIterator[frontend_pb2.StreamOutputsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[frontend_pb2.StreamOutputsResponse]:
        """The llumlets' push stream, answered as a frontend answers; each batch goes through ``PushOutputs`` (so a
        subclass that overrides it, e.g. to stall, stalls the stream too)."""

        async def apply(batch: frontend_pb2.PushOutputsRequest) -> list[str]:
            return list((await self.PushOutputs(batch, context)).unknown_request_ids)

        async for reply in serve_output_stream(request_iterator, apply, self.applied):
            yield reply

    async def DescribeSink(
        self, request: frontend_pb2.DescribeSinkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.DescribeSinkResponse:
        return frontend_pb2.DescribeSinkResponse(stream_address=self.stream_address)

    async def serve_framed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The push stream as frames, answered as ``StreamOutputs`` answers (the peer is not checked: a test sink)."""
        self.framed_streams += 1
        context = FramedContext()

        async def apply(batch: frontend_pb2.PushOutputsRequest) -> list[str]:
            return list((await self.PushOutputs(batch, context)).unknown_request_ids)

        async def run(stream: FramedServerStream[frontend_pb2.StreamOutputsRequest]) -> None:
            async for reply in serve_output_stream(stream.messages(), apply, self.applied):
                await stream.send(reply)

        await serve_connection(reader, writer, frontend_pb2.StreamOutputsRequest, run, connections=self._framed_writers)

    def drop_framed_connections(self) -> None:
        """Breaks every open framed stream (the listener stays)."""
        drop_connections(self._framed_writers)

    async def HandOver(
        self, request: frontend_pb2.HandOverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.HandOverResponse:
        """Checks nothing and grants no token, as an insecure frontend answers (llumlets hand over only requests
        that came with a capability, which this sink's users never give)."""
        return frontend_pb2.HandOverResponse()

    async def TakeBack(
        self, request: frontend_pb2.TakeBackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.TakeBackResponse:
        """As an insecure frontend answers: refused when the instance it is taken from pushed the latest tokens (it
        runs the request now); otherwise that instance's later outputs for it are refused."""
        rid, source = request.request_id, request.from_instance_id
        if self.event(rid).is_set():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {rid!r} has ended here")
        pushers = [o.instance_id for o in self.outputs.get(rid, []) if o.token_ids]
        if pushers and pushers[-1] == source:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{source} pushed for {rid!r}: it holds it")
        self.revoked.setdefault(rid, set()).add(source)
        return frontend_pb2.TakeBackResponse()

    def event(self, request_id: str) -> asyncio.Event:
        return self.finished.setdefault(request_id, asyncio.Event())

    async def wait(self, request_id: str, timeout: float = 30.0) -> list[common_pb2.RequestOutput]:
        await asyncio.wait_for(self.event(request_id).wait(), timeout)
        return self.outputs[request_id]

    def tokens(self, request_id: str) -> list[int]:
        """The stream as a frontend keeps it: a token counts only if its index is the next expected one."""
        kept: list[int] = []
        for out in self.outputs.get(request_id, []):
            for i, tok in enumerate(out.token_ids):
                if out.first_token_index + i == len(kept):
                    kept.append(tok)
        return kept

    def raw_indices(self, request_id: str) -> list[int]:
        return [o.first_token_index + i for o in self.outputs.get(request_id, []) for i in range(len(o.token_ids))]

    async def start(self, security: SecuritySettings | None = None, *, framed: bool = False) -> str:
        """Serves on loopback with ``security`` (default: the process's). Secure, it must be a frontend's: llumlets
        pushing outputs check that the sink's certificate names the frontend role. ``framed``: offers the framed
        push stream too (on a free port, with the same TLS terms), as a frontend does."""
        self.server = await start_server(
            [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, self, "llumnix.v1.OutputSinkService")],
            security=security,
        )
        if framed:
            await self.start_framed(security)
        return self.server.address

    async def start_framed(self, security: SecuritySettings | None = None, port: int = 0) -> str:
        paths = (security if security is not None else runtime.current()).paths
        ssl_context = server_ssl_context(paths) if paths is not None else None
        self.framed = await asyncio.start_server(self.serve_framed, "127.0.0.1", port, ssl=ssl_context)
        self.stream_address = f"127.0.0.1:{self.framed.sockets[0].getsockname()[1]}"
        return self.stream_address

    async def stop_framed(self) -> None:
        if self.framed is not None:
            self.framed.close()
            drop_connections(self._framed_writers)
            await self.framed.wait_closed()
            self.framed = None

    async def stop(self) -> None:
        await self.stop_framed()
        if self.server is not None:
            await self.server.stop(None)
