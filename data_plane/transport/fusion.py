"""Block fusion with pipelining: a stage's scattered KV blocks travel as a few large contiguous chunks.

Sending one message per block would pay per-message overhead thousands of times; the paper gathers blocks into one
contiguous buffer. Here the blocks of a stage are cut into chunks of up to ``chunk_bytes`` (whole blocks), the source
gathers chunk i+1 (``read_fn``, in a worker thread) while chunk i is on the wire, and the destination scatters each
chunk into its reserved blocks (``write_fn``) while the next ones arrive into a small ring of reusable buffers.

Both sides derive the chunking from (n_blocks, block_bytes, chunk_bytes) alone, so no extra metadata travels; the
optional CRC-32 (``zlib.crc32`` over the bytes in block order) is what TransferStage carries.

Device memory. Chunk buffers may be torch tensors on the engine's KV device (``ChunkBuffers(n, device=...)``), and
``read_fn``/``write_fn`` may be an engine's asynchronous hooks, returning a ``Ready`` handle: a chunk is sent only once
its gather kernel finished (ucxx ignores CUDA streams) and a ring slot is reused only once its scatter finished. A
transport that carries device memory (UCX with ``device=``) gets device chunks as they are; the others (TCP,
in-process) get them through a host staging buffer (page-locked on CUDA; on a CPU tensor, its own memory, no copy).

Two clocks bound a transfer: ``timeout`` the whole stage, and ``stall_timeout`` the time since the last chunk
completed (a progress watchdog). A multi-GiB stage needs a stage timeout of tens of seconds under load, but a transfer
that stopped moving (a dead peer, a transport that stopped progressing) must fail within seconds with
``TransportStalled``, not sit out the stage timeout.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pyllumnix.data_plane.engine.base import BlockBuffer, KvBuffer
from pyllumnix.data_plane.engine.device import (
    READY,
    Ready,
    device_buffer,
    host_view,
    is_torch_tensor,
    normalize_device,
    pinned_host_buffer,
)
from pyllumnix.data_plane.host_memory import host_buffer
from pyllumnix.data_plane.transport.base import (
    DEFAULT_TIMEOUT_S,
    Transport,
    TransportError,
    TransportStalled,
    TransportTimeout,
)

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_STALL_TIMEOUT_S = 5.0
"""No chunk completed for this long: the transfer is failed as stalled. A 16 MiB chunk takes milliseconds (tens of
milliseconds on a loaded host); this leaves room for a slow gather and a starved event loop."""

ReadFn = Callable[[Sequence[int]], KvBuffer | tuple[KvBuffer, Ready]]
"""Gathers blocks into a buffer (host array or device tensor), optionally with the handle of an asynchronous copy."""
WriteFn = Callable[[Sequence[int], KvBuffer], Ready | None]
"""Scatters a chunk into blocks, optionally returning the handle of an asynchronous copy."""


def carries_device(transport: Transport) -> bool:
    """True for a transport that sends and lands device memory directly (UCX created with ``device=``)."""
    return bool(getattr(transport, "device", None))


def _split_read(result: KvBuffer | tuple[KvBuffer, Ready]) -> tuple[KvBuffer, Ready]:
    if isinstance(result, tuple):
        data, ready = result
        return data, ready
    return result, READY


def _nbytes(buf: KvBuffer) -> int:
    return int(buf.nbytes) if isinstance(buf, np.ndarray) else int(buf.numel() * buf.element_size())


def _is_contiguous(buf: KvBuffer) -> bool:
    return bool(buf.flags.c_contiguous) if isinstance(buf, np.ndarray) else bool(buf.is_contiguous())


def _on_device(buf: KvBuffer) -> bool:
    return is_torch_tensor(buf) and buf.device.type != "cpu"


def _flat(buf: KvBuffer) -> KvBuffer:
    return buf.reshape(-1)


@dataclass(frozen=True)
class ChunkPlan:
    n_blocks: int
    block_bytes: int
    blocks_per_chunk: int
    n_chunks: int

    def bounds(self, index: int) -> tuple[int, int]:
        """[start, stop) of chunk ``index`` in the stage's block list."""
        start = index * self.blocks_per_chunk
        return start, min(start + self.blocks_per_chunk, self.n_blocks)

    def nbytes(self, index: int) -> int:
        start, stop = self.bounds(index)
        return (stop - start) * self.block_bytes


def plan_chunks(n_blocks: int, block_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ChunkPlan:
    """Whole blocks per chunk (at least one, even if a block exceeds ``chunk_bytes``) and the chunk count."""
    if n_blocks < 0 or block_bytes <= 0 or chunk_bytes <= 0:
        raise ValueError(f"bad chunk plan inputs: {n_blocks=}, {block_bytes=}, {chunk_bytes=}")
    per_chunk = max(1, chunk_bytes // block_bytes)
    return ChunkPlan(n_blocks, block_bytes, per_chunk, math.ceil(n_blocks / per_chunk))


def chunk_key_of(key_prefix: str, index: int) -> str:
    return f"{key_prefix}/{index}"


class ChunkBuffers:
    """Chunk-sized buffers kept across stages and migrations. Fresh memory costs a page fault per page on first
    touch (measured here: ~0.4-3.5 GB/s against 25+ GB/s for a warm copy), which would dominate a stage's time; a
    llumlet keeps one set for sending and one for receiving. Not shared between concurrent transfers.

    ``device=None``: host numpy arrays (the host engines' path). ``device="cpu"`` or ``"cuda:N"``: uint8 torch
    tensors on that device (the engine's ``kv_device``); a CUDA set also keeps one page-locked host staging buffer per
    slot, used only with transports that cannot carry device memory."""

    def __init__(self, count: int, device: str | None = None) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self.device = None if device is None else normalize_device(device)
        self._arrays: list[KvBuffer | None] = [None] * count
        self._staging: list[Any] = [None] * count
        self._next = 0

    def __len__(self) -> int:
        return len(self._arrays)

    def _new(self, n_blocks: int, block_bytes: int) -> KvBuffer:
        if self.device is None:
            array = host_buffer(n_blocks * block_bytes).reshape(n_blocks, block_bytes)
            array.fill(1)  # touch every page now, not mid-transfer
            return array
        return device_buffer(n_blocks * block_bytes, self.device).view(n_blocks, block_bytes)

    def get(self, slot: int, n_blocks: int, block_bytes: int) -> KvBuffer:
        """A (n_blocks, block_bytes) view of buffer ``slot % count``, grown (and touched) when too small."""
        i = slot % len(self._arrays)
        array = self._arrays[i]
        if array is None or array.shape[1] != block_bytes or array.shape[0] < n_blocks:
            array = self._new(n_blocks, block_bytes)
            self._arrays[i] = array
        return array[:n_blocks]

    def staging(self, slot: int, nbytes: int) -> BlockBuffer:
        """A flat host view of ``nbytes`` for slot ``slot % count``: page-locked memory (fast, DMA-able copies)."""
        i = slot % len(self._staging)
        buf = self._staging[i]
        if buf is None or buf.numel() < nbytes:
            buf = pinned_host_buffer(nbytes)
            buf.fill_(1)
            self._staging[i] = buf
        return host_view(buf[:nbytes])

    def rotate(self, n_blocks: int, block_bytes: int) -> KvBuffer:
        """The next buffer in turn (for a reader that fills one while the previous ones are still being sent)."""
        self._next += 1
        return self.get(self._next, n_blocks, block_bytes)

    def prewarm(self, n_blocks: int, block_bytes: int) -> None:
        for i in range(len(self._arrays)):
            self.get(i, n_blocks, block_bytes)


def _wire_send(data: KvBuffer, transport: Transport, stage: Callable[[int], BlockBuffer]) -> KvBuffer:
    """What goes on the wire for ``data``: device memory as is to a device transport, else host bytes (a CPU
    tensor's own memory, or a copy into the staging buffer ``stage(nbytes)`` for device memory). Host memory handed
    to a device transport is refused by the transport."""
    if not is_torch_tensor(data):
        return data
    if _on_device(data):
        if carries_device(transport):
            return _flat(data)
        host = stage(_nbytes(data))
        import torch

        torch.from_numpy(host).copy_(_flat(data))
        return host
    if carries_device(transport):
        return _flat(data)  # the transport refuses it with a clear error
    return host_view(_flat(data))


def _host_bytes(buf: KvBuffer) -> memoryview:
    """Bytes for the CRC: host memory as is, device memory copied back (checksums on a device path cost a copy)."""
    if _on_device(buf):
        return host_view(_flat(buf).cpu()).data
    return host_view(_flat(buf)).data if is_torch_tensor(buf) else memoryview(buf).cast("B")


@dataclass(frozen=True)
class TransferResult:
    nbytes: int
    n_chunks: int
    # CRC-32 of all bytes in block order, when asked for.
    crc32: int | None = None


def _remaining(deadline: float, what: str) -> float:
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise TransportTimeout(f"{what}: stage deadline passed")
    return left


class _Watchdog:
    """The two clocks of one transfer: the stage deadline and the stall deadline (last chunk completed + stall)."""

    def __init__(self, what: str, timeout: float, stall_timeout: float | None, n_chunks: int, nbytes: int) -> None:
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive (or None)")
        self._loop = asyncio.get_running_loop()
        self.what = what
        self.deadline = self._loop.time() + timeout
        self.stall_timeout = stall_timeout
        self.last_progress = self._loop.time()
        self.n_chunks, self.nbytes = n_chunks, nbytes
        self.chunks_done = self.bytes_done = 0

    def budget(self, step: str) -> tuple[float, bool]:
        """Seconds ``step`` may take, and whether the stall clock (not the stage deadline) is what binds it."""
        left = _remaining(self.deadline, f"{self.what}: {step}")
        if self.stall_timeout is None:
            return left, False
        stall_left = self.last_progress + self.stall_timeout - self._loop.time()
        if stall_left < left:
            if stall_left <= 0:
                raise self.stalled(step)
            return stall_left, True
        return left, False

    def progressed(self, nbytes: int) -> None:
        self.chunks_done += 1
        self.bytes_done += nbytes
        self.last_progress = self._loop.time()

    def stalled(self, step: str) -> TransportStalled:
        return TransportStalled(
            f"{self.what}: stalled at {step}, no chunk completed for {self.stall_timeout:g}s "
            f"({self.chunks_done} of {self.n_chunks} chunks, {self.bytes_done} of {self.nbytes} bytes done)"
        )


async def send_blocks(
    transport: Transport,
    peer: str,
    key_prefix: str,
    read_fn: ReadFn,
    block_ids: Sequence[int],
    block_bytes: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT_S,
    checksum: bool = False,
    gather_in_thread: bool = True,
    staging: ChunkBuffers | None = None,
) -> TransferResult:
    """Sends the blocks as fused chunks, gathering the next chunk while the current one is sent.

    ``timeout`` bounds the whole stage; ``stall_timeout`` (None: off) the time from one chunk sent to the next
    (gather included), raising TransportStalled. ``gather_in_thread=False`` calls ``read_fn`` on the event loop (for
    engines that must not be read from another thread); it then overlaps nothing. ``staging`` (two slots or more)
    holds the host copies of device chunks for a host-only transport; fresh ones otherwise."""
    plan = plan_chunks(len(block_ids), block_bytes, chunk_bytes)
    clock = _Watchdog(f"send_blocks {key_prefix}", timeout, stall_timeout, plan.n_chunks, plan.n_blocks * block_bytes)

    stage_bufs = staging if staging is not None else ChunkBuffers(2)

    def gather(index: int, crc: int) -> tuple[KvBuffer, int]:
        """Gathers chunk ``index``, waits for its copy, and returns what the transport sends."""
        start, stop = plan.bounds(index)
        data, ready = _split_read(read_fn(block_ids[start:stop]))
        if _nbytes(data) != (stop - start) * block_bytes or not _is_contiguous(data):
            raise TransportError(
                f"read_fn returned {tuple(data.shape)} {data.dtype}, need contiguous ({stop - start}, {block_bytes})"
            )
        ready.wait()  # ucxx ignores CUDA streams: the gather kernel must be done before the bytes are sent
        wire = _wire_send(data, transport, lambda nbytes: stage_bufs.staging(index, nbytes))
        if checksum:
            crc = zlib.crc32(wire.data if isinstance(wire, np.ndarray) else _host_bytes(wire), crc)
        return wire, crc

    async def gather_async(index: int, crc: int) -> tuple[KvBuffer, int]:
        if gather_in_thread:
            return await asyncio.to_thread(gather, index, crc)
        return gather(index, crc)

    crc = 0
    pending: asyncio.Task[tuple[KvBuffer, int]] | None = None
    try:
        if plan.n_chunks:
            pending = asyncio.ensure_future(gather_async(0, crc))
        for index in range(plan.n_chunks):
            assert pending is not None
            step = f"gather {index}"
            limit, stall_binds = clock.budget(step)
            try:
                data, crc = await asyncio.wait_for(pending, limit)
            except TimeoutError as e:
                if stall_binds:
                    raise clock.stalled(step) from e
                raise TransportTimeout(f"send_blocks {key_prefix}: gather did not finish in time") from e
            pending = asyncio.ensure_future(gather_async(index + 1, crc)) if index + 1 < plan.n_chunks else None
            key = chunk_key_of(key_prefix, index)
            limit, stall_binds = clock.budget(f"send {key}")
            try:
                await transport.send(peer, key, data, timeout=limit)
            except TransportTimeout as e:
                if stall_binds and not isinstance(e, TransportStalled):
                    raise clock.stalled(f"send {key}") from e
                raise
            clock.progressed(_nbytes(data))
    finally:
        if pending is not None:
            pending.cancel()
    return TransferResult(plan.n_blocks * block_bytes, plan.n_chunks, crc if checksum else None)


async def receive_blocks(
    transport: Transport,
    key_prefix: str,
    dst_block_ids: Sequence[int],
    block_bytes: int,
    write_fn: WriteFn,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT_S,
    checksum: bool = False,
    window: int = 4,
    scatter_in_thread: bool = True,
    buffers: ChunkBuffers | None = None,
) -> TransferResult:
    """Receives a stage sent by ``send_blocks`` and scatters each chunk into ``dst_block_ids`` as it arrives.

    Up to ``window`` chunks are expected ahead into reusable buffers, so the transport lands bytes without a copy
    while earlier chunks are scattered. ``timeout`` bounds the whole stage, ``stall_timeout`` (None: off) the wait
    for the next chunk after the previous one was scattered (the first: from the start), raising TransportStalled; on
    any error the outstanding expectations are cancelled and the error propagates (the destination then frees its
    reservation). ``buffers`` (at least ``window`` of them) are reused instead of fresh ones; when they are device
    tensors and the transport carries only host memory, chunks land in their staging buffers and are copied up before
    ``write_fn``. A slot is expected again only after its scatter finished (``write_fn``'s handle)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    plan = plan_chunks(len(dst_block_ids), block_bytes, chunk_bytes)
    clock = _Watchdog(
        f"receive_blocks {key_prefix}", timeout, stall_timeout, plan.n_chunks, plan.n_blocks * block_bytes
    )
    if buffers is None:
        buffers = ChunkBuffers(window)
    ring = [buffers.get(i, plan.blocks_per_chunk, block_bytes) for i in range(min(len(buffers), plan.n_chunks))]

    staged = bool(ring) and _on_device(ring[0]) and not carries_device(transport)

    def slot(index: int) -> KvBuffer:
        start, stop = plan.bounds(index)
        return ring[index % len(ring)][: stop - start]

    def landing(index: int) -> KvBuffer:
        """Where the transport writes chunk ``index``: the slot itself, its host memory, or its staging buffer."""
        if staged:
            return buffers.staging(index % len(ring), plan.nbytes(index))
        return _wire_send(slot(index), transport, lambda _n: host_view(slot(index)))

    def scatter(index: int, crc: int) -> int:
        start, stop = plan.bounds(index)
        blocks = slot(index)
        if staged:
            import torch

            _flat(blocks).copy_(torch.from_numpy(landing(index)))
        ready = write_fn(dst_block_ids[start:stop], blocks)
        if ready is not None:
            ready.wait()  # the slot is expected (written) again next: its scatter must be done
        if not checksum:
            return crc
        return zlib.crc32(landing(index).data if staged else _host_bytes(blocks), crc)

    outstanding: list[str] = []
    transport.admit_stage(
        key_prefix, plan.n_chunks
    )  # the chunks beyond the window arrive early: not one sender's share (M4)
    try:
        for index in range(len(ring)):
            key = chunk_key_of(key_prefix, index)
            transport.expect(key, plan.nbytes(index), out=landing(index))
            outstanding.append(key)
    except BaseException:
        for key in outstanding:
            transport.cancel(key)
        transport.end_stage(key_prefix)
        raise
    crc = 0
    try:
        for index in range(plan.n_chunks):
            key = chunk_key_of(key_prefix, index)
            limit, stall_binds = clock.budget(f"receive {key}")
            try:
                await transport.receive(key, timeout=limit)
            except TransportTimeout as e:
                if stall_binds and not isinstance(e, TransportStalled):
                    raise clock.stalled(f"receive {key}") from e
                raise
            outstanding.remove(key)
            if scatter_in_thread:
                crc = await _joined(asyncio.to_thread(scatter, index, crc))
            else:
                crc = scatter(index, crc)
            clock.progressed(plan.nbytes(index))
            ahead = index + len(ring)
            if ahead < plan.n_chunks:
                key = chunk_key_of(key_prefix, ahead)
                transport.expect(key, plan.nbytes(ahead), out=landing(ahead))
                outstanding.append(key)
    finally:
        for key in outstanding:
            transport.cancel(key)
        transport.end_stage(key_prefix)
    return TransferResult(plan.n_blocks * block_bytes, plan.n_chunks, crc if checksum else None)


T = TypeVar("T")
# How long a cancelled transfer waits for its copy thread to finish (it writes into blocks the caller frees next).
THREAD_JOIN_S = 5.0


async def _joined(work: Coroutine[Any, Any, T]) -> T:
    """Awaits ``work`` (a copy in a worker thread); when cancelled, waits for the thread (up to ``THREAD_JOIN_S``)
    before passing the cancellation on: a thread cannot be stopped, and one still scattering into the destination's
    reserved blocks after the abort freed them wrote into whatever request got them next."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task], timeout=THREAD_JOIN_S)
        raise
