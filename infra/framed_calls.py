"""Unary calls over one framed (mutual-TLS) connection: many requests in flight, each answered by id, so a per-request
call (a frontend's ``Dispatch`` to the scheduler leader, its ``AddRequest`` to a llumlet) costs a frame each way
instead of a grpc.aio unary call (~0.75 ms of CPU a side here: the C core's batch, its poller thread, the hand-off to
the event loop; see docs/bench-peers/README.md). The messages and their rules are the gRPC method's own, only the
framing differs, so the schema stays ``protos/`` and a servicer method serves both unchanged (``FramedContext``).

Frames (``infra.framed``'s header: kind byte, 4-byte length):
- ``CALL``: call id (u32), method name length (u16), the method's gRPC full name, deadline in ms from receipt (u32, 0:
  none), the serialized request.
- ``REPLY``: call id, the serialized response. ``FAULT``: call id, a gRPC status code (u16), UTF-8 details.
A connection whose first frame is a ``CALL`` carries calls only; a listener tells it from a stream by that frame
(``first_frame``, at most ``FIRST_FRAME_MAX_BYTES`` before the peer is authorized), so one port serves both.

Security: the caller is the connection's verified TLS peer, checked per method against the role table
(``framed_caller``, once per connection and method); a refused caller's connection is closed after the refusal.
Bounds: at most ``MAX_CALLS_IN_FLIGHT`` calls run at once per connection (the server reads no further frame until one
ends, as HTTP/2 bounds concurrent streams), replies wait for the peer to read them (``DRAIN_TIMEOUT_S``, then the
connection is dropped), and every call runs under its caller's deadline. A broken connection fails every call in
flight with ``ConnectionError`` on the client: a caller that may not repeat a request must treat that as an unknown
outcome.
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
    connect,
    drop_connections,
    frame,
    framed_caller,
    keep_alive,
    listen,
    read_frame,
    rpc_error,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_CALL_HEAD = struct.Struct(">IH")
_DEADLINE = struct.Struct(">I")
_ID = struct.Struct(">I")
_FAULT_HEAD = struct.Struct(">IH")
# Calls one connection may have running on the server at once (a frontend has a few in flight at a time).
MAX_CALLS_IN_FLIGHT = 256
# A listener reads at most this much of a new connection before its peer is authorized (a load report or a call is a
# few KiB; later frames may be as large as ``DEFAULT_MAX_BYTES``).
FIRST_FRAME_MAX_BYTES = 1 << 20
# A peer that reads none of its replies for this long is dropped (its replies would pile up in this process).
DRAIN_TIMEOUT_S = 10.0
_NAME_SHOWN = 100  # characters of an unknown method's name echoed back


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
    return call_id, rpc_error(number, body[_FAULT_HEAD.size :].decode(errors="replace"))


class UnaryChannel:
    """The client side: one connection, ``call`` from any number of tasks at once. Once broken (``closed``) it stays
    so: open a new one. Not thread-safe (one event loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int) -> None:
        self._reader, self._writer = reader, writer
        self._max_bytes = max_bytes
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0
        self.closed = False
        self._retiring = False
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
        reader, writer = await connect(address, ssl_context=ssl_context, server_name=server_name, timeout=timeout)
        return cls(reader, writer, max_bytes)

    async def call(self, method: str, request: Message, response_type: type[M], timeout: float) -> M:
        """The response; a FAULT raises ``AioRpcError`` with the server's status, no answer within ``timeout``
        TimeoutError, a broken connection ConnectionError (the request may or may not have been served)."""
        if self.closed or self._retiring:
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
            self._close_if_retired()
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

    def retire(self) -> None:
        """Takes no new call; closes once the calls in flight are answered (or now, with none)."""
        self._retiring = True
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        if self._retiring and not self._pending and not self.closed:
            self.close()

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


async def first_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes] | None:
    """A new connection's first frame (due within ``FIRST_FRAME_TIMEOUT_S``, at most ``FIRST_FRAME_MAX_BYTES``), which
    tells a call connection from a stream; None (the connection dropped) when it ends, breaks or stays silent."""
    try:
        async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
            got = await read_frame(reader, FIRST_FRAME_MAX_BYTES)
    except (OSError, TimeoutError) as exc:
        log.debug("framed connection dropped before its first frame: %r", exc)
        got = None
    if got is None:
        writer.transport.abort()
    return got


class CallServer:
    """Serves call connections for one listener: ``methods`` by gRPC full name, callers checked against the role
    table as members of ``cluster()`` (None: a plaintext listener, no identity)."""

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

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new connection of a calls-only listener (``listen_calls``): tracked from here, its first frame read."""
        self.connections.add(writer)
        try:
            first = await first_frame(reader, writer)
            if first is not None:
                await self.serve(reader, writer, first)
        finally:
            self.connections.discard(writer)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: tuple[int, bytes]) -> None:
        """One call connection, its first frame already read. Raises nothing but a cancellation (after dropping the
        connection)."""
        keep_alive(writer)
        self.connections.add(writer)
        running: set[asyncio.Task[None]] = set()
        # method -> the caller's identity once admitted (checked once per connection and method)
        admitted: dict[str, FramedContext] = {}
        got: tuple[int, bytes] | None = first
        try:
            while got is not None:
                kind, body = got
                if kind != CALL:
                    raise FrameError(f"a call connection carries calls only (kind {kind})")
                call_id, method, timeout, payload = parse_call(body)
                served = self.methods.get(method)
                if served is None:
                    shown = method if len(method) <= _NAME_SHOWN else method[:_NAME_SHOWN] + "..."
                    await self._answer(
                        writer, fault_frame(call_id, grpc.StatusCode.UNIMPLEMENTED, f"{shown} is not served")
                    )
                else:
                    admission = admitted.get(method)
                    if admission is None:
                        try:
                            admission = admitted[method] = FramedContext(framed_caller(writer, self._cluster(), method))
                        except FramedAbort as refusal:  # a caller without the role: refused, then let go
                            await self._answer(writer, fault_frame(call_id, refusal.code, refusal.details))
                            break
                    task = asyncio.get_running_loop().create_task(
                        self._run(writer, call_id, served, admission.identity, timeout, payload)
                    )
                    running.add(task)
                    task.add_done_callback(running.discard)
                    if len(running) >= self.max_in_flight:  # read no further call until one ends
                        await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
                got = await read_frame(reader, self.max_bytes)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (OSError, TimeoutError) as exc:  # FrameError, resets, TLS errors, a peer that reads nothing
            log.debug("framed call connection dropped: %r", exc)
            writer.transport.abort()
        finally:
            for task in list(running):
                task.cancel()
            self.connections.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, data: bytes) -> None:
        """Writes, then waits while the peer lets its replies pile up (TimeoutError after ``DRAIN_TIMEOUT_S``)."""
        writer.write(data)
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await writer.drain()

    async def _run(
        self,
        writer: asyncio.StreamWriter,
        call_id: int,
        method: Method,
        identity: Any,
        timeout: float | None,
        payload: bytes,
    ) -> None:
        request = method.request_type()
        try:
            request.ParseFromString(payload)
        except DecodeError:
            answer = fault_frame(call_id, grpc.StatusCode.INVALID_ARGUMENT, f"an undecodable {type(request).__name__}")
        else:
            context = FramedContext(identity, None if timeout is None else time.monotonic() + timeout)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    response = await method.handler(request, context)
                answer = frame(REPLY, _ID.pack(call_id) + response.SerializeToString())
            except FramedAbort as exc:
                answer = fault_frame(call_id, exc.code, exc.details)
            except Exception as exc:  # a servicer bug: the caller gets a status, the connection lives on
                if isinstance(exc, TimeoutError) and deadline.expired():
                    answer = fault_frame(call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
                else:
                    log.exception("framed call %s failed", type(request).__name__)
                    answer = fault_frame(call_id, grpc.StatusCode.UNKNOWN, f"unexpected error: {exc!r}")
        self.calls_served += 1
        if writer.transport.is_closing():
            return
        try:
            await self._answer(writer, answer)
        except (OSError, TimeoutError) as exc:  # the peer went away or reads nothing: let it go
            log.debug("framed call connection dropped while answering: %r", exc)
            writer.transport.abort()

    def close(self) -> None:
        """Drops every open call connection (the owner is stopping)."""
        drop_connections(self.connections)


async def listen_calls(
    server: CallServer, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[asyncio.Server, int]:
    """A listener whose every connection is a call connection of ``server`` (``framed.listen``'s hosts and ports)."""
    return await listen(server.accept, host, port, ssl_context)


# After a peer's framed listener could not be reached, its calls stay on gRPC this long (a listener a firewall drops
# would otherwise cost every call a connection attempt).
RETRY_AFTER_S = 30.0


class CallRoute:
    """A client's way to one peer's framed call listener, beside its gRPC channel: the listener's address as the peer's
    last gRPC reply named it (``learn``), the open channel (one connection attempt for all callers waiting on it),
    and a pause after the listener could not be reached (``unreachable``) during which the caller stays on gRPC.

    Each change of route (a new address, ``forget``, ``broken``, ``drop``) starts a new generation: a connection
    attempt of an older one is closed when it completes, so no channel outlives its route."""

    def __init__(self, opener: Callable[[str, float], Coroutine[Any, Any, UnaryChannel]]) -> None:
        self._open = opener
        self.address = ""
        self._channel: UnaryChannel | None = None
        self._connecting: asyncio.Task[UnaryChannel] | None = None
        self._generation = 0
        self._after = 0.0  # time.monotonic() before which ``learn`` ignores the peer's replies

    def learn(self, address: str) -> None:
        """The listener a gRPC reply named ("" none); ignored while paused after ``unreachable``."""
        if address != self.address and time.monotonic() >= self._after:
            self._next(address)

    async def channel(self, timeout: float) -> UnaryChannel:
        """The open channel to ``address`` (which must be set); raises ConnectionError (the connection failed, or the
        route changed meanwhile) or TimeoutError."""
        channel = self._channel
        if channel is not None and not channel.closed:
            return channel
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.get_running_loop().create_task(
                self._connect(self.address, self._generation, max(timeout, 1.0))
            )
            connecting.add_done_callback(lambda t: t.cancelled() or t.exception())  # (retrieved: no warning)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise ConnectionError("the framed connection attempt was dropped") from None  # (the route changed)

    async def _connect(self, address: str, generation: int, timeout: float) -> UnaryChannel:
        try:
            channel = await self._open(address, timeout)
        except (OSError, TimeoutError):
            raise
        except Exception as exc:  # whatever else a connection attempt raises (a malformed address) is a failure too
            raise ConnectionError(f"cannot connect to {address!r}: {exc!r}") from exc
        finally:
            if self._generation == generation:
                self._connecting = None
        if self._generation != generation:
            channel.close()
            raise ConnectionError("the framed listener changed while connecting")
        self._channel = channel
        return channel

    def forget(self) -> None:
        """The peer answered in a way the caller handles over gRPC (not the leader): its listener is forgotten until
        a gRPC reply names it again; calls in flight on the channel still get their answers."""
        self._next("")

    def broken(self, channel: UnaryChannel) -> None:
        """``channel`` broke under a call: forgotten (if it is still this route's), as ``forget``."""
        if channel is self._channel:
            self._next("")

    def unreachable(self) -> None:
        """No connection could be had: forgotten, and replies naming a listener ignored for ``RETRY_AFTER_S``."""
        self._next("")
        self._after = time.monotonic() + RETRY_AFTER_S

    def drop(self) -> None:
        """Closes everything now (the owner is stopping): calls in flight fail."""
        channel = self._channel
        self._next("")
        if channel is not None:
            channel.close()

    def _next(self, address: str) -> None:
        self._generation += 1
        self.address = address
        if self._channel is not None:
            self._channel.retire()
            self._channel = None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
