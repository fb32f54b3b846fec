"""#13 attacks on the TCP data plane (real sockets on 127.0.0.1): huge frame headers and floods of frames for keys
nobody expects.

A frame header claiming more than ``MAX_FRAME_BYTES`` drops the connection at once, before anything is allocated;
chunks for unexpected keys are kept only within the early-chunk bounds (bytes and age) and then dropped; meanwhile a
legitimate expected transfer still lands exactly. Before #13 the receiver allocated whatever the header claimed and
waited for it, and kept every unexpected chunk for ever.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

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
