"""#13 attacks on the TCP data plane (real sockets on 127.0.0.1): huge frame headers and floods of frames for keys
nobody expects.

A frame header claiming more than ``MAX_FRAME_BYTES`` drops the connection at once, before anything is allocated;
chunks for unexpected keys are kept only within the early-chunk bounds (bytes and age) and then dropped; meanwhile a
legitimate expected transfer still lands exactly. Before #13 the receiver allocated whatever the header claimed and
waited for it, and kept every unexpected chunk for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from pyllumnix.data_plane.transport.base import TransportError
from pyllumnix.data_plane.transport.inproc import InprocTransport
from pyllumnix.data_plane.transport.tcp import MAX_FRAME_BYTES, TcpTransport, parse_tcp_address

HEADER = struct.Struct("!4sIQ")
DEADLINE = 5.0


@pytest.fixture
async def receiver() -> AsyncIterator[TcpTransport]:
    transport = TcpTransport()
    transport.early_max_bytes = 4 << 20
    transport.early_ttl_s = 0.5
    await transport.start()
    yield transport
    await transport.close()


async def raw_connection(address: str) -> socket.socket:
    host, port = parse_tcp_address(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return sock


async def closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closes the connection within the deadline (EOF or reset)."""
    try:
        async with asyncio.timeout(DEADLINE):
            return await asyncio.get_running_loop().sock_recv(sock, 1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def legit_transfer_lands(receiver: TcpTransport) -> None:
    key = f"legit-{time.monotonic_ns()}"
    data = np.arange(1 << 16, dtype=np.uint8)
    receiver.expect(key, data.nbytes)
    sender = TcpTransport()
    await sender.start()
    try:
        await sender.send(receiver.address, key, data, timeout=DEADLINE)
        got = await receiver.receive(key, timeout=DEADLINE)
    finally:
        await sender.close()
    assert np.array_equal(got, data)


async def test_a_frame_header_over_the_limit_drops_the_connection(receiver: TcpTransport) -> None:
    sock = await raw_connection(receiver.address)
    try:
        key = b"m1~x/0/0"
        frame = HEADER.pack(b"LLDP", len(key), MAX_FRAME_BYTES + 1) + key
        await asyncio.get_running_loop().sock_sendall(sock, frame)
        assert await closed_by_peer(sock), "a frame over the limit must drop the connection, not wait for its bytes"
    finally:
        sock.close()
    huge = await raw_connection(receiver.address)
    try:
        frame = HEADER.pack(b"LLDP", 3, 1 << 40) + b"abc"
        await asyncio.get_running_loop().sock_sendall(huge, frame)
        assert await closed_by_peer(huge)
    finally:
        huge.close()
    await legit_transfer_lands(receiver)


async def test_chunks_for_unexpected_keys_are_bounded_and_expire(receiver: TcpTransport) -> None:
    flooder = TcpTransport()
    await flooder.start()
    chunk = np.full(1 << 20, 7, dtype=np.uint8)
    try:
        share = receiver.early_peer_max_bytes  # one sender's bound: half of the whole (B7)
        assert share == 2 << 20
        for i in range(2):  # within the bound: kept for a later expectation
            await flooder.send(receiver.address, f"nobody/{i}", chunk, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            while receiver.early_bytes < share:
                await asyncio.sleep(0.01)
        # Over the bound: the receiver drops the connection instead of buffering.
        with pytest.raises(Exception):  # noqa: B017 - a reset or a timeout, depending on timing
            for i in range(4, 64):
                await flooder.send(receiver.address, f"nobody/{i}", chunk, timeout=1.0)
        assert receiver.early_bytes <= share
        assert receiver.early_dropped >= 1
        # Unclaimed chunks expire.
        await asyncio.sleep(receiver.early_ttl_s + 0.1)
        assert receiver.early_room(share)
        assert receiver.early_bytes == 0
    finally:
        await flooder.close()
    await legit_transfer_lands(receiver)


async def test_one_sender_filling_its_early_share_does_not_starve_another() -> None:
    """B7: a llumlet certificate could fill another llumlet's whole early-data buffer (256 MiB) with keys nobody
    expects and hold it for its 30 s lifetime, so every other source's chunks that arrived ahead of their expectation
    were dropped (their migrations failed). Now each sender holds at most its share (half): another source's early
    chunk is still kept, and claimed by its expectation."""
    receiver = InprocTransport()
    receiver.early_max_bytes = 4 << 20
    flooder, source = InprocTransport(), InprocTransport()
    for t in (receiver, flooder, source):
        await t.start()
    chunk = np.full(1 << 20, 7, dtype=np.uint8)
    try:
        for i in range(8):  # the flooder tries to take it all
            await flooder.send(receiver.address, f"nobody/{i}", chunk, timeout=DEADLINE)
        assert receiver.early_bytes == 2 << 20, "the flooder holds its share only"
        assert receiver.early_dropped == 6
        data = np.arange(1 << 20, dtype=np.uint8)
        await source.send(receiver.address, "m2~t/0/0", data, timeout=DEADLINE)  # ahead of its expectation
        assert receiver.early_dropped == 6, "another source's early chunk was dropped"
        receiver.expect("m2~t/0/0", data.nbytes)
        assert np.array_equal(await receiver.receive("m2~t/0/0", timeout=DEADLINE), data)
        assert receiver.early_bytes == 2 << 20  # the flooder's, until they expire
        assert receiver.early_peer_max_bytes == 2 << 20
    finally:
        for t in (receiver, flooder, source):
            await t.close()


async def test_one_sender_may_fill_the_whole_early_buffer_with_a_stage_being_received(receiver: TcpTransport) -> None:
    """M4 (REVIEW10): the receiver expects only ``window`` chunks ahead, so the rest of a big stage normally arrives as
    early data; SEC 5's per-sender share (half) made such a stage from a single source fail at half the room. Chunks
    of a stage the receiver announced count against the whole bound only, so one sender may fill all of it again."""
    receiver.early_ttl_s = 30.0
    sender = TcpTransport()
    await sender.start()
    chunk = np.full(1 << 20, 3, dtype=np.uint8)
    receiver.admit_stage("m4~t/0", 4)
    try:
        for i in range(4):  # the whole bound (4 MiB) from one sender, nobody expecting any of it yet
            await sender.send(receiver.address, f"m4~t/0/{i}", chunk, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            while receiver.early_bytes < 4 << 20 and receiver.early_dropped == 0:
                await asyncio.sleep(0.01)
        assert receiver.early_dropped == 0, "a chunk of the announced stage was refused"
        assert receiver.early_bytes == 4 << 20
        for i in range(4):
            receiver.expect(f"m4~t/0/{i}", chunk.nbytes)
            assert np.array_equal(await receiver.receive(f"m4~t/0/{i}", timeout=DEADLINE), chunk)
        assert receiver.early_bytes == 0
        # keys beyond the announced stage's chunks are held to the sender's share
        for i in range(4, 7):  # the third is refused: the receiver drops the connection
            with contextlib.suppress(TransportError):
                await sender.send(receiver.address, f"m4~t/0/{i}", chunk, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            while receiver.early_bytes < 2 << 20:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert receiver.early_bytes == 2 << 20 and receiver.early_dropped >= 1
    finally:
        receiver.end_stage("m4~t/0")
        await sender.close()


async def test_a_big_stage_with_a_slow_scatter_lands_from_a_single_sender(receiver: TcpTransport) -> None:
    """M4 as measured: a stage twice the early bound, chunks streamed at once, each scatter slow, so all but the
    window wait as early data (4 MiB); with the per-sender share (2 MiB) the receiver dropped the connection and the
    stage stalled."""
    from pyllumnix.data_plane.transport.fusion import receive_blocks, send_blocks

    receiver.early_ttl_s = 30.0
    block, n = 512 << 10, 12  # 6 MiB: 4 chunks expected ahead, 8 (4 MiB) early
    src = np.random.default_rng(4).integers(0, 255, size=(n, block), dtype=np.uint8)
    dst = np.zeros_like(src)

    def write(ids: Sequence[int], blocks: np.ndarray) -> None:
        time.sleep(0.05)  # a busy device: the sender is far ahead
        dst[list(ids)] = blocks.reshape(len(ids), block)

    sender = TcpTransport()
    await sender.start()
    try:
        ids = list(range(n))
        recv = asyncio.ensure_future(
            receive_blocks(receiver, "m4b~t/0", ids, block, write, chunk_bytes=block, timeout=20, stall_timeout=3)
        )
        await asyncio.sleep(0.05)
        await send_blocks(
            sender,
            receiver.address,
            "m4b~t/0",
            lambda b: src[list(b)].copy(),
            ids,
            block,
            chunk_bytes=block,
            timeout=20,
            stall_timeout=3,
        )
        await recv
    finally:
        await sender.close()
    assert np.array_equal(src, dst)
    assert receiver.early_dropped == 0
    assert receiver.early_bytes == 0


async def test_frames_in_flight_count_against_the_early_bound(receiver: TcpTransport) -> None:
    """A frame for an unexpected key is counted when its header arrives, before its buffer is allocated: parallel
    connections that each announce a chunk and send it slowly cannot hold more than the sender's share in flight
    (before, each allocated its frame uncounted, N connections x the frame size)."""
    socks = [await raw_connection(receiver.address) for _ in range(4)]
    try:
        loop = asyncio.get_running_loop()
        for i, sock in enumerate(socks):
            key = f"slow/{i}".encode()
            await loop.sock_sendall(sock, HEADER.pack(b"LLDP", len(key), 1 << 20) + key + b"x")  # 1 byte of 1 MiB
            await asyncio.sleep(0.05)
        assert receiver.early_bytes == 2 << 20, "the two frames within the share are counted while in flight"
        assert await closed_by_peer(socks[2]) and await closed_by_peer(socks[3])
        assert receiver.early_dropped == 2
        for sock in socks[:2]:  # a peer that leaves mid-frame returns its claim
            sock.close()
        async with asyncio.timeout(DEADLINE):
            while receiver.early_bytes:
                await asyncio.sleep(0.01)
    finally:
        for sock in socks:
            sock.close()
    await legit_transfer_lands(receiver)


async def test_chunks_that_came_before_their_stage_was_announced_leave_the_senders_share() -> None:
    """A source may start a stage before the receiver announced it: those early chunks first count against the
    source's share, and move to the stage when it is announced, so the rest of the stage still fits; when the stage
    ends, its unclaimed chunks are dropped."""
    receiver, source = InprocTransport(), InprocTransport()
    receiver.early_max_bytes = 4 << 20
    for t in (receiver, source):
        await t.start()
    chunk = np.full(1 << 20, 5, dtype=np.uint8)
    try:
        for i in range(3):
            await source.send(receiver.address, f"m5~t/1/{i}", chunk, timeout=DEADLINE)
        assert (receiver.early_bytes, receiver.early_dropped) == (2 << 20, 1), "unannounced: the sender's share"
        receiver.admit_stage("m5~t/1", 4)
        for i in (2, 3):
            await source.send(receiver.address, f"m5~t/1/{i}", chunk, timeout=DEADLINE)
        assert (receiver.early_bytes, receiver.early_dropped) == (4 << 20, 1)
        await source.send(receiver.address, "other/0", chunk, timeout=DEADLINE)  # the whole bound still holds
        assert receiver.early_dropped == 2
        receiver.end_stage("m5~t/1")
        assert receiver.early_bytes == 0
    finally:
        for t in (receiver, source):
            await t.close()


async def test_early_chunks_expire_with_no_other_traffic() -> None:
    """Was: an early chunk expired only when a later one was checked for room, so the last chunks of an abandoned
    migration held their memory (up to the whole early bound) until some other chunk came. A timer expires them."""
    receiver, sender = InprocTransport(), InprocTransport()
    receiver.early_ttl_s = 0.2
    for t in (receiver, sender):
        await t.start()
    try:
        for i in range(3):
            await sender.send(receiver.address, f"abandoned/{i}", np.ones(1 << 16, dtype=np.uint8), timeout=DEADLINE)
        assert receiver.early_bytes == 3 << 16
        async with asyncio.timeout(DEADLINE):
            while receiver.early_bytes:  # nothing else arrives, nothing asks for room
                await asyncio.sleep(0.02)
        assert receiver.early_dropped == 3
    finally:
        for t in (receiver, sender):
            await t.close()
