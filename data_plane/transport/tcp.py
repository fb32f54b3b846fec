"""TCP transport: framed chunks over one pooled connection per peer; the fallback when UCX is unavailable.

Frame: ``!4sIQ`` header (magic, key length, payload length), the UTF-8 key, the payload. Built on the event loop's
socket operations (``sock_sendall`` / ``sock_recv_into``) rather than streams: ``StreamReader`` has no ``readinto``
and ``StreamWriter.write`` copies whatever the kernel does not take at once, while these send straight from the
caller's buffer and receive straight into the expected buffer. A chunk that arrives before its expectation is kept
in a new buffer (one extra copy when it is claimed into a given ``out``).

With ``ssl_server``/``ssl_client`` contexts (a secure llumlet: its certificate, the cluster CA) every connection is
mutual TLS on asyncio streams instead (Python's TLS cannot run on the loop's raw socket operations); the payload is
then read in slices into the expected buffer and the sender must present a certificate of role ``llumlet`` of the
same cluster, or the connection is dropped before a frame is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyllumnix.data_plane.transport.base import (
    DEFAULT_TIMEOUT_S,
    BufferingTransport,
    Bytes,
    Chunk,
    Expectation,
    TransportClosed,
    TransportError,
    TransportTimeout,
    as_bytes_view,
    make_out_buffer,
)
from pyllumnix.infra.grpc_server import advertised_address
from pyllumnix.infra.security.ca import role_name

log = logging.getLogger(__name__)

_MAGIC = b"LLDP"
_HEADER = struct.Struct("!4sIQ")
_MAX_KEY = 4096
# The largest frame accepted (#13): a header may claim any size; bigger frames drop the connection before anything is
# allocated. Migration chunks are 16 MiB by default (``fusion.DEFAULT_CHUNK_BYTES``).
MAX_FRAME_BYTES = 1 << 30
_SOCK_BUF = 4 << 20
PEER_NAME = role_name("llumlet")
"""What a TLS sender checks the receiver's certificate for: a llumlet's role, not its host (a component of another
role on that host cannot pose as the receiving llumlet)."""
TLS_HANDLERS_CLOSE_S = 2.0  # how long close waits for the TLS connections' handlers to return
# Pause before accepting again after accept itself failed (out of file descriptors, buffers).
ACCEPT_RETRY_S = 0.1
# Inside a frame (its header read), the longest wait for the next bytes: a peer stalled mid-frame is dropped, its
# early-data claim returned and the transfer waiting for the frame failed. Between frames a connection may idle.
FRAME_STALL_S = 30.0


def parse_tcp_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); raises TransportError on anything else."""
    if not address.startswith("tcp://"):
        raise TransportError(f"not a tcp address: {address!r}")
    host, _, port = address[len("tcp://") :].rpartition(":")
    if not host or not port.isdigit():
        raise TransportError(f"bad tcp address: {address!r}")
    return host.strip("[]"), int(port)


def _frame_ok(magic: bytes, key_len: int, nbytes: int) -> bool:
    """Whether a frame header is this protocol's and within bounds; the connection is dropped otherwise."""
    if magic != _MAGIC or key_len > _MAX_KEY:
        return False
    if nbytes > MAX_FRAME_BYTES:
        log.warning("data plane: frame of %d bytes (limit %d); dropping the connection", nbytes, MAX_FRAME_BYTES)
        return False
    return True


@dataclass
class _Conn:
    sock: socket.socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # TLS mode: the stream pair (``sock`` is then the underlying socket, for the peer-gone check only).
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()


# TLS mode reads a payload in slices of this size (StreamReader buffers what it reads; this bounds that buffer).
_TLS_SLICE = 1 << 20


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


def _peer_gone(sock: socket.socket) -> bool:
    """True if a pooled connection was closed by the peer (it never sends, so readable means EOF or reset)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class TcpTransport(BufferingTransport):
    kind = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        *,
        ssl_server: ssl.SSLContext | None = None,
        ssl_client: ssl.SSLContext | None = None,
        cluster: str = "",
        peer_role: str = "llumlet",
    ) -> None:
        if (ssl_server is None) != (ssl_client is None) or (ssl_server is not None and not cluster):
            raise ValueError("TLS needs both contexts and the cluster its peers belong to")
        self._host = host
        self._port = port
        self._advertise_host = advertise_host
        self._ssl_server = ssl_server
        self._ssl_client = ssl_client
        self._cluster = cluster
        self._peer_role = peer_role
        self._stream_server: asyncio.Server | None = None
        self._address: str | None = None
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server_socks: set[socket.socket] = set()
        self._conns: dict[str, _Conn] = {}
        self._tls_writers: set[asyncio.StreamWriter] = set()
        self._tls_handlers: set[asyncio.Task[Any]] = set()  # the tasks serving TLS connections (asyncio's)
        super().__init__()

    async def start(self) -> str:
        if self._address is not None:
            return self._address
        bind_host = self._host.strip("[]")  # a socket takes an IPv6 literal bare
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind_host, self._port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        port = listener.getsockname()[1]
        self._address = f"tcp://{advertised_address(self._host, self._advertise_host or '', port)}"
        if self._ssl_server is not None:
            self._stream_server = await asyncio.start_server(
                self._serve_tls, sock=listener, ssl=self._ssl_server, ssl_handshake_timeout=10.0
            )
        else:
            self._spawn(self._accept_loop(listener))
        return self._address

    @property
    def secure(self) -> bool:
        return self._ssl_server is not None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._address = None
        if self._stream_server is not None:
            self._stream_server.close()
            self._stream_server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._server_socks:
            sock.close()
        self._server_socks.clear()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        for writer in list(self._tls_writers):
            writer.transport.abort()  # at once: a TLS close would wait for the peer's close_notify
        self._tls_writers.clear()
        if self._tls_handlers:
            # Their reads end with the connections; awaited, not cancelled: asyncio (3.11) logs a connection
            # handler's cancellation as an "Exception in callback" with a traceback, once per connection.
            await asyncio.wait(set(self._tls_handlers), timeout=TLS_HANDLERS_CLOSE_S)
        self._fail_pending()

    @property
    def address(self) -> str:
        if self._address is None:
            raise TransportClosed("tcp endpoint not started")
        return self._address

    # --- receiving ---
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS...: back off and accept again (as asyncio's own servers do). Ending the loop
                # left the address published with nobody accepting: sends "succeeded" into the backlog, receives
                # timed out for ever.
                log.warning("tcp data plane: accept failed (%s); retrying in %.1f s", exc, ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            _tune(sock)
            self._server_socks.add(sock)
            self._spawn(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        header = bytearray(_HEADER.size)
        try:
            sender = str(sock.getpeername()[0])  # plaintext: no identity; its host shares one early-data share
            while True:
                if not await _recv_exact(loop, sock, memoryview(header)):
                    return
                magic, key_len, nbytes = _HEADER.unpack(header)
                if not _frame_ok(magic, key_len, nbytes):
                    return
                raw_key = bytearray(key_len)
                if not await _recv_exact(loop, sock, memoryview(raw_key), FRAME_STALL_S):
                    return
                key = raw_key.decode(errors="replace")
                target = self._frame_target(key, nbytes, sender)
                if target is None:
                    return
                buf, direct, claim = target
                try:
                    got = await _recv_exact(loop, sock, buf.data, FRAME_STALL_S)
                except TimeoutError:
                    got = False
                    log.warning("data plane: %s stalled inside frame %r; dropping the connection", sender, key)
                except BaseException:
                    self._unclaim(nbytes, claim)
                    raise
                if not got:
                    self._unclaim(nbytes, claim)
                    self._fail_mid_transfer(key)
                    return
                self._deliver(key, buf, direct, sender, claim)
        except OSError:
            return
        finally:
            self._server_socks.discard(sock)
            sock.close()

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One mutual-TLS connection: the peer must be a ``peer_role`` of our cluster; then frames as in ``_serve``."""
        from pyllumnix.infra.security.ca import IdentityError
        from pyllumnix.infra.security.identity import identity_from_transport

        self._tls_writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._tls_handlers.add(handler)
        try:
            try:
                peer = identity_from_transport(writer.transport)
            except IdentityError as exc:
                log.warning("data plane: TLS peer without a usable identity (%s); dropping the connection", exc)
                return
            if peer.cluster != self._cluster or peer.role != self._peer_role:
                log.warning(
                    "data plane: %s may not send here (need a %s of cluster %r); dropping the connection",
                    peer,
                    self._peer_role,
                    self._cluster,
                )
                return
            while True:
                try:
                    header = await reader.readexactly(_HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                magic, key_len, nbytes = _HEADER.unpack(header)
                if not _frame_ok(magic, key_len, nbytes):
                    return
                async with asyncio.timeout(FRAME_STALL_S):
                    key = (await reader.readexactly(key_len)).decode(errors="replace")
                target = self._frame_target(key, nbytes, peer.id)
                if target is None:
                    return
                buf, direct, claim = target
                view = memoryview(buf.data).cast("B")
                got = 0
                try:
                    while got < nbytes:
                        async with asyncio.timeout(FRAME_STALL_S):
                            piece = await reader.readexactly(min(_TLS_SLICE, nbytes - got))
                        view[got : got + len(piece)] = piece
                        got += len(piece)
                except (asyncio.IncompleteReadError, TimeoutError) as exc:
                    if isinstance(exc, TimeoutError):
                        log.warning("data plane: %s stalled inside frame %r; dropping the connection", peer.id, key)
                    self._unclaim(nbytes, claim)
                    self._fail_mid_transfer(key)
                    return
                except BaseException:
                    self._unclaim(nbytes, claim)
                    raise
                self._deliver(key, buf, direct, peer.id, claim)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self._tls_writers.discard(writer)
            if handler is not None:
                self._tls_handlers.discard(handler)
            writer.close()

    def _frame_target(self, key: str, nbytes: int, sender: str) -> tuple[Bytes, bool, str | None] | None:
        """Where a frame's bytes go (both listeners): straight into the expected transfer's buffer (``direct``) or a
        fresh one, claimed as early data before it is allocated (the claim's account is returned: ``_deliver`` keeps
        or returns it); None (drop the connection) when an unexpected frame would exceed the early bound, the whole
        or ``sender``'s share."""
        exp = self._expected.get(key)
        if exp is not None and not exp.future.done() and exp.nbytes == nbytes:
            return exp.buffer, True, None
        claim = self._claim_early(key, nbytes, sender)
        if claim is None:
            log.warning("data plane: dropping the connection from %s (frame %r over the early-data bound)", sender, key)
            return None
        return np.empty(nbytes, dtype=np.uint8), False, claim

    def _unclaim(self, nbytes: int, claim: str | None) -> None:
        if claim is not None:
            self._unclaim_early(nbytes, claim)

    def _fail_mid_transfer(self, key: str) -> None:
        """A peer that closed inside a frame fails the transfer waiting for it (keys are one-time per transfer)."""
        exp = self._expected.get(key)
        if exp is not None and not exp.future.done():
            exp.future.set_exception(TransportError(f"{key!r}: peer closed mid-transfer"))

    def _deliver(self, key: str, buf: Bytes, direct: bool, sender: str = "", claim: str | None = None) -> None:
        exp = self._expected.get(key)
        if exp is None:
            self._keep_early(key, buf, sender, claim)
            return
        self._unclaim(buf.nbytes, claim)  # expected meanwhile: the bytes go to the expectation, not the early buffer
        if exp.future.done():
            return
        elif buf.nbytes != exp.nbytes:
            exp.future.set_exception(TransportError(f"{key!r}: got {buf.nbytes} bytes, expected {exp.nbytes}"))
        else:
            if not direct:
                exp.buffer[:] = buf
            exp.future.set_result(exp.buffer)

    def expect(self, key: str, nbytes: int, out: Bytes | None = None) -> None:
        if self._address is None:
            raise TransportClosed("tcp endpoint not started")
        if key in self._expected:
            raise TransportError(f"{key!r} already expected")
        early = self._take_early(key)
        reuse = early is not None and out is None and early.nbytes == nbytes
        exp = Expectation(key, nbytes, early if reuse and early is not None else make_out_buffer(nbytes, out))
        self._expected[key] = exp
        if early is not None:
            self._deliver(key, early, direct=early is exp.buffer)

    # --- sending ---
    async def _connect(self, peer: str) -> _Conn:
        conn = self._conns.get(peer)
        if conn is not None and not conn.lock.locked() and _peer_gone(conn.sock):
            self._drop(peer, conn)
            conn = None
        if conn is None:
            host, port = parse_tcp_address(peer)
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            _tune(sock)
            try:
                await loop.sock_connect(sock, sockaddr)
            except BaseException:
                sock.close()
                raise
            fresh = _Conn(sock)
            if self._ssl_client is not None:
                try:
                    fresh.reader, fresh.writer = await asyncio.open_connection(
                        sock=sock, ssl=self._ssl_client, server_hostname=PEER_NAME, ssl_handshake_timeout=10.0
                    )
                except BaseException:
                    sock.close()
                    raise
            conn = self._conns.setdefault(peer, fresh)
            if conn is not fresh:
                fresh.close()
        return conn

    def _drop(self, peer: str, conn: _Conn) -> None:
        if self._conns.get(peer) is conn:
            del self._conns[peer]
        conn.close()

    async def send(self, peer: str, key: str, chunk: Chunk, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if self._address is None:
            raise TransportClosed("tcp endpoint not started")
        view = as_bytes_view(chunk)
        raw_key = key.encode()
        header = _HEADER.pack(_MAGIC, len(raw_key), view.nbytes) + raw_key
        loop = asyncio.get_running_loop()
        conn: _Conn | None = None
        # Whether this call began writing its frame: only then can it leave a partial frame on the shared connection
        # (a send that timed out waiting for another sender's turn wrote nothing, and must not close the connection
        # under that sender's transfer).
        began = False
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connect(peer)
                async with conn.lock:
                    began = True
                    if conn.writer is not None:
                        conn.writer.write(header)
                        conn.writer.write(view)
                        await conn.writer.drain()
                    else:
                        await loop.sock_sendall(conn.sock, header)
                        await loop.sock_sendall(conn.sock, view)
        except TimeoutError as e:
            if conn is not None and began:
                self._drop(peer, conn)  # a partial frame poisons the connection
            raise TransportTimeout(f"send {key!r} to {peer}: not done within {timeout:.3g}s") from e
        except (OSError, ssl.SSLError) as e:
            if conn is not None:
                self._drop(peer, conn)
            raise TransportError(f"send {key!r} to {peer}: {e}") from e
        except BaseException:
            # Cancelled mid-frame: the rest of it never follows, and the peer would read the next frame's bytes as
            # this one's payload (a corrupt transfer reported as delivered, the next one lost).
            if conn is not None and began:
                self._drop(peer, conn)
            raise


async def _recv_exact(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview, stall_s: float | None = None
) -> bool:
    """Fills ``view``; False on EOF before the first byte or in the middle. ``stall_s``: the longest wait for each
    read (TimeoutError past it; None: no bound)."""
    got = 0
    total = view.nbytes
    while got < total:
        if stall_s is None:
            n = await loop.sock_recv_into(sock, view[got:])
        else:
            async with asyncio.timeout(stall_s):
                n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            return False
        got += n
    return True
