"""One way to start a grpc.aio server: the given services plus health checking (and reflection when asked for).

Every process of the system (scheduler replicas, llumlets, frontends, test sinks) starts its server here, so health
is always on, the bound port is always reported the same way, and security is applied in one place: with the
process's security settings (``infra.security.runtime``) secure, the port requires CA-signed client certificates
and a ``RoleInterceptor`` checks each call's method against the caller's role. Reflection is off unless the settings
(``--reflection``) or the caller ask for it: it hands out the whole schema to anyone who may connect. A request body
that does not parse is answered INVALID_ARGUMENT (``MalformedRequestInterceptor``), not grpc's UNKNOWN.
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pyllumnix.infra import tracing
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.runtime import SecuritySettings

# (add_XServicer_to_server, servicer instance, full service name, e.g. "llumnix.v1.LlumletService")
ServiceBinding = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]

# A connection that has not finished its TLS and HTTP/2 handshake by then is closed. gRPC core's default is 120 s, so
# anyone who could reach a port (the public one too) held a socket per silent connection for two minutes, without
# authenticating (attack 9 B8); the KV data plane's TLS handshake timeout is 10 s too.
HANDSHAKE_TIMEOUT_MS = 10_000

# An authenticated connection with no call open for this long is closed (GOAWAY; the client's channel reconnects at
# its next call): without it, gRPC core holds a connection that carries nothing for ever, so a peer, or a crashed
# one's half-open socket, pinned server resources without limit. A connection with an open stream (the output push
# stream, load report streams, watches) is not idle however long the stream lasts.
MAX_CONNECTION_IDLE_MS = 300_000
# A connection with an open stream whose peer vanished (host gone, no FIN) is found by the server's own pings: one
# every KEEPALIVE_TIME_MS while a call is open, the connection closed when the answer takes KEEPALIVE_TIMEOUT_MS.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# Clients' pings: the client library's channels ping every 20 s during calls (pyllumnix.clients.channel, to find a
# vanished server host); a client may ping during calls at most every 10 s, and not
# at all on a connection without calls (pinging must not keep an idle connection busy); past 2 strikes gRPC closes
# the connection (ENHANCE_YOUR_CALM).
MIN_RECV_PING_INTERVAL_MS = 10_000

DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_RECV_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
)


# Bind hosts that name every interface rather than one host.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC spells a bind address or a target: an IPv6 literal goes in brackets (``::1:0`` is no
    address gRPC can bind, and ``:::0`` no name it can resolve)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def local_host(host: str) -> str:
    """Where a client on this machine dials an asyncio server (the frontend's HTTP API) bound on ``host``: the host
    itself, or loopback of the wildcard's own family (asyncio binds ``::`` IPv6-only, so nothing listens on 127.0.0.1
    there; gRPC binds ``[::]`` dual-stack, and ``RunningServer.address`` keeps 127.0.0.1)."""
    if host in ("::", "[::]"):
        return "::1"
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def is_loopback_host(host: str) -> bool:
    """Whether a bind on ``host`` is reachable from this machine only (``localhost`` or a loopback literal); a wildcard,
    another address or a host name is reachable from the network."""
    bare = host.strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def advertised_host(host: str, advertise_host: str = "") -> str:
    """The name peers use for a process bound on ``host``: ``advertise_host`` if given, else ``host``, else (a
    wildcard bind names no host) this machine's host name, the name ``llumnix serve`` puts in the certificates."""
    if advertise_host:
        return advertise_host
    return socket.gethostname() if host in WILDCARD_HOSTS else host


def advertised_address(host: str, advertise_host: str, port: int) -> str:
    """``host:port`` peers dial to reach a server bound on ``host`` (see :func:`advertised_host`), as gRPC spells a
    target: an IPv6 literal in brackets (``::1:5000`` is no target)."""
    return host_port(advertised_host(host, advertise_host), port)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    # The host it was bound on, as given to ``start_server``.
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        """Where a client on this machine dials the server: the host it is bound on, or loopback for a wildcard bind
        (which names no host; peers on other machines need the name the process advertises, ``--advertise-host``)."""
        return host_port("127.0.0.1" if self.host in WILDCARD_HOSTS else self.host, self.port)

    async def set_serving(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


class MalformedRequest:
    """What a request deserializer hands on instead of raising when the bytes are no valid message of its type."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _parse_or_mark(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return MalformedRequest(str(exc))

    return parse


async def _refuse_malformed(request: Any, context: Any) -> None:
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")


def _checked(handler: Any) -> Any:
    """``handler`` (unary request) whose malformed request is refused with INVALID_ARGUMENT before its behaviour."""
    parse = _parse_or_mark(handler.request_deserializer)
    if handler.unary_unary is not None:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await _refuse_malformed(request, context)
            result = uu(request, context)
            return await result if inspect.isawaitable(result) else result

        return handler._replace(unary_unary=unary_unary, request_deserializer=parse)
    us = handler.unary_stream

    async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context)
        result = us(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        elif inspect.isawaitable(result):  # a coroutine that writes with context.write
            await result

    return handler._replace(unary_stream=unary_stream, request_deserializer=parse)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """INVALID_ARGUMENT, not UNKNOWN, for a request body that does not parse (bad UTF-8 in a string field, corrupt
    bytes): grpc.aio answers a deserializer's exception with UNKNOWN "Unexpected <class 'DecodeError'>", which reads
    as a server fault rather than the caller's bad input. It comes last in the chain, so the callers' checks
    (certificate role, API key) still run first and an unauthenticated caller learns nothing about parsing. Requests
    of client streams (ReportLoad, StreamOutputs: internal peers) keep grpc's answer: checking them would mean
    wrapping the servicer's request iterator."""

    def __init__(self) -> None:
        # method -> (the servicer's handler, its checked copy): built once per method, not per call.
        self._checked: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._checked.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        checked = _checked(handler)
        self._checked[method] = (handler, checked)
        return checked


async def start_server(
    bindings: Sequence[ServiceBinding],
    host: str = "127.0.0.1",
    port: int = 0,
    options: Sequence[tuple[str, int]] = DEFAULT_OPTIONS,
    *,
    security: SecuritySettings | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: Any = None,
    reflection_on: bool | None = None,
) -> RunningServer:
    """Starts a server on host:port (port 0 picks a free one) with health; all services SERVING.

    ``security`` defaults to the process's settings. ``credentials`` replaces the port's (a public port: server-only
    TLS, callers authenticated by ``interceptors`` such as API keys, no role check); ``reflection_on`` overrides the
    settings' ``--reflection``, which serves reflection on role-checked ports only: the role table allows it to
    admins, and a public port has no role check (it handed the schema to anyone who could connect).
    """
    settings = security if security is not None else runtime.current()
    public = credentials is not None
    chain = list(interceptors)
    if credentials is None:
        credentials = runtime.server_port_credentials(settings)
        chain = [*runtime.server_interceptors(settings), *chain]
    chain = [*tracing.server_interceptors(), *chain]  # continues callers' traces (none when tracing is off)
    chain.append(MalformedRequestInterceptor())  # innermost: after every check of the caller
    server = grpc.aio.server(options=list(options), interceptors=chain)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME]
    for add, servicer, name in bindings:
        add(servicer, server)
        names.append(name)
    if (settings.reflection and not public) if reflection_on is None else reflection_on:
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    address = host_port(host, port)
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for _, _, name in bindings:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer, host=host)
