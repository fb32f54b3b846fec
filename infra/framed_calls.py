"""Unary calls over one framed (mutual-TLS) connection: many requests in flight, each answered by id, so a per-request
call (a frontend's ``Dispatch`` to the scheduler leader) costs a frame each way instead of a grpc.aio unary call
(~0.75 ms of CPU a side here: the C core's batch, its poller thread, the hand-off to the event loop; see
docs/bench-peers/README.md). The messages and their rules are the gRPC method's own, only the framing differs, so
the schema stays ``protos/`` and a servicer method serves both unchanged (``FramedContext``).

Frames (``infra.framed``'s header: kind byte, 4-byte length):
- ``CALL``: call id (u32), method name length (u16), the method's gRPC full name, deadline in ms from receipt (u32, 0:
  none), the serialized request.
- ``REPLY``: call id, the serialized response. ``FAULT``: call id, a gRPC status code (u16), UTF-8 details.
A connection whose first frame is a ``CALL`` carries calls only; a listener tells it from a stream by that frame
(``first_frame``), so one port serves both.

Security: the caller is the connection's verified TLS peer, checked per method against the role table
(``framed_caller``, cached per connection and method). Bounds: at most ``MAX_CALLS_IN_FLIGHT`` calls run at once per
connection (more are answered RESOURCE_EXHAUSTED), every call's deadline is the caller's, the server's handler runs
under it. A broken connection fails every call in flight with ``ConnectionError`` on the client: a caller that may
not repeat a request must treat that as an unknown outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from pyllumnix.infra.framed import (
    CALL,
    DEFAULT_MAX_BYTES,
    FAULT,
    FIRST_FRAME_TIMEOUT_S,
    REPLY,
    FramedAbort,
    FramedContext,
    FrameError,
    frame,
    framed_caller,
    keep_alive,
    listen,
    read_frame,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_CALL_HEAD = struct.Struct(">IH")
_DEADLINE = struct.Struct(">I")
_ID = struct.Struct(">I")
_FAULT_HEAD = struct.Struct(">IH")
# Calls one connection may have running on the server at once (a frontend has a few in flight at a time).
MAX_CALLS_IN_FLIGHT = 256


def call_frame(call_id: int, method: str, timeout: float | None, body: bytes) -> bytes:
    name = method.encode()
    deadline_ms = 0 if timeout is None else max(1, min(int(timeout * 1000), 2**32 - 1))
    return frame(CALL, _CALL_HEAD.pack(call_id, len(name)) + name + _DEADLINE.pack(deadline_ms) + body)


def parse_call(body: bytes) -> tuple[int, str, float | None, bytes]:
    """(call id, method, timeout in s or None, request bytes); FrameError when the frame is malformed."""
    try:
        call_id, name_len = _CALL_HEAD.unpack_from(body)
        at = _CALL_HEAD.size
        method = body[at : at + name_len].decode()
        at += name_len
        (deadline_ms,) = _DEADLINE.unpack_from(body, at)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"a malformed call frame: {exc}") from exc
    return call_id, method, (deadline_ms / 1000.0 if deadline_ms else None), body[at + _DEADLINE.size :]


def fault_frame(call_id: int, code: grpc.StatusCode, details: str) -> bytes:
    return frame(FAULT, _FAULT_HEAD.pack(call_id, code.value[0]) + details.encode())


def _fault_error(body: bytes) -> tuple[int, grpc.aio.AioRpcError]:
    try:
        call_id, number = _FAULT_HEAD.unpack_from(body)
    except struct.error as exc:
        raise FrameError("a malformed fault frame") from exc
    code = next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)
    details = body[_FAULT_HEAD.size :].decode(errors="replace")
    return call_id, grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class UnaryChannel:
    """The client side: one connection, ``call`` from any number of tasks at once. Once broken (``closed``) it stays
    so: open a new one. Not thread-safe (one event loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int) -> None:
        self._reader, self._writer = reader, writer
        self._max_bytes = max_bytes
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0
        self.closed = False
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name="framed-calls-reader")

    @classmethod
    async def open(
        cls,
        address: str,
        *,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None,
        timeout: float,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> UnaryChannel:
        """Connects (TLS with ``ssl_context``, checking that the server's certificate names ``server_name``)."""
        host, _, port = address.rpartition(":")
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host.strip("[]"),
                int(port),
                ssl=ssl_context,
                server_hostname=server_name if ssl_context is not None else None,
                limit=max(2**16, min(max_bytes, 2**22)),
            )
        keep_alive(writer)
        return cls(reader, writer, max_bytes)

    async def call(self, method: str, request: Message, response_type: type[M], timeout: float) -> M:
        """The response; a FAULT raises ``AioRpcError`` with the server's status, no answer within ``timeout``
        TimeoutError, a broken connection ConnectionError (the request may or may not have been served)."""
        if self.closed:
            raise ConnectionError("the framed call channel is closed")
        call_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._writer.write(call_frame(call_id, method, timeout, request.SerializeToString()))
            async with asyncio.timeout(timeout):
                if self._writer.transport.get_write_buffer_size() > 2**20:
                    await self._writer.drain()
                body = await future
        except TimeoutError:
            raise
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                raise
            raise FrameError(f"the framed call channel broke: {exc!r}") from exc
        finally:
            self._pending.pop(call_id, None)
        reply = response_type()
        try:
            reply.ParseFromString(body)
        except DecodeError as exc:
            raise FrameError(f"an undecodable {response_type.__name__}") from exc
        return reply

    async def _read_loop(self) -> None:
        reason: BaseException = ConnectionError("the framed call channel was closed by the server")
        try:
            while True:
                got = await read_frame(self._reader, self._max_bytes)
                if got is None:
                    break
                kind, body = got
                if kind == REPLY:
                    if len(body) < _ID.size:
                        raise FrameError("a reply frame without a call id")
                    (call_id,) = _ID.unpack_from(body)
                    future = self._pending.get(call_id)
                    if future is not None and not future.done():
                        future.set_result(body[_ID.size :])
                elif kind == FAULT:
                    call_id, error = _fault_error(body)
                    future = self._pending.get(call_id)
                    if future is not None and not future.done():
                        future.set_exception(error)
                else:
                    raise FrameError(f"a call server sends replies and faults only (kind {kind})")
        except asyncio.CancelledError:
            reason = ConnectionError("the framed call channel was closed")
            raise
        except OSError as exc:  # FrameError, resets, TLS errors
            reason = exc if isinstance(exc, ConnectionError) else FrameError(f"the framed call channel broke: {exc!r}")
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: BaseException) -> None:
        self.closed = True
        self._writer.transport.abort()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(reason)

    def close(self) -> None:
        """Drops the connection; calls in flight fail with ConnectionError."""
        self._read_task.cancel()
        self._fail_all(ConnectionError("the framed call channel was closed"))

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task


# A servicer method: (request, context) -> response; a FramedContext stands in for grpc's context.
Handler = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """One method a call server serves: its request type and the servicer method (request, context) -> response."""

    request_type: type[Message]
    handler: Handler


async def first_frame(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[int, bytes] | None:
    """A new connection's first frame (due within ``FIRST_FRAME_TIMEOUT_S``), which tells a call connection from a
    stream; None (the connection dropped) when it ends, breaks or stays silent."""
    try:
        async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
            got = await read_frame(reader, max_bytes)
    except (OSError, TimeoutError) as exc:
        log.debug("framed connection dropped before its first frame: %r", exc)
        got = None
    if got is None:
        writer.transport.abort()
    return got


class CallServer:
    """Serves call connections for one listener: ``methods`` by gRPC full name, callers checked against the role
    table as members of ``cluster`` (None: a plaintext listener, no identity)."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        cluster: Callable[[], str | None],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_in_flight: int = MAX_CALLS_IN_FLIGHT,
    ) -> None:
        self.methods = dict(methods)
        self._cluster = cluster
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.connections: set[asyncio.StreamWriter] = set()
        self.calls_served = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: tuple[int, bytes]) -> None:
        """One call connection, its first frame already read. Never raises (an asyncio connection callback)."""
        keep_alive(writer)
        self.connections.add(writer)
        running: set[asyncio.Task[None]] = set()
        # method -> the caller's identity once admitted, or the refusal (checked once per connection and method)
        admitted: dict[str, FramedContext | FramedAbort] = {}
        got: tuple[int, bytes] | None = first
        try:
            while got is not None:
                kind, body = got
                if kind != CALL:
                    raise FrameError(f"a call connection carries calls only (kind {kind})")
                call_id, method, timeout, payload = parse_call(body)
                refusal = self._refusal(method, writer, admitted, len(running))
                if refusal is not None:
                    writer.write(fault_frame(call_id, refusal.code, refusal.details))
                else:
                    admission = admitted[method]
                    assert isinstance(admission, FramedContext)
                    task = asyncio.get_running_loop().create_task(
                        self._run(writer, call_id, self.methods[method], admission, timeout, payload)
                    )
                    running.add(task)
                    task.add_done_callback(running.discard)
                got = await read_frame(reader, self.max_bytes)
        except asyncio.CancelledError:
            writer.transport.abort()
        except (OSError, TimeoutError) as exc:  # FrameError, resets, TLS errors
            log.debug("framed call connection dropped: %r", exc)
            writer.transport.abort()
        finally:
            for task in list(running):
                task.cancel()
            self.connections.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    def _refusal(
        self,
        method: str,
        writer: asyncio.StreamWriter,
        admitted: dict[str, FramedContext | FramedAbort],
        in_flight: int,
    ) -> FramedAbort | None:
        if method not in self.methods:
            return FramedAbort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served on this framed port")
        admission = admitted.get(method)
        if admission is None:
            try:
                admission = FramedContext(framed_caller(writer, self._cluster(), method))
            except FramedAbort as exc:
                admission = exc
            admitted[method] = admission
        if isinstance(admission, FramedAbort):
            return admission
        if in_flight >= self.max_in_flight:
            return FramedAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {self.max_in_flight} calls in flight on one connection"
            )
        return None

    async def _run(
        self,
        writer: asyncio.StreamWriter,
        call_id: int,
        method: Method,
        admission: FramedContext,
        timeout: float | None,
        payload: bytes,
    ) -> None:
        request = method.request_type()
        try:
            request.ParseFromString(payload)
        except DecodeError:
            writer.write(
                fault_frame(call_id, grpc.StatusCode.INVALID_ARGUMENT, f"an undecodable {type(request).__name__}")
            )
            return
        context = FramedContext(admission.identity, None if timeout is None else time.monotonic() + timeout)
        try:
            async with asyncio.timeout(timeout):
                response = await method.handler(request, context)
            answer = frame(REPLY, _ID.pack(call_id) + response.SerializeToString())
        except FramedAbort as exc:
            answer = fault_frame(call_id, exc.code, exc.details)
        except TimeoutError:
            answer = fault_frame(call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
        except Exception as exc:  # a servicer bug: the caller gets a status, the connection lives on
            log.exception("framed call %s failed", type(request).__name__)
            answer = fault_frame(call_id, grpc.StatusCode.UNKNOWN, f"unexpected error: {exc!r}")
        self.calls_served += 1
        if not writer.transport.is_closing():
            writer.write(answer)

    def close(self) -> None:
        """Drops every open call connection (the owner is stopping)."""
        for writer in list(self.connections):
            writer.transport.abort()


async def listen_calls(
    server: CallServer, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[asyncio.Server, int]:
    """A listener whose every connection is a call connection of ``server`` (``framed.listen``'s hosts and ports)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await first_frame(reader, writer, server.max_bytes)
        if first is not None:
            await server.serve(reader, writer, first)

    return await listen(handle, host, port, ssl_context)


# After a framed connection to a peer failed, its calls stay on gRPC this long (a listener that cannot be reached,
# e.g. a port a firewall drops, would otherwise cost every call a connection attempt).
RETRY_AFTER_S = 30.0


class CallRoute:
    """A client's way to one peer's framed call listener, beside its gRPC channel: the listener's address as the peer's
    last gRPC reply named it (``learn``), the open channel (connected once for all callers waiting on it), and a pause
    after a connection failure (``failed``) during which the caller stays on gRPC."""

    def __init__(self, opener: Callable[[str, float], Coroutine[Any, Any, UnaryChannel]]) -> None:
        self._open = opener
        self.address = ""
        self._channel: UnaryChannel | None = None
        self._connecting: asyncio.Task[UnaryChannel] | None = None
        self._after = 0.0  # time.monotonic() before which ``learn`` ignores the peer's replies

    def learn(self, address: str) -> None:
        """The listener a gRPC reply named ("" none); ignored while paused after a failure."""
        if address != self.address and time.monotonic() >= self._after:
            self.drop()
            self.address = address

    async def channel(self, timeout: float) -> UnaryChannel:
        """The open channel to ``address`` (which must be set); raises OSError or TimeoutError when it cannot be had."""
        address = self.address
        if self._channel is not None and not self._channel.closed:
            return self._channel
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open(address, max(timeout, 1.0)))
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())  # (retrieved: no warning)
        connecting = self._connecting
        try:
            async with asyncio.timeout(timeout):
                channel = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise ConnectionError("the framed connection attempt was dropped") from None  # (``drop`` cancelled it)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        if self.address != address:  # dropped meanwhile (a failure elsewhere, a new listener)
            channel.close()
            raise ConnectionError("the framed listener changed")
        self._channel = channel
        return channel

    def failed(self, *, pause: bool) -> None:
        """The call failed: forget the listener (the next gRPC reply names it again); with ``pause`` (the connection
        failed, rather than an answer), stay on gRPC for ``RETRY_AFTER_S``."""
        self.drop()
        self.address = ""
        if pause:
            self._after = time.monotonic() + RETRY_AFTER_S

    def drop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
