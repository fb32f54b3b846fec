"""``RunningServer.address`` is where the server can be dialled: the host it was bound on, not always 127.0.0.1.

Before the fix it always said ``127.0.0.1:<port>``: a server bound on another address (127.0.0.2 here; a node's own IP
in the multi-host driver, which worked around it) was unreachable at its ``address``; and an IPv6 host (``::1``, ``::``)
could not be bound at all (``::1:0`` is no address gRPC can bind).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pyllumnix.control_plane.frontend.service import server_options
from pyllumnix.infra.grpc_server import (
    DEFAULT_OPTIONS,
    HANDSHAKE_TIMEOUT_MS,
    MAX_CONNECTION_IDLE_MS,
    RunningServer,
    host_port,
    start_server,
)
from pyllumnix.infra.security.authz import guard_handler
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.runtime import INSECURE, from_options, open_channel
from pyllumnix.protos.llumnix.v1 import frontend_pb2, frontend_pb2_grpc


def ipv6_loopback() -> bool:
    """Whether this host can bind ::1 (containers without IPv6 cannot: the IPv6 cases skip). Shared by the IPv6
    tests (``tests/test_advertised_addresses.py``, ``integration/test_ipv6_addresses.py``)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize(
    ("host", "dialled_as"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        pytest.param("::1", "[::1]", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")),
    ],
)
async def test_the_address_is_the_bound_host_and_answers(host: str, dialled_as: str) -> None:
    """Old behaviour: 127.0.0.2 -> address 127.0.0.1:<port> (nothing listens there); ::1 -> bind failed (OSError)."""
    server = await start_server([], host=host)
    try:
        assert server.address == f"{dialled_as}:{server.port}"
        assert await serving(server.address)
    finally:
        await server.stop(None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", ""])
def test_a_wildcard_bind_is_dialled_on_loopback(host: str) -> None:
    """A wildcard names no host: a client on this machine dials loopback (checked without binding every interface)."""
    fake: Any = object()
    assert RunningServer(server=fake, port=5, health=fake, host=host).address == "127.0.0.1:5"


def test_host_port_brackets_ipv6_literals_only() -> None:
    assert host_port("::1", 7) == "[::1]:7"
    assert host_port("[::1]", 7) == "[::1]:7"
    assert host_port("fd00::2", 7) == "[fd00::2]:7"
    assert host_port("10.0.0.3", 7) == "10.0.0.3:7"
    assert host_port("node-a.example", 7) == "node-a.example:7"


class EchoFrontend(frontend_pb2_grpc.FrontendServiceServicer):
    """Generate (unary request, server stream) and Abort (unary), enough to send them any bytes."""

    async def Generate(
        self, request: frontend_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[frontend_pb2.GenerateResponse]:
        yield frontend_pb2.GenerateResponse(request_id=request.request_id, text=request.text, finished=True)

    async def Abort(self, request: frontend_pb2.AbortRequest, context: Any) -> frontend_pb2.AbortResponse:
        return frontend_pb2.AbortResponse()


class NeedsKey(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call without an "authorization" entry, as an API-key check does (from metadata, before the handler)."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if any(key == "authorization" for key, _ in details.invocation_metadata or ()):
            return handler

        async def refuse(context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no key")

        return guard_handler(handler, refuse)


BAD_UTF8_ID = b"\x0a\x02\xc3\x28"  # GenerateRequest/AbortRequest.request_id = the bytes C3 28 (not UTF-8)
GARBAGE = b"\xff\xff\xff\xff"


async def test_a_malformed_request_is_invalid_argument_after_the_callers_checks() -> None:
    """grpc.aio answered a request that does not parse with UNKNOWN "Unexpected <class 'DecodeError'>" (a server
    fault, to the caller); every server of start_server now says INVALID_ARGUMENT, for unary and server-streaming
    methods, while a caller's own checks (an interceptor given to start_server) still answer first."""
    binding = (frontend_pb2_grpc.add_FrontendServiceServicer_to_server, EchoFrontend(), "llumnix.v1.FrontendService")
    server = await start_server([binding], interceptors=[NeedsKey()])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            raw = {"request_serializer": bytes, "response_deserializer": bytes}
            key = (("authorization", "Bearer k"),)
            generate = channel.unary_stream("/llumnix.v1.FrontendService/Generate", **raw)
            abort = channel.unary_unary("/llumnix.v1.FrontendService/Abort", **raw)
            for body in (BAD_UTF8_ID, GARBAGE):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    _ = [m async for m in generate(body, metadata=key, timeout=10)]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "malformed request" in (err.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await abort(body, metadata=key, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await abort(body, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the caller's check before parsing
            stub = frontend_pb2_grpc.FrontendServiceStub(channel)
            request = frontend_pb2.GenerateRequest(request_id="r", text="hi")
            replies = [m async for m in stub.Generate(request, metadata=key, timeout=10)]
            assert [(m.request_id, m.text) for m in replies] == [("r", "hi")]  # a well-formed one is served
            assert await stub.Abort(frontend_pb2.AbortRequest(request_id="r"), metadata=key, timeout=10) is not None
    finally:
        await server.stop(None)


async def test_a_silent_connection_is_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    """Attack 9 B8: a TCP connection that never starts its TLS handshake was held 120 s (gRPC core's default), so
    anyone who could reach a port could pin sockets unauthenticated. Every server of start_server now closes it after
    ``grpc.server_handshake_timeout_ms`` (10 s by default; 1 s here, so the test takes about a second)."""
    assert dict(DEFAULT_OPTIONS)["grpc.server_handshake_timeout_ms"] == HANDSHAKE_TIMEOUT_MS <= 10_000
    options = [(k, 1000 if k == "grpc.server_handshake_timeout_ms" else v) for k, v in DEFAULT_OPTIONS]
    pki = bootstrap_local(tmp_path / "pki", "c1")
    settings = from_options("llumlet", "i-1", tls_dir=pki.directory)
    assert settings.secure
    server = await start_server([], options=options, security=settings)
    try:
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), timeout=8.0) == b""  # closed by the server, not by us
        finally:
            writer.close()
        assert time.monotonic() - start < 6.0, "a silent connection must not be held past the handshake timeout"
        # A real client still gets through (the timeout bounds the handshake only).
        async with open_channel(server.address, peer=None, settings=settings) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_an_idle_connection_is_closed_and_an_open_stream_keeps_its_connection() -> None:
    """An authenticated connection with no call open used to be held for ever (gRPC core has no idle limit): every
    server now closes one idle for ``grpc.max_connection_idle_ms`` (5 min; 0.5 s here). A connection carrying an
    open stream (output pushes, load reports and watches are such streams) is not idle, however long it lasts."""
    assert dict(DEFAULT_OPTIONS)["grpc.max_connection_idle_ms"] == MAX_CONNECTION_IDLE_MS
    assert dict(DEFAULT_OPTIONS)["grpc.keepalive_permit_without_calls"] == 0
    assert ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS) in server_options(1 << 20)  # the frontend's ports
    options = [(k, 500 if k == "grpc.max_connection_idle_ms" else v) for k, v in DEFAULT_OPTIONS]
    server = await start_server([], options=options, security=INSECURE)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(2.0)  # four idle timeouts with the stream open
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await server.set_serving("", False)
            update = await asyncio.wait_for(watch.read(), 10)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING, "the open stream was cut"
            watch.cancel()
            # no call open now: the server says GOAWAY after 0.5 s and the channel goes idle (it would reconnect)
            deadline = time.monotonic() + 10
            state = channel.get_state()
            while state == grpc.ChannelConnectivity.READY and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(channel.wait_for_state_change(state), deadline - time.monotonic())
                state = channel.get_state()
            assert state != grpc.ChannelConnectivity.READY, "an idle connection was held open"
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # the next call reconnects
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(None)
