"""Two real processes move KV blocks over TCP and UCX; a dead UCX peer must not hang the sender."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

import numpy as np
import pytest

from pyllumnix.data_plane.transport import (
    TransportError,
    make_transport,
    receive_blocks,
    send_blocks,
    ucx_available,
)

pytestmark = pytest.mark.integration

NEEDS_UCX = pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")
KINDS = ["tcp", pytest.param("ucx", marks=NEEDS_UCX)]
BLOCK_BYTES = 64 << 10
TOTAL_BLOCKS = 512


def _receiver(kind: str, dst_ids: Sequence[int], chunk_bytes: int, conn: Connection) -> None:
    """Child: publishes its address, receives a stage into a block pool, returns the touched blocks."""

    async def main() -> None:
        pool = np.zeros((TOTAL_BLOCKS, BLOCK_BYTES), dtype=np.uint8)

        def write(ids: Sequence[int], data: np.ndarray) -> None:
            pool[np.asarray(ids)] = data

        transport = make_transport(kind)
        conn.send(await transport.start())
        result = await receive_blocks(
            transport, "mig-1/0", dst_ids, BLOCK_BYTES, write, chunk_bytes, timeout=60, checksum=True
        )
        conn.send((result.nbytes, result.crc32, pool[np.asarray(dst_ids)].tobytes(), int(pool.sum(dtype=np.int64))))
        conn.recv()  # stay up until the parent has read the answer
        await transport.close()

    asyncio.run(main())


def _idle_peer(kind: str, conn: Connection) -> None:
    """Child: publishes an address and waits to be killed."""

    async def main() -> None:
        transport = make_transport(kind)
        conn.send(await transport.start())
        await asyncio.sleep(120)

    asyncio.run(main())


def _spawn(target: Callable[..., None], *args: object) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


async def _recv(conn: Connection, timeout: float) -> object:
    ok = await asyncio.to_thread(conn.poll, timeout)
    assert ok, "child did not answer in time"
    return conn.recv()


@pytest.mark.parametrize("kind", KINDS)
async def test_blocks_move_between_processes(kind: str) -> None:
    rng = np.random.default_rng(7)
    pool = rng.integers(0, 256, (TOTAL_BLOCKS, BLOCK_BYTES), dtype=np.uint8)
    src_ids = [int(i) for i in rng.permutation(TOTAL_BLOCKS)[:300]]
    dst_ids = [int(i) for i in rng.permutation(TOTAL_BLOCKS)[:300]]
    chunk_bytes = 4 << 20  # 64 blocks a chunk -> 5 chunks
    proc, parent = _spawn(_receiver, kind, dst_ids, chunk_bytes)
    transport = make_transport(kind)
    try:
        await transport.start()
        peer = await _recv(parent, 60)
        assert isinstance(peer, str)
        sent = await send_blocks(
            transport,
            peer,
            "mig-1/0",
            lambda ids: pool[np.asarray(ids)],
            src_ids,
            BLOCK_BYTES,
            chunk_bytes,
            timeout=60,
            checksum=True,
        )
        answer = await _recv(parent, 60)
        assert isinstance(answer, tuple)
        nbytes, crc, blocks, total = answer
        parent.send("bye")
    finally:
        await transport.close()
        proc.join(20)
        if proc.is_alive():
            proc.kill()
    expected = pool[np.asarray(src_ids)]
    assert sent.n_chunks == 5
    assert nbytes == sent.nbytes == expected.nbytes
    assert crc == sent.crc32
    assert blocks == expected.tobytes()
    assert total == int(expected.sum(dtype=np.int64))  # nothing outside dst_ids was written


@pytest.mark.parametrize("kind", KINDS)
async def test_send_to_killed_peer_never_hangs(kind: str) -> None:
    proc, conn = _spawn(_idle_peer, kind)
    transport = make_transport(kind)
    try:
        await transport.start()
        peer = await _recv(conn, 60)
        assert isinstance(peer, str)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        data = np.ones(16 << 20, dtype=np.uint8)
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            for i in range(3):
                await transport.send(peer, f"dead/{i}", data, timeout=2)
        assert time.monotonic() - t0 < 8
        # The endpoint still works for others afterwards.
        other = make_transport(kind)
        await other.start()
        other.expect("alive", 8)
        await transport.send(other.address, "alive", b"12345678", timeout=5)
        assert bytes(await other.receive("alive", timeout=5)) == b"12345678"
        await other.close()
    finally:
        await transport.close()
        if proc.is_alive():
            proc.kill()
