"""The data-plane transport interface: one endpoint per llumlet process, moving byte chunks keyed by name.

The model is "expect, then receive": the destination registers each transfer it awaits (key and size, optionally the
buffer to land in) after PreAllocate, the source sends chunks to the destination's published address, and the
TransferStage handshake (gRPC) confirms the bytes. Keys name (migration id, stage, chunk index); see ``chunk_key``.

Every operation takes an application timeout: a peer that died must never hang its caller. The UCX path runs without
UCX error handling (the only way to shared-memory speed), so timeouts here plus the registry lease are how peer death
is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pyllumnix.data_plane.host_memory import host_buffer

Bytes = npt.NDArray[np.uint8]
Chunk = memoryview | npt.NDArray[np.generic] | bytes | bytearray
"""Anything exposing a C-contiguous buffer; sent without copying where the transport allows."""

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
# Chunks that arrive before their expectation are kept within these bounds (#13): in all at most EARLY_MAX_BYTES, each
# for at most EARLY_TTL_S; beyond them a chunk is dropped, so a peer writing keys nobody expects cannot fill memory.
EARLY_MAX_BYTES = 256 << 20
EARLY_TTL_S = 30.0
# One sender (a llumlet's certificate id on TLS; its host on plaintext TCP) holds at most half of it (B7) in chunks of
# keys nobody announced: a peer that writes such keys cannot take the whole buffer for EARLY_TTL_S and starve the
# migrations of the others. Chunks of a stage this side is receiving (``admit_stage``) count against the whole only:
# the receiver expects a few chunks ahead, the rest of a big stage normally arrives early (M4).
EARLY_PEER_SHARE = 0.5
PRUNE_SLACK_S = 0.05  # the expiry timer fires this much after the oldest chunk's deadline (one timer per batch)
_STAGE = "\0stage"  # the early-bytes account of announced stages' chunks (no sender's share)


class TransportError(Exception):
    """A transfer failed: unreachable or dead peer, connection lost, size mismatch, closed endpoint."""


class TransportTimeout(TransportError, TimeoutError):
    """A transfer did not finish within its application timeout."""


class TransportStalled(TransportTimeout):
    """A transfer made no progress (no chunk completed) for its stall timeout, well before its overall deadline: the
    peer died, or it (or this side) stopped driving the transfer. Raised by the chunked transfers in ``fusion``."""


class TransportClosed(TransportError):
    """The local endpoint is not started or already closed."""


def chunk_key(migration_id: str, stage: int, index: int) -> str:
    """The key of one chunk of one migration stage; both sides derive it independently."""
    return f"{migration_id}/{stage}/{index}"


def as_bytes_view(chunk: Chunk) -> memoryview:
    """A flat byte view of ``chunk`` without copying; raises TransportError if it is not C-contiguous, or is not
    host memory (a device tensor goes through a device transport, or ``fusion``'s host staging)."""
    if hasattr(chunk, "__cuda_array_interface__"):
        raise TransportError("this transport carries host memory only; a device chunk needs a device endpoint")
    try:
        view = chunk.data if isinstance(chunk, np.ndarray) else memoryview(chunk)
    except TypeError as e:
        raise TransportError(f"chunk is not a host buffer: {type(chunk).__name__}") from e
    if not view.c_contiguous:
        raise TransportError("chunk must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def make_out_buffer(nbytes: int, out: Bytes | None) -> Bytes:
    """The flat uint8 destination for ``nbytes``: a view of ``out`` (no copy) or a new array."""
    if out is None:
        return host_buffer(nbytes)
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise TransportError("out buffer must be writeable and C-contiguous")
    flat = out.reshape(-1).view(np.uint8)
    if flat.nbytes != nbytes:
        raise TransportError(f"out buffer holds {flat.nbytes} bytes, expected {nbytes}")
    return flat


@dataclass
class Expectation:
    """One registered receive: where its bytes land and the future that completes with them."""

    key: str
    nbytes: int
    buffer: Bytes
    future: asyncio.Future[Bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Transport(ABC):
    """A data-plane endpoint. Coroutine methods run on the caller's event loop; the endpoint is not thread-safe."""

    kind: str = ""

    @abstractmethod
    async def start(self) -> str:
        """Starts the endpoint and returns the address to publish in the registry."""

    @abstractmethod
    async def close(self) -> None:
        """Stops the endpoint; pending receives fail with TransportClosed. Idempotent."""

    @property
    @abstractmethod
    def address(self) -> str:
        """The published address; raises TransportClosed before ``start``."""

    @abstractmethod
    async def send(self, peer: str, key: str, chunk: Chunk, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Sends one chunk to ``peer`` under ``key``; returns once the transport no longer needs ``chunk``.

        Raises TransportTimeout after ``timeout`` seconds, TransportError if the peer is unreachable or dies."""

    @abstractmethod
    def expect(self, key: str, nbytes: int, out: Bytes | None = None) -> None:
        """Registers a transfer of exactly ``nbytes`` under ``key``, landing in ``out`` (C-contiguous, any shape
        of that many bytes) or a new buffer. Call before the sender may send, so bytes land without a copy."""

    @abstractmethod
    async def receive(self, key: str, timeout: float = DEFAULT_TIMEOUT_S) -> Bytes:
        """Awaits an expected transfer and returns its flat uint8 buffer (a view of ``out`` when one was given).

        Raises TransportTimeout after ``timeout`` seconds (the expectation is dropped), TransportError otherwise."""

    @abstractmethod
    def cancel(self, key: str) -> None:
        """Drops an expectation (e.g. the migration aborted); unknown keys are ignored."""

    def admit_stage(self, key_prefix: str, n_chunks: int) -> None:  # noqa: B027 - a no-op where nothing arrives early
        """Announces a stage this side is receiving (keys ``<key_prefix>/<index>``, index < ``n_chunks``): its chunks
        that arrive before their expectation are not held to one sender's early-data share (only buffering
        transports keep any)."""

    def end_stage(self, key_prefix: str) -> None:  # noqa: B027 - optional, as admit_stage
        """Ends ``admit_stage``; early chunks of the stage nobody claimed are dropped."""

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ExpectingTransport(Transport):
    """The receive bookkeeping every transport shares: ``_expected`` holds the registered transfers; ``receive``,
    ``cancel`` and ``_fail_pending`` (on close) drop them and call ``_forget`` for what a transport keeps per key."""

    def __init__(self) -> None:
        self._expected: dict[str, Expectation] = {}

    def _forget(self, key: str) -> None:
        """Drops what the transport keeps for ``key`` besides its expectation (nothing by default)."""

    async def receive(self, key: str, timeout: float = DEFAULT_TIMEOUT_S) -> Bytes:
        exp = self._expected.get(key)
        if exp is None:
            raise TransportError(f"{key!r} was not expected")
        try:
            return await await_expectation(exp, timeout)
        finally:
            self._expected.pop(key, None)
            self._forget(key)

    def cancel(self, key: str) -> None:
        exp = self._expected.pop(key, None)
        if exp is not None and not exp.future.done():
            exp.future.cancel()
        self._forget(key)

    def _fail_pending(self) -> None:
        """On close: every pending receive fails with TransportClosed."""
        for key, exp in self._expected.items():
            if not exp.future.done():
                exp.future.set_exception(TransportClosed("endpoint closed"))
            self._forget(key)
        self._expected.clear()


class BufferingTransport(ExpectingTransport):
    """Shared receive side of transports that match arriving chunks to expectations themselves (in-process and TCP):
    ``_early`` holds the chunks that arrived before their expectation, bounded in bytes and age (``early_max_bytes``,
    ``early_ttl_s``) and, for keys of no announced stage, per sender (``early_peer_max_bytes``, ``EARLY_PEER_SHARE`` of
    the whole by default: the sender is who the transport says, ``""`` when it cannot tell); ``early_dropped`` counts
    the chunks refused or expired. Bytes are counted when claimed (``_claim_early``), before they are allocated."""

    def __init__(
        self,
        *,
        early_max_bytes: int = EARLY_MAX_BYTES,
        early_ttl_s: float = EARLY_TTL_S,
        early_peer_max_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self._early: dict[str, Bytes] = {}
        self._early_at: dict[str, float] = {}
        self._early_from: dict[str, str] = {}  # key -> the account it counts against (its sender, or _STAGE)
        self._peer_early: dict[str, int] = {}  # account -> its early bytes, claimed ones included
        self._stages: dict[str, tuple[int, int]] = {}  # announced stage key prefix -> (its chunks, announcements)
        self._early_bytes = 0
        self._prune_timer: asyncio.TimerHandle | None = None  # expires early chunks when no other chunk comes
        self.early_max_bytes = early_max_bytes
        self._early_peer_max_bytes = early_peer_max_bytes
        self.early_ttl_s = early_ttl_s
        self.early_dropped = 0

    @property
    def early_peer_max_bytes(self) -> int:
        """One sender's bound (``EARLY_PEER_SHARE`` of ``early_max_bytes`` unless given)."""
        given = self._early_peer_max_bytes
        return int(self.early_max_bytes * EARLY_PEER_SHARE) if given is None else given

    @property
    def early_bytes(self) -> int:
        return self._early_bytes

    def admit_stage(self, key_prefix: str, n_chunks: int) -> None:
        chunks, count = self._stages.get(key_prefix, (0, 0))
        self._stages[key_prefix] = (max(chunks, n_chunks), count + 1)
        for key, account in list(self._early_from.items()):  # what came before the announcement leaves its share
            if account != _STAGE and self._account(key, account) == _STAGE:
                nbytes = self._early[key].nbytes
                self._count(account, -nbytes)
                self._count(_STAGE, nbytes)
                self._early_from[key] = _STAGE

    def end_stage(self, key_prefix: str) -> None:
        chunks, count = self._stages.get(key_prefix, (0, 0))
        if count > 1:
            self._stages[key_prefix] = (chunks, count - 1)
            return
        self._stages.pop(key_prefix, None)
        for key in [k for k in self._early if _stage_of(k) == key_prefix]:
            self._take_early(key)

    def _account(self, key: str, peer: str) -> str:
        """What an early chunk counts against: an announced stage's bytes (the whole bound only), or its sender."""
        prefix, _, index = key.rpartition("/")
        stage = self._stages.get(prefix)
        return _STAGE if stage is not None and index.isascii() and index.isdigit() and int(index) < stage[0] else peer

    def _count(self, account: str, nbytes: int) -> None:
        left = self._peer_early.get(account, 0) + nbytes
        if left > 0:
            self._peer_early[account] = left
        else:
            self._peer_early.pop(account, None)

    def early_room(self, nbytes: int, peer: str = "", key: str = "") -> bool:
        """Whether a chunk of ``nbytes`` from ``peer`` for ``key``, which nobody expects yet, may be kept now."""
        self._prune_early()
        account = self._account(key, peer)
        return self._early_bytes + nbytes <= self.early_max_bytes and (
            account == _STAGE or self._peer_early.get(account, 0) + nbytes <= self.early_peer_max_bytes
        )

    def _claim_early(self, key: str, nbytes: int, peer: str = "") -> str | None:
        """Counts ``nbytes`` of early data for ``key`` from ``peer`` before they are allocated or read, so chunks
        in flight are bounded too; the account to hand to ``_keep_early`` or ``_unclaim_early``, or None (refused:
        counted in ``early_dropped`` and logged)."""
        if not self.early_room(nbytes, peer, key):
            self.early_dropped += 1
            log.warning(
                "data plane: refused %d bytes from %s for unexpected key %r (%d of its %d, %d of %d early bytes used)",
                nbytes,
                peer or "a peer",
                key,
                self._peer_early.get(self._account(key, peer), 0),
                self.early_peer_max_bytes,
                self._early_bytes,
                self.early_max_bytes,
            )
            return None
        account = self._account(key, peer)
        self._count(account, nbytes)
        self._early_bytes += nbytes
        return account

    def _unclaim_early(self, nbytes: int, account: str) -> None:
        """Returns a claim whose bytes were not kept (they went to an expectation, or the peer left mid-frame)."""
        self._count(account, -nbytes)
        self._early_bytes = max(0, self._early_bytes - nbytes)  # close() may have reset the counts meanwhile

    def _keep_early(self, key: str, buf: Bytes, peer: str = "", account: str | None = None) -> bool:
        """Keeps a chunk that arrived before its expectation, under its claim ``account`` (claimed here when None);
        False (dropped, counted, logged) beyond the bounds."""
        self._take_early(key)
        if account is None:
            account = self._claim_early(key, buf.nbytes, peer)
            if account is None:
                return False
        self._early[key] = buf
        self._early_at[key] = time.monotonic()
        self._early_from[key] = account
        self._schedule_prune()
        return True

    def _schedule_prune(self) -> None:
        """A timer for the oldest early chunk's expiry: before, chunks expired only when another one arrived, so the
        last ones of an abandoned migration held their memory (up to ``early_max_bytes``) indefinitely."""
        if self._prune_timer is not None or not self._early_at:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next early_room() prunes
            return
        due = min(self._early_at.values()) + self.early_ttl_s - time.monotonic()
        self._prune_timer = loop.call_later(max(due, 0.0) + PRUNE_SLACK_S, self._prune_from_timer)

    def _prune_from_timer(self) -> None:
        self._prune_timer = None
        self._prune_early()
        self._schedule_prune()

    def _take_early(self, key: str) -> Bytes | None:
        buf = self._early.pop(key, None)
        if buf is not None:
            self._early_at.pop(key, None)
            self._unclaim_early(buf.nbytes, self._early_from.pop(key, ""))
        return buf

    def _prune_early(self) -> None:
        if not self._early_at:
            return
        cutoff = time.monotonic() - self.early_ttl_s
        for key in [k for k, at in self._early_at.items() if at < cutoff]:
            self._take_early(key)
            self.early_dropped += 1
            log.warning("data plane: dropped chunk %r, unclaimed for %.0f s", key, self.early_ttl_s)

    def _forget(self, key: str) -> None:
        self._take_early(key)

    def _fail_pending(self) -> None:
        """Early chunks are dropped too."""
        super()._fail_pending()
        if self._prune_timer is not None:
            self._prune_timer.cancel()
            self._prune_timer = None
        self._early.clear()
        self._early_at.clear()
        self._early_from.clear()
        self._peer_early.clear()
        self._stages.clear()
        self._early_bytes = 0


def _stage_of(key: str) -> str:
    """The stage key prefix of a chunk key (``chunk_key``: ``<migration>/<stage>/<index>``)."""
    return key.rpartition("/")[0]


async def await_expectation(exp: Expectation, timeout: float) -> Bytes:
    """Waits for an expectation's future with a timeout, mapping the outcome onto transport errors."""
    try:
        return await asyncio.wait_for(asyncio.shield(exp.future), timeout)
    except TimeoutError as e:
        raise TransportTimeout(f"receive {exp.key!r}: no data within {timeout:.3g}s") from e
