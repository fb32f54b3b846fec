"""Send/receive, timeouts and failure paths of each transport (UCX only when ucxx imports)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import numpy as np
import pytest

from pyllumnix.data_plane.transport import (
    Transport,
    TransportError,
    TransportTimeout,
    make_transport,
    ucx_available,
)
from pyllumnix.data_plane.transport import tcp as tcp_module
from pyllumnix.data_plane.transport.tcp import TcpTransport

KINDS = [
    "inproc",
    "tcp",
    pytest.param("ucx", marks=pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")),
]


T = TypeVar("T", bound=Transport)


@contextlib.asynccontextmanager
async def started(a: T, b: T) -> AsyncIterator[tuple[T, T]]:
    """Two endpoints started, closed on the way out (also on failure)."""
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


@pytest.fixture(params=KINDS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Transport, Transport]]:
    async with started(make_transport(request.param), make_transport(request.param)) as endpoints:
        yield endpoints


def payload(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def test_round_trip_into_given_buffer(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    data = payload(3 << 20)
    out = np.zeros((3, 1 << 20), dtype=np.uint8)
    b.expect("m1/0/0", data.nbytes, out=out)
    await a.send(b.address, "m1/0/0", data, timeout=10)
    got = await b.receive("m1/0/0", timeout=10)
    assert np.array_equal(got, data)
    assert np.shares_memory(got, out)
    assert np.array_equal(out.reshape(-1), data)


async def test_send_before_expect_and_many_keys(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    chunks = {f"m2/0/{i}": payload(1000 + i, seed=i) for i in range(5)}
    sends = [asyncio.create_task(a.send(b.address, k, v, timeout=10)) for k, v in chunks.items()]
    await asyncio.sleep(0.05)
    for k, v in reversed(chunks.items()):
        b.expect(k, v.nbytes)
    for k, v in chunks.items():
        assert np.array_equal(await b.receive(k, timeout=10), v)
    await asyncio.gather(*sends)


async def test_memoryview_and_empty_chunk(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    b.expect("mv", 4)
    b.expect("empty", 0)
    await a.send(b.address, "mv", memoryview(b"\x01\x02\x03\x04"), timeout=10)
    await a.send(b.address, "empty", b"", timeout=10)
    assert bytes(await b.receive("mv", timeout=10)) == b"\x01\x02\x03\x04"
    assert (await b.receive("empty", timeout=10)).nbytes == 0


async def test_receive_without_sender_times_out(pair: tuple[Transport, Transport]) -> None:
    _, b = pair
    b.expect("nobody", 16)
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout):
        await b.receive("nobody", timeout=0.3)
    assert time.monotonic() - t0 < 2.0


async def test_receive_unexpected_key_is_an_error(pair: tuple[Transport, Transport]) -> None:
    _, b = pair
    with pytest.raises(TransportError):
        await b.receive("never-expected", timeout=0.1)


async def test_duplicate_expect_is_an_error(pair: tuple[Transport, Transport]) -> None:
    _, b = pair
    b.expect("dup", 8)
    with pytest.raises(TransportError):
        b.expect("dup", 8)
    b.cancel("dup")
    b.expect("dup", 8)


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
async def test_send_to_closed_peer_fails_fast(kind: str) -> None:
    a, b = make_transport(kind), make_transport(kind)
    await a.start()
    peer = await b.start()
    b.expect("warm", 4)
    await a.send(peer, "warm", b"abcd", timeout=5)
    await b.receive("warm", timeout=5)
    await b.close()
    t0 = time.monotonic()
    with pytest.raises(TransportError):
        for i in range(3):  # a pooled connection may absorb one small write before the reset shows
            await a.send(peer, f"after-close-{i}", payload(1 << 20), timeout=2)
            await asyncio.sleep(0.05)
    assert time.monotonic() - t0 < 6.0
    await a.close()


async def test_tcp_size_mismatch_is_reported() -> None:
    a, b = make_transport("tcp"), make_transport("tcp")
    await a.start()
    await b.start()
    b.expect("k", 10)
    await a.send(b.address, "k", b"12345", timeout=5)
    with pytest.raises(TransportError, match="expected 10"):
        await b.receive("k", timeout=5)
    await a.close()
    await b.close()


async def test_close_fails_pending_receives() -> None:
    b = make_transport("tcp")
    await b.start()
    b.expect("pending", 8)
    waiter = asyncio.create_task(b.receive("pending", timeout=10))
    await asyncio.sleep(0.01)
    await b.close()
    with pytest.raises(TransportError):
        await waiter


async def test_inproc_cost_model_delays_and_times_out() -> None:
    a = make_transport("inproc", cost_fn=lambda n: n / 1e6)
    b = make_transport("inproc")
    await a.start()
    await b.start()
    b.expect("k", 20_000)
    t0 = time.monotonic()
    await a.send(b.address, "k", bytes(20_000), timeout=5)
    assert time.monotonic() - t0 >= 0.015
    with pytest.raises(TransportTimeout):
        await a.send(b.address, "k2", bytes(1_000_000), timeout=0.05)
    await a.close()
    await b.close()


def test_make_transport_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        make_transport("carrier-pigeon")


@pytest.fixture
async def tcp_pair() -> AsyncIterator[tuple[TcpTransport, TcpTransport]]:
    async with started(TcpTransport(), TcpTransport()) as endpoints:
        yield endpoints


async def wait_writing(a: TcpTransport, peer: str) -> None:
    """Until a send to ``peer`` holds the pooled connection (it is writing its frame)."""
    async with asyncio.timeout(5):
        while not (peer in a._conns and a._conns[peer].lock.locked()):
            await asyncio.sleep(0)


FRAME = 48 << 20  # large enough that a send is still writing when the test acts


async def test_a_send_cancelled_mid_frame_does_not_corrupt_the_next_transfer(
    tcp_pair: tuple[TcpTransport, TcpTransport],
) -> None:
    """REVIEW19-6: the partial frame stayed on the pooled connection; the peer read the next frame's bytes as its
    payload (delivered as a success, corrupt) and the next transfer was lost."""
    a, b = tcp_pair
    b.expect("m1", FRAME)
    b.expect("m2", FRAME)
    first = asyncio.create_task(a.send(b.address, "m1", np.full(FRAME, 0xAA, np.uint8), timeout=30))
    await wait_writing(a, b.address)
    await asyncio.sleep(0.002)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await a.send(b.address, "m2", np.full(FRAME, 0xBB, np.uint8), timeout=30)
    got = await b.receive("m2", timeout=10)
    assert bool(np.all(np.asarray(got) == 0xBB)), "the second transfer arrived corrupt"
    with pytest.raises(TransportError):  # the cancelled one is never delivered (its connection was dropped)
        await b.receive("m1", timeout=1)


async def test_a_send_that_times_out_waiting_its_turn_leaves_the_writing_one_alone(
    tcp_pair: tuple[TcpTransport, TcpTransport],
) -> None:
    """REVIEW19-7: it closed the connection under the sender holding it, which then failed after its whole timeout."""
    a, b = tcp_pair
    b.expect("A", FRAME)
    b.expect("B", 1024)
    writing = asyncio.create_task(a.send(b.address, "A", np.full(FRAME, 1, np.uint8), timeout=20))
    await wait_writing(a, b.address)
    with pytest.raises(TransportTimeout):
        await a.send(b.address, "B", np.zeros(1024, np.uint8), timeout=0.001)
    await writing
    assert bool(np.all(np.asarray(await b.receive("A", timeout=10)) == 1))


async def test_a_failed_accept_does_not_end_the_accept_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """REVIEW19-8: one accept failing (EMFILE) ended the loop: the address stayed published, sends "succeeded"
    into the kernel backlog and receives timed out for ever."""
    loop_type = type(asyncio.get_running_loop())
    real = loop_type.sock_accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    async def flaky(self: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[socket.socket, Any]:
        if failures:
            raise failures.pop()
        return await real(self, sock)

    a, b = TcpTransport(), TcpTransport()
    await a.start()
    await asyncio.sleep(0.01)  # a's accept loop now waits in the real accept: the failure is b's
    monkeypatch.setattr(loop_type, "sock_accept", flaky)
    await b.start()
    try:
        b.expect("m", 1000)
        await a.send(b.address, "m", np.ones(1000, np.uint8), timeout=5)
        assert bytes(await b.receive("m", timeout=5)) == b"\x01" * 1000
        assert not failures, "the accept never failed: the test tested nothing"
    finally:
        await a.close()
        await b.close()


async def test_a_peer_stalled_inside_a_frame_is_dropped_and_its_early_claim_returned(
    monkeypatch: pytest.MonkeyPatch, tcp_pair: tuple[TcpTransport, TcpTransport]
) -> None:
    """REVIEW19-3: a frame's early-data claim was returned only when its connection closed; a peer that sent a header
    and stalled (no FIN) held it for ever, and healthy migrations' early chunks were refused meanwhile."""
    monkeypatch.setattr(tcp_module, "FRAME_STALL_S", 0.3, raising=False)  # (raising: the old code had none)
    _, b = tcp_pair
    host, port = tcp_module.parse_tcp_address(b.address)
    _, writer = await asyncio.open_connection(host, port)
    try:
        key = b"dead/0/5"  # an early chunk of a stage nobody expects yet
        writer.write(tcp_module._HEADER.pack(tcp_module._MAGIC, len(key), 4 << 20) + key + b"x" * 100)
        await writer.drain()
        async with asyncio.timeout(5):
            while b.early_bytes == 0:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(5):  # old: claimed for as long as the connection stayed open
            while b.early_bytes:
                await asyncio.sleep(0.05)
    finally:
        writer.close()
