"""Block fusion: chunking math and byte-exact round trips with scattered block ids."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import BlockBuffer
from pyllumnix.data_plane.transport import (
    DEFAULT_TIMEOUT_S,
    TransportError,
    TransportStalled,
    TransportTimeout,
    make_transport,
    plan_chunks,
    receive_blocks,
    send_blocks,
    ucx_available,
)
from pyllumnix.data_plane.transport.base import Chunk
from pyllumnix.data_plane.transport.inproc import InprocTransport

KINDS = [
    "inproc",
    "tcp",
    pytest.param("ucx", marks=pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")),
]


class BlockPool:
    """A stand-in for an engine's KV pool: (total, block_bytes) bytes."""

    def __init__(self, total: int, block_bytes: int, seed: int | None = None) -> None:
        if seed is None:
            self.data = np.zeros((total, block_bytes), dtype=np.uint8)
        else:
            self.data = np.random.default_rng(seed).integers(0, 256, (total, block_bytes), dtype=np.uint8)

    def read(self, ids: Sequence[int]) -> BlockBuffer:
        return self.data[np.asarray(ids, dtype=np.int64)]

    def write(self, ids: Sequence[int], data: BlockBuffer) -> None:
        self.data[np.asarray(ids, dtype=np.int64)] = data


@pytest.mark.parametrize(
    ("n", "bb", "cb", "per", "chunks"),
    [
        (0, 4096, 16 << 20, 4096, 0),
        (1, 4096, 16 << 20, 4096, 1),
        (4096, 4096, 16 << 20, 4096, 1),
        (4097, 4096, 16 << 20, 4096, 2),
        (10, 3000, 7000, 2, 5),
        (3, 10_000, 4096, 1, 3),  # a block larger than a chunk still travels whole
    ],
)
def test_plan_chunks(n: int, bb: int, cb: int, per: int, chunks: int) -> None:
    plan = plan_chunks(n, bb, cb)
    assert (plan.blocks_per_chunk, plan.n_chunks) == (per, chunks)
    covered = [i for c in range(plan.n_chunks) for i in range(*plan.bounds(c))]
    assert covered == list(range(n))
    assert sum(plan.nbytes(c) for c in range(plan.n_chunks)) == n * bb


def test_plan_chunks_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        plan_chunks(1, 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threads", [True, False])
async def test_round_trip_scattered_blocks(kind: str, threads: bool) -> None:
    block_bytes = 5000
    src, dst = BlockPool(200, block_bytes, seed=1), BlockPool(300, block_bytes)
    rng = np.random.default_rng(2)
    src_ids = [int(i) for i in rng.permutation(200)[:77]]
    dst_ids = [int(i) for i in rng.permutation(300)[:77]]
    a, b = make_transport(kind), make_transport(kind)
    await a.start()
    await b.start()
    try:
        chunk = 8 * block_bytes + 123  # 8 blocks a chunk -> 10 chunks, the last one short
        recv = asyncio.create_task(
            receive_blocks(
                b,
                "mig/0",
                dst_ids,
                block_bytes,
                dst.write,
                chunk,
                timeout=20,
                checksum=True,
                window=3,
                scatter_in_thread=threads,
            )
        )
        sent = await send_blocks(
            a,
            b.address,
            "mig/0",
            src.read,
            src_ids,
            block_bytes,
            chunk,
            timeout=20,
            checksum=True,
            gather_in_thread=threads,
        )
        got = await recv
    finally:
        await a.close()
        await b.close()
    assert sent.n_chunks == got.n_chunks == 10
    assert sent.nbytes == got.nbytes == 77 * block_bytes
    assert sent.crc32 == got.crc32 == zlib.crc32(src.read(src_ids).tobytes())
    assert np.array_equal(dst.data[dst_ids], src.data[src_ids])
    untouched = np.setdiff1d(np.arange(300), dst_ids)
    assert not dst.data[untouched].any()


async def test_empty_stage() -> None:
    a, b = make_transport("inproc"), make_transport("inproc")
    await a.start()
    await b.start()
    pool = BlockPool(4, 64)
    res = await send_blocks(a, b.address, "e", pool.read, [], 64)
    got = await receive_blocks(b, "e", [], 64, pool.write)
    assert res.nbytes == got.nbytes == 0 and res.n_chunks == got.n_chunks == 0


async def test_receive_blocks_times_out_and_cancels_expectations() -> None:
    b = make_transport("tcp")
    await b.start()
    pool = BlockPool(8, 1024)
    with pytest.raises(TransportTimeout):
        await receive_blocks(b, "lost", list(range(8)), 1024, pool.write, 2048, timeout=0.3)
    b.expect("lost/0", 2048)  # cancelled on the way out, so the key is free again
    await b.close()


async def test_send_blocks_to_dead_peer_raises() -> None:
    a, b = make_transport("tcp"), make_transport("tcp")
    await a.start()
    peer = await b.start()
    await b.close()
    pool = BlockPool(8, 1024, seed=3)
    with pytest.raises(TransportError):
        await send_blocks(a, peer, "x", pool.read, list(range(8)), 1024, 2048, timeout=2)
    await a.close()


class FreezingTransport(InprocTransport):
    """From its ``freeze_at``-th send on, a send makes no progress until its timeout: a transfer that stopped moving
    while its peer is alive (the shape of a transport that stopped progressing)."""

    def __init__(self, freeze_at: int) -> None:
        super().__init__()
        self.freeze_at = freeze_at
        self.sent = 0

    async def send(self, peer: str, key: str, chunk: Chunk, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if self.sent >= self.freeze_at:
            await asyncio.sleep(timeout)
            raise TransportTimeout(f"send {key!r}: not done within {timeout:.3g}s")
        self.sent += 1
        await super().send(peer, key, chunk, timeout)


async def test_stalled_transfer_fails_within_the_stall_timeout_on_both_sides() -> None:
    """The stage may take 30 s; a transfer that completes no chunk for 0.3 s fails as stalled on each side."""
    a, b = FreezingTransport(freeze_at=2), make_transport("inproc")
    await a.start()
    await b.start()
    src, dst = BlockPool(10, 1024, seed=4), BlockPool(10, 1024)
    ids = list(range(10))  # 2 blocks a chunk -> 5 chunks
    t0 = time.monotonic()
    recv = asyncio.create_task(receive_blocks(b, "m/0", ids, 1024, dst.write, 2048, timeout=30, stall_timeout=0.3))
    with pytest.raises(TransportStalled, match=r"send m/0/2.*0\.3s \(2 of 5 chunks, 4096 of 10240 bytes"):
        await send_blocks(a, b.address, "m/0", src.read, ids, 1024, 2048, timeout=30, stall_timeout=0.3)
    with pytest.raises(TransportStalled, match=r"receive m/0/2.*\(2 of 5 chunks"):
        await recv
    assert time.monotonic() - t0 < 5.0
    assert np.array_equal(dst.data[:4], src.data[:4])  # what did arrive was scattered
    b.expect("m/0/2", 2048)  # the receiver cancelled its outstanding expectations
    await a.close()
    await b.close()


async def test_without_stall_timeout_only_the_stage_timeout_applies() -> None:
    a, b = FreezingTransport(freeze_at=1), make_transport("inproc")
    await a.start()
    await b.start()
    pool = BlockPool(4, 1024, seed=5)
    with pytest.raises(TransportTimeout) as info:
        await send_blocks(a, b.address, "n/0", pool.read, [0, 1, 2, 3], 1024, 1024, timeout=0.4, stall_timeout=None)
    assert not isinstance(info.value, TransportStalled)
    await a.close()
    await b.close()


async def test_slow_but_steady_transfer_is_not_a_stall() -> None:
    """The watchdog bounds the gap between chunks, not the stage: 6 chunks of 0.15 s each outlast the stall timeout
    together and still complete."""
    a, b = make_transport("inproc", cost_fn=lambda n: 0.15), make_transport("inproc")
    await a.start()
    await b.start()
    src, dst = BlockPool(6, 512, seed=6), BlockPool(6, 512)
    ids = list(range(6))
    recv = asyncio.create_task(receive_blocks(b, "s/0", ids, 512, dst.write, 512, timeout=30, stall_timeout=0.6))
    sent = await send_blocks(a, b.address, "s/0", src.read, ids, 512, 512, timeout=30, stall_timeout=0.6)
    got = await recv
    assert sent.n_chunks == got.n_chunks == 6
    assert np.array_equal(dst.data, src.data)
    await a.close()
    await b.close()


async def test_stall_timeout_must_be_positive() -> None:
    a = make_transport("inproc")
    await a.start()
    with pytest.raises(ValueError):
        await send_blocks(a, a.address, "z", BlockPool(1, 8).read, [0], 8, stall_timeout=0)
    await a.close()


async def test_a_cancelled_receive_returns_only_after_its_scatter_thread_ended() -> None:
    """REVIEW19-4a: cancelling ``receive_blocks`` returned while its scatter thread still wrote into the destination's
    reserved blocks; the abort then freed them, and the thread wrote into whatever request got them next."""
    a, b = InprocTransport(), InprocTransport()
    await a.start()
    await b.start()
    block = 4096
    writing: list[str] = []

    def write(ids: Sequence[int], data: BlockBuffer) -> None:
        writing.append("begins")
        time.sleep(0.3)  # a slow copy (a big chunk, a busy host)
        writing.append("ends")

    try:
        recv = asyncio.create_task(
            receive_blocks(b, "m/0", [10, 11], block, write, chunk_bytes=block, timeout=5, scatter_in_thread=True)
        )
        await asyncio.sleep(0.01)
        ones = np.ones((2, block), np.uint8)
        await send_blocks(a, b.address, "m/0", lambda ids: ones[: len(ids)], [1, 2], block, chunk_bytes=block)
        async with asyncio.timeout(5):
            while not writing:
                await asyncio.sleep(0.005)
        recv.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recv
        assert writing[-1] == "ends", "the receive returned while its thread still wrote into the blocks"
    finally:
        await a.close()
        await b.close()
