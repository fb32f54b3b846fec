"""The UCX progress driver: a worker that moved data, or has a receive posted, costs no CPU while idle; requests
complete, fail and close cleanly. Real UCX (ucxx), two endpoints in this process."""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from pyllumnix.data_plane.transport import TransportClosed, TransportError, TransportTimeout, ucx_available
from pyllumnix.data_plane.transport.ucx import UcxTransport

pytestmark = pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[UcxTransport, UcxTransport]]:
    a, b = UcxTransport(), UcxTransport()
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def idle_cpu_seconds(window: float) -> float:
    """CPU time this thread (the event loop's) consumed while the loop had nothing to do for ``window`` seconds:
    robust to other processes using the CPU, unlike wall-clock or utilisation figures."""
    t0 = time.thread_time()
    await asyncio.sleep(window)
    return time.thread_time() - t0


async def test_idle_after_transfers_and_with_posted_receives(pair: tuple[UcxTransport, UcxTransport]) -> None:
    """ucxx's own asyncio layer spun here: its reader callback never re-armed the worker (the epoll fd stayed
    readable) and every outstanding request was awaited by an ``asyncio.sleep(0)`` loop."""
    a, b = pair
    data = np.arange(4 << 20, dtype=np.uint8)
    for i in range(6):  # eager and rendezvous sizes, both directions
        for src, dst in ((a, b), (b, a)):
            n = 1000 if i % 2 else data.nbytes
            dst.expect(f"k{i}", n)
            await src.send(dst.address, f"k{i}", data[:n], timeout=10)
            assert np.array_equal(await dst.receive(f"k{i}", timeout=10), data[:n])
    b.expect("posted-never-sent", 1 << 20)  # a window slot the sender never fills
    b.expect("given-up", 64)
    with pytest.raises(TransportTimeout):
        await b.receive("given-up", timeout=0.05)  # stays posted in UCX after the caller gave up
    cpu = await idle_cpu_seconds(1.5)  # a receive is awaited: only the rescue timer runs (10 passes a second)
    assert cpu < 0.1, f"the idle event loop used {cpu:.2f} s of CPU in 1.5 s"
    b.cancel("posted-never-sent")  # nothing awaited any more: no timer either
    await asyncio.sleep(0.3)
    passes = (a.progress.passes, b.progress.passes)
    cpu = await idle_cpu_seconds(1.5)
    assert cpu < 0.1, f"the idle event loop used {cpu:.2f} s of CPU in 1.5 s"
    assert (a.progress.passes, b.progress.passes) == passes, "progress ran while nothing happened"
    for t in (a, b):
        fd = t.progress._fd
        assert not select.select([fd], [], [], 0)[0], "the worker's epoll fd stays readable (not re-armed)"
    # and it still wakes up for the next message
    b.expect("after-idle", 5)
    await a.send(b.address, "after-idle", b"hello", timeout=5)
    assert bytes(await b.receive("after-idle", timeout=5)) == b"hello"


async def test_wakes_for_a_message_sent_while_idle(pair: tuple[UcxTransport, UcxTransport]) -> None:
    """No polling when idle must not mean missed messages: a receive posted long before the send completes."""
    a, b = pair
    b.expect("late", 2 << 20)
    await asyncio.sleep(0.5)
    data = np.full(2 << 20, 7, dtype=np.uint8)
    t0 = time.monotonic()
    await a.send(b.address, "late", data, timeout=5)
    assert np.array_equal(await b.receive("late", timeout=5), data)
    assert time.monotonic() - t0 < 2.0


async def test_oversized_message_fails_the_receive(pair: tuple[UcxTransport, UcxTransport]) -> None:
    a, b = pair
    b.expect("small", 8)
    await a.send(b.address, "small", bytes(64), timeout=5)
    with pytest.raises(TransportError, match="small"):
        await b.receive("small", timeout=5)


async def test_close_fails_pending_and_is_idempotent(pair: tuple[UcxTransport, UcxTransport]) -> None:
    _, b = pair
    b.expect("pending", 8)
    waiter = asyncio.create_task(b.receive("pending", timeout=10))
    await asyncio.sleep(0.05)
    await b.close()
    with pytest.raises(TransportClosed):
        await waiter
    await b.close()
    with pytest.raises(TransportClosed):
        b.expect("after-close", 8)
    with pytest.raises(TransportClosed):
        _ = b.progress
