"""Block fusion: chunking math and byte-exact round trips with scattered block ids."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import BlockBuffer
from pyllumnix.data_plane.transport import (
    TransportError,
    TransportTimeout,
    make_transport,
    plan_chunks,
    receive_blocks,
    send_blocks,
    ucx_available,
)

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
