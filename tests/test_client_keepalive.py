"""Keepalive of the client's channels against the servers' ping policy, scaled down 100x so it runs in seconds.

A Generate stream has no deadline by default, so only pings notice a frontend host that vanished without closing the
connection; and the servers close a connection whose client pings more often than they allow (GOAWAY
"too_many_pings"), which would kill a long silent stream (a request queued before its first token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from pyllumnix.clients import AsyncLlumnixClient, UnavailableError
from pyllumnix.clients import channel as client_channel
from pyllumnix.infra.grpc_server import DEFAULT_OPTIONS, RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import frontend_pb2, frontend_pb2_grpc

SCALE = 100


def scaled(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The same options with every ping and keepalive duration divided by SCALE (the same keys: a key grpc does not
    know is ignored as silently here as in production)."""
    timed = ("ping", "keepalive")
    return [
        (key, max(value // SCALE, 1) if key.endswith("_ms") and any(t in key for t in timed) else value)
        for key, value in options
    ]


class SilentFrontend(frontend_pb2_grpc.FrontendServiceServicer):
    """One message, then nothing for ``silence`` seconds, then the finished message."""

    def __init__(self, silence: float) -> None:
        self.silence = silence

    async def Generate(
        self, request: frontend_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[frontend_pb2.GenerateResponse]:
        yield frontend_pb2.GenerateResponse(request_id=request.request_id, token_ids=[1])
        await asyncio.sleep(self.silence)
        yield frontend_pb2.GenerateResponse(
            request_id=request.request_id, token_ids=[2], first_token_index=1, finished=True
        )

    async def Abort(self, request: frontend_pb2.AbortRequest, context: Any) -> frontend_pb2.AbortResponse:
        return frontend_pb2.AbortResponse()


async def serve(silence: float) -> RunningServer:
    binding = (
        frontend_pb2_grpc.add_FrontendServiceServicer_to_server,
        SilentFrontend(silence),
        "llumnix.v1.FrontendService",
    )
    return await start_server([binding], options=scaled(DEFAULT_OPTIONS))


@pytest.fixture
def scaled_client_options(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pinging at the full keepalive rate (no "max pings without data" throttle) is the worst case for the servers.
    options = [*scaled(client_channel.CHANNEL_OPTIONS), ("grpc.http2.max_pings_without_data", 0)]
    monkeypatch.setattr(client_channel, "CHANNEL_OPTIONS", tuple(options))


@pytest.mark.usefixtures("scaled_client_options")
async def test_a_long_silent_stream_is_not_closed_for_its_pings() -> None:
    """15 keepalive periods without a message (300 s unscaled): the server accepts every ping, the stream ends."""
    server = await serve(silence=3.0)
    try:
        async with AsyncLlumnixClient(frontend_endpoints=server.address) as client:
            result = await asyncio.wait_for(client.generate_text([1], max_tokens=2), 10)
        assert result.token_ids == [1, 2]
    finally:
        await server.stop(None)


class FreezingProxy:
    """Forwards TCP to ``target`` until frozen; then passes nothing and closes nothing (a host that vanished)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self.frozen.is_set():
                await asyncio.Event().wait()  # until cancelled
            sink.write(data)
            await sink.drain()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()


@pytest.mark.usefixtures("scaled_client_options")
async def test_a_stream_from_a_vanished_host_fails_instead_of_hanging() -> None:
    server = await serve(silence=60.0)
    proxy = FreezingProxy(int(server.address.rsplit(":", 1)[1]))
    try:
        address = await proxy.start()
        async with AsyncLlumnixClient(frontend_endpoints=address) as client:
            stream = client.generate([1], max_tokens=2)
            await stream.__anext__()
            proxy.frozen.set()
            # Unscaled: a ping 20 s into the silence, unanswered for 10 s. Without pings this waits for ever.
            with pytest.raises(UnavailableError) as err:
                await asyncio.wait_for(stream.__anext__(), 5)
            assert err.value.may_have_started
            await stream.aclose()
    finally:
        await proxy.close()
        await server.stop(None)
