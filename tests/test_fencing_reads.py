"""``TermFence.admit_proven`` reads etcd one proof at a time, and orders that arrive during a read share the next one
(review9, fencing): before, every order of an unproven term made its own etcd read, so a new leader's first burst of
orders to one llumlet, or a follower certificate sending fresh made-up terms, cost one read per order."""

from __future__ import annotations

import asyncio

import pytest

from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.infra.security.fencing import TermFence, TermUnverifiableError, UnprovenTermError


class Election:
    """The leader etcd names now; each read counts, and takes ``delay`` seconds (or fails, while ``down``)."""

    def __init__(self, leader: tuple[int, str] | None, delay: float = 0.05) -> None:
        self.leader = leader
        self.delay = delay
        self.down = False
        self.reads = 0

    async def leader_of(self) -> tuple[int, str] | None:
        self.reads += 1
        named, down = self.leader, self.down  # what etcd answers is its state when the read arrives
        await asyncio.sleep(self.delay)
        if down:
            raise EtcdUnavailableError("range", ["127.0.0.1:1"], self.delay, "refused (test)")
        return named


async def test_a_new_leaders_burst_of_orders_costs_one_read() -> None:
    election = Election((7, "s-b"))
    fence = TermFence(highest_seen=3, leader_of=election.leader_of)
    admitted = await asyncio.gather(*(fence.admit_proven(7, "s-b") for _ in range(20)))
    assert admitted == [7] * 20
    assert election.reads == 1 and fence.reads == 1, f"{election.reads} etcd reads for one new term (was 20)"


async def test_made_up_terms_share_reads_and_are_all_refused() -> None:
    election = Election((7, "s-b"))
    fence = TermFence(highest_seen=7, leader_of=election.leader_of)
    results = await asyncio.gather(*(fence.admit_proven(2**62 + i, "s-a") for i in range(20)), return_exceptions=True)
    assert all(isinstance(r, UnprovenTermError) for r in results), results
    assert election.reads <= 2, f"{election.reads} etcd reads for 20 concurrent orders (was 20)"
    assert fence.highest_seen == 7
    assert await fence.admit_proven(7, "s-b") == 7, "the real leader's term is still proven and admitted"


async def test_an_order_arriving_during_a_read_gets_a_read_that_started_after_it() -> None:
    """Sharing the read in flight would be wrong: it may have started before the new leader's key was written."""
    election = Election((4, "s-a"), delay=0.2)
    fence = TermFence(highest_seen=1, leader_of=election.leader_of)
    first = asyncio.ensure_future(fence.admit_proven(4, "s-a"))
    await asyncio.sleep(0.05)  # the first read is in flight and will answer term 4
    election.leader = (5, "s-b")  # a failover; s-b then sends its first order
    assert await fence.admit_proven(5, "s-b") == 5
    assert await first == 4
    assert election.reads == 2


async def test_while_etcd_cannot_answer_the_waiting_orders_share_the_failure() -> None:
    election = Election((7, "s-b"))
    election.down = True
    fence = TermFence(highest_seen=3, leader_of=election.leader_of)
    results = await asyncio.gather(*(fence.admit_proven(7, "s-b") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, TermUnverifiableError) for r in results), results
    assert election.reads <= 2
    election.down = False
    assert await fence.admit_proven(7, "s-b") == 7, "once etcd answers, the term is proven"


async def test_a_cancelled_read_does_not_leave_waiters_without_an_answer() -> None:
    election = Election((7, "s-b"), delay=0.2)
    fence = TermFence(highest_seen=3, leader_of=election.leader_of)
    first = asyncio.ensure_future(fence.admit_proven(7, "s-b"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(fence.admit_proven(7, "s-b"))
    await asyncio.sleep(0)
    first.cancel()  # the caller of the order that made the read went away
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == 7
