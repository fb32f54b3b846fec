"""A protobuf message stream as length-prefixed frames on one (mutual-TLS) connection: a lean twin of a gRPC
bidirectional stream for the two hottest internal exchanges: a llumlet's output push to a frontend
(``OutputSinkService.DescribeSink``) and its load reports to the scheduler leader (``SchedulerReplica.report_address``).

Why: a grpc.aio stream message costs ~0.4 ms of CPU per side (the C core's batch, its poller thread handing the
completion to the event loop, a second wake-up), more than a push batch's own tokens; on this machine a framed write
is a ``transport.write`` in the step's own wake-up and a read is one wake-up of the receiver
(docs/bench-peers/README.md has the measurements). The messages and their rules are the gRPC method's own; only the
framing differs, so the schema stays ``protos/``.

Frame: one kind byte, a 4-byte big-endian length, the body. ``MESSAGE``: a serialized protobuf message. ``STATUS``:
the stream's end with a gRPC status (2-byte code, UTF-8 details), which the reading side raises as
``grpc.aio.AioRpcError`` so callers keep one error model; a clean end of the connection reads as ``grpc.aio.EOF``.
``DONE``: the client sends no more (gRPC's half-close, which a TLS connection cannot do by itself).
A frame longer than ``max_bytes`` ends the connection (the peer is broken or hostile).

Security: TLS contexts from ``infra.security.tls``; the client checks the server's role name (``server_name``), the
server admits a peer with ``framed_caller`` (the role table's rule of the gRPC method the stream stands for).
Liveness: TCP keep-alive on both ends, a first frame due within ``FIRST_FRAME_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from pyllumnix.infra.security.authz import PROJECT_ROLES, authorize
from pyllumnix.infra.security.ca import Identity, IdentityError
from pyllumnix.infra.security.identity import identity_from_transport

log = logging.getLogger(__name__)

MESSAGE = 0
STATUS = 1
DONE = 2
# Unary calls on a connection of their own (``infra.framed_calls``): a request, its response, its failure status.
CALL = 3
REPLY = 4
FAULT = 5
_KINDS = frozenset({MESSAGE, STATUS, DONE, CALL, REPLY, FAULT})
_HEADER = struct.Struct(">BI")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

M = TypeVar("M", bound=Message)


class FrameError(ConnectionError):
    """The peer sent something that is not a frame of this protocol."""


def frame(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body)) + body


def status_frame(code: grpc.StatusCode, details: str) -> bytes:
    number = code.value[0]
    return frame(STATUS, struct.pack(">H", number) + details.encode())


def rpc_error(code: grpc.StatusCode | int, details: str) -> grpc.aio.AioRpcError:
    """The error a gRPC call ending with ``code`` (or its number, as frames carry it) raises, so callers of framed
    exchanges keep gRPC's one error model."""
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _status_error(body: bytes) -> grpc.aio.AioRpcError:
    if len(body) < 2:
        raise FrameError("a status frame without a code")
    (number,) = struct.unpack(">H", body[:2])
    return rpc_error(number, body[2:].decode(errors="replace"))


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[int, bytes] | None:
    """The next frame, None at a clean end of the connection (no partial frame)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("the connection ended inside a frame header") from exc
        return None
    kind, length = _HEADER.unpack(header)
    if kind not in _KINDS or length > max_bytes:
        raise FrameError(f"bad frame (kind {kind}, {length} bytes; at most {max_bytes})")
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError("the connection ended inside a frame") from exc


async def connect(
    address: str,
    *,
    ssl_context: ssl.SSLContext | None,
    server_name: str | None,
    timeout: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A framed connection to ``address`` (TLS with ``ssl_context``, checking that the server's certificate names
    ``server_name``), TCP keep-alive on. A malformed address raises ConnectionError, as an unreachable one does."""
    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ConnectionError(f"not a host:port address: {address!r}") from None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host.strip("[]"),
                port_number,
                ssl=ssl_context,
                server_hostname=server_name if ssl_context is not None else None,
                limit=max(2**16, min(max_bytes, 2**22)),
            )
    except ValueError as exc:  # e.g. a host name IDNA cannot encode (UnicodeError)
        if isinstance(exc, OSError):  # ssl.SSLCertVerificationError is both: kept as it is
            raise
        raise ConnectionError(f"cannot connect to {address!r}: {exc}") from exc
    keep_alive(writer)
    return reader, writer


class FramedCall(Generic[M]):
    """The client side: ``write`` a request, ``read`` a response (``grpc.aio.EOF`` at the end; a STATUS frame raises
    ``AioRpcError``), ``cancel`` drops the connection. Shaped like a grpc.aio stream-stream call, so a caller written
    for one drives the other."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response_type: type[M],
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._reader, self._writer = reader, writer
        self._response_type = response_type
        self._max_bytes = max_bytes

    @classmethod
    async def open(
        cls,
        address: str,
        response_type: type[M],
        *,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None,
        timeout: float,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> FramedCall[M]:
        """Connects (TLS with ``ssl_context``, checking that the server's certificate names ``server_name``)."""
        reader, writer = await connect(address, ssl_context=ssl_context, server_name=server_name, timeout=timeout)
        return cls(reader, writer, response_type, max_bytes)

    async def write(self, message: Message) -> None:
        """Raises ConnectionError (a FrameError for TLS and socket errors: retryable, as gRPC's UNAVAILABLE)."""
        if self._writer.is_closing():
            raise ConnectionError("the framed stream is closed")
        try:
            self._writer.write(frame(MESSAGE, message.SerializeToString()))
            await self._writer.drain()
        except ConnectionError:
            raise
        except OSError as exc:  # (ssl.SSLError included; TimeoutError is never raised in here)
            raise FrameError(f"the framed stream broke: {exc!r}") from exc

    async def done_writing(self) -> None:
        """No more requests: the server's ``messages()`` ends."""
        self._writer.write(frame(DONE, b""))
        await self._writer.drain()

    async def read(self) -> M | object:
        """The next response, ``grpc.aio.EOF`` at a clean end; a STATUS frame raises ``AioRpcError``, a broken
        stream (reset, TLS alert, garbage) ConnectionError."""
        try:
            got = await read_frame(self._reader, self._max_bytes)
        except ConnectionError:
            raise
        except OSError as exc:
            raise FrameError(f"the framed stream broke: {exc!r}") from exc
        if got is None:
            eof: object = grpc.aio.EOF
            return eof
        kind, body = got
        if kind == STATUS:
            raise _status_error(body)
        if kind != MESSAGE:
            raise FrameError("a server sends messages and a status only")
        reply = self._response_type()
        try:
            reply.ParseFromString(body)
        except DecodeError as exc:
            raise FrameError(f"an undecodable {self._response_type.__name__}") from exc
        return reply

    def cancel(self) -> bool:
        self._writer.transport.abort()
        return True


class FramedAbort(Exception):
    """Raised by a server handler (``FramedContext.abort``) to end the stream with a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FramedContext:
    """What a gRPC servicer's per-call context offers that servicer code uses, so a servicer method serves a framed
    stream unchanged: ``abort`` (raises ``FramedAbort``), the caller's verified identity as grpc's
    ``peer_identities``/``auth_context`` show it (``identity``: the TLS peer ``framed_caller`` checked; None: a
    plaintext connection), no call metadata, and trailing metadata kept but not sent."""

    def __init__(self, identity: Identity | None = None, deadline: float | None = None) -> None:
        self.identity = identity
        self.deadline = deadline  # time.monotonic() by which a framed call must be answered (None: a stream's)
        self.trailing: tuple[tuple[str, str], ...] = ()

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise FramedAbort(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    def peer_identities(self) -> list[bytes] | None:
        return [self.identity.uri.encode()] if self.identity is not None else None

    def auth_context(self) -> dict[str, list[bytes]]:
        if self.identity is None:
            return {}
        # (the certificate was verified by the handshake; its identity is all servicer code reads)
        return {"transport_security_type": [b"ssl"], "x509_pem_cert": [b""], "peer_uri": [self.identity.uri.encode()]}


def framed_caller(writer: asyncio.StreamWriter, cluster: str | None, method: str) -> Identity | None:
    """The verified TLS peer of a framed connection, allowed to call ``method`` (gRPC's full name: the role table's
    rule for it decides) as a member of ``cluster``; raises ``FramedAbort`` with the refusal a gRPC port gives.
    ``cluster`` None: a plaintext listener (an --insecure component), no identity."""
    if cluster is None:
        if writer.get_extra_info("ssl_object") is not None:  # a TLS listener wired without its trust domain
            raise FramedAbort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: this listener knows no cluster to admit")
        return None
    try:
        identity: Identity | IdentityError = identity_from_transport(writer.transport)
    except IdentityError as exc:
        identity = exc
    denial = authorize(method, identity, cluster, PROJECT_ROLES)
    if denial is not None:
        raise FramedAbort(denial.code, denial.message)
    assert isinstance(identity, Identity)
    return identity


# TCP keep-alive of framed connections: a peer host that vanishes (no FIN, no RST) is noticed within ~90 s instead of
# holding a handler and a socket for ever (gRPC's own keep-alive does this on its ports).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 60, 10, 3
# A connection that sends no first frame within this (after its TLS handshake) is dropped: every client writes at
# once (a pusher opens a stream for something to send, a reporter starts with its load), so a silent one holds a
# socket for nothing (gRPC's plaintext port drops a connection without its HTTP/2 preface after 10 s too).
FIRST_FRAME_TIMEOUT_S = 10.0
# How long ``FramedServerStream.end`` waits for the client to take the status and close.
END_GRACE_S = 1.0


def keep_alive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def listen(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
) -> tuple[asyncio.Server, int]:
    """A framed listener on ``host``:``port`` (0: a free port) and the port it got. ``host`` as the components'
    ``--host`` spells it: an IPv6 literal may come in brackets; a wildcard ("", "::") binds one dual-stack socket,
    as gRPC's ports do, so one port serves IPv4 and IPv6 peers."""
    bare = host.strip("[]")
    if bare in ("", "::"):
        try:
            sock = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128)
        except (OSError, ValueError):  # a host without IPv6: "" is every IPv4 interface then
            if bare == "::":
                raise
            sock = socket.create_server(("0.0.0.0", port), backlog=128)
        server = await asyncio.start_server(
            handler, sock=sock, ssl=ssl_context, ssl_handshake_timeout=10.0 if ssl_context is not None else None
        )
    else:
        server = await asyncio.start_server(
            handler, bare, port, ssl=ssl_context, ssl_handshake_timeout=10.0 if ssl_context is not None else None
        )
    return server, int(server.sockets[0].getsockname()[1])


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request_type: type[M],
    run: Callable[[FramedServerStream[M]], Awaitable[None]],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    connections: set[asyncio.StreamWriter] | None = None,
    clean_cancel: Callable[[], bool] = lambda: False,
    first: tuple[int, bytes] | None = None,
) -> None:
    """Serves one framed connection with ``run(stream)``, which ends it cleanly by returning or with a status by
    raising ``FramedAbort``; an undecodable message ends it INVALID_ARGUMENT, a broken peer drops it. Never raises:
    this is an asyncio connection callback. A cancellation (the owner stopping) ends the stream cleanly when
    ``clean_cancel()`` says so, else drops it. ``connections``: where the owner finds the open ones to close.
    ``first``: the connection's first frame when the listener already read it (``framed_calls.first_frame``)."""
    keep_alive(writer)
    stream = FramedServerStream(reader, writer, request_type, max_bytes, first=first)
    if connections is not None:
        connections.add(writer)
    try:
        await run(stream)
        await stream.end()
    except FramedAbort as exc:
        await stream.end(exc.code, exc.details)
    except DecodeError:
        await stream.end(grpc.StatusCode.INVALID_ARGUMENT, f"an undecodable {request_type.__name__}")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if clean_cancel() and task is not None:
            task.uncancel()
            await stream.end()
        else:
            writer.transport.abort()
    except (OSError, TimeoutError) as exc:  # FrameError, resets, TLS errors, a silent first frame
        log.debug("framed connection dropped: %r", exc)
        writer.transport.abort()
    finally:
        if connections is not None:
            connections.discard(writer)


def drop_connections(connections: set[asyncio.StreamWriter]) -> None:
    """Closes every open connection of a listener now (asyncio.Server.close_clients is Python 3.13's)."""
    for writer in list(connections):
        writer.transport.abort()


class FramedServerStream(Generic[M]):
    """The server side of one connection: ``messages()`` yields the requests, ``send`` writes a response, ``end``
    writes a status and closes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request_type: type[M],
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        first: tuple[int, bytes] | None = None,
    ) -> None:
        self.reader, self.writer = reader, writer
        self._request_type = request_type
        self._max_bytes = max_bytes
        self._first = first  # a first frame the listener read already

    async def messages(self) -> AsyncIterator[M]:
        first = True
        got: tuple[int, bytes] | None
        while True:
            if first and self._first is not None:
                got, self._first = self._first, None
                first = False
            elif first:
                async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
                    got = await read_frame(self.reader, self._max_bytes)
                first = False
            else:
                got = await read_frame(self.reader, self._max_bytes)
            if got is None:
                return
            kind, body = got
            if kind == DONE:
                return
            if kind != MESSAGE:
                raise FrameError("a client may not send a status")
            message = self._request_type()
            message.ParseFromString(body)
            yield message

    async def send(self, message: Message) -> None:
        self.writer.write(frame(MESSAGE, message.SerializeToString()))
        await self.writer.drain()

    async def end(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        """Writes the status (not for OK: a clean close says that) and closes the connection. After a status, what
        the client still sends is read and dropped until it closes (at most ``END_GRACE_S``): closing with unread
        input resets the connection, and the client's reader would see the reset instead of the status."""
        with contextlib.suppress(OSError, TimeoutError):  # (ConnectionError and ssl.SSLError are OSErrors)
            if code != grpc.StatusCode.OK:
                self.writer.write(status_frame(code, details))
                async with asyncio.timeout(END_GRACE_S):
                    await self.writer.drain()
                    while await self.reader.read(65536):
                        pass
            self.writer.close()
            async with asyncio.timeout(END_GRACE_S):
                await self.writer.wait_closed()
        if not self.writer.transport.is_closing() or code != grpc.StatusCode.OK:
            self.writer.transport.abort()  # (a no-op once closed; a peer that reads nothing cannot hold it)
