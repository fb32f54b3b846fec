"""Leader election over real etcd: one leader, hand-over on resign, step-down and takeover when a lease is lost.

Waits are on conditions (a candidate's key in etcd, a leadership event) with generous deadlines; time bounds test a
property with margin (a resign hands over well before the TTL would; a successor never leads before the old leader has
stepped down), not the design limits themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from integration.test_etcd_lease import stays_alive, stop_renewals
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.election import Election, LeaderInfo
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout

pytestmark = pytest.mark.integration

MARGIN = 1.5  # slack for scheduling on a loaded machine


async def candidates(client: EtcdClient, prefix: str, n: int, timeout: float = 5.0) -> None:
    """Waits until ``n`` candidates' keys are in etcd (a campaign writes its key, then waits its turn)."""
    deadline = time.monotonic() + timeout
    while len((await client.get_prefix(prefix)).kvs) != n:
        assert time.monotonic() < deadline, f"never saw {n} candidates under {prefix}"
        await asyncio.sleep(0.02)


async def test_one_leader_then_resign_hands_over(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    ttl = 5  # a hand-over by expiry would take this long; a resign hands over at once
    a, b = Election(etcd_client, prefix, ttl=ttl), Election(etcd_client, prefix, ttl=ttl)
    observer = a.observe()
    assert await asyncio.wait_for(observer.__anext__(), 3) is None
    lead_a = await asyncio.wait_for(a.campaign(b"addr-a"), 3)
    assert lead_a.is_leader
    seen = await asyncio.wait_for(observer.__anext__(), 3)
    assert isinstance(seen, LeaderInfo) and seen.value == b"addr-a"
    b_task = asyncio.create_task(b.campaign(b"addr-b"))
    await candidates(etcd_client, prefix, 2)
    await asyncio.sleep(0.2)  # b has seen a's key by now on an idle machine; it must keep waiting regardless
    assert not b_task.done(), "a second candidate must wait while the first leads"
    leader = await a.leader()
    assert leader is not None and leader.value == b"addr-a"

    await lead_a.proclaim(b"addr-a2")
    seen = await asyncio.wait_for(observer.__anext__(), 3)
    assert seen is not None and seen.value == b"addr-a2"

    start = time.monotonic()
    await lead_a.resign()
    assert (lead_a.is_leader, lead_a.lost.is_set()) == (False, True)
    lead_b = await asyncio.wait_for(b_task, ttl)
    assert time.monotonic() - start < ttl - 1, "hand-over waited for the lease to expire instead of the resign"
    assert lead_b.is_leader
    seen = await asyncio.wait_for(observer.__anext__(), 3)
    assert seen is not None and seen.value == b"addr-b"
    await lead_b.resign()
    assert await asyncio.wait_for(observer.__anext__(), 3) is None
    await observer.aclose()


async def test_leader_that_stops_renewing_steps_down_and_successor_takes_over(
    etcd_client: EtcdClient, etcd_cluster_name: str
) -> None:
    ttl = 2
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    lead_a = await Election(etcd_client, prefix, ttl=ttl).campaign(b"a")
    b_task = asyncio.create_task(Election(etcd_client, prefix, ttl=ttl).campaign(b"b"))
    a_when_b_won: list[bool] = []
    b_task.add_done_callback(lambda _: a_when_b_won.append(lead_a.is_leader))
    await candidates(etcd_client, prefix, 2)
    await stop_renewals(lead_a.lease)
    stopped = time.monotonic()
    due = lead_a.lease.remaining()
    assert due <= ttl
    await asyncio.wait_for(lead_a.lost.wait(), ttl + MARGIN)
    assert time.monotonic() - stopped >= due - 0.05, "stepped down before its lease's deadline"
    assert not lead_a.is_leader
    # etcd expires the lease (its expiry check runs every 500 ms): b leads then, never while a still thinks it does
    lead_b = await asyncio.wait_for(b_task, ttl + 2 * MARGIN)
    assert a_when_b_won == [False]
    assert lead_b.is_leader
    await lead_b.resign()


async def test_crashed_leader_is_replaced_within_two_ttls(etcd3: EmbeddedEtcd) -> None:
    """Leader A's process loses etcd entirely (its client closes): etcd expires A's lease, B takes over."""
    ttl = 2
    prefix = KeyLayout("c").election_prefix()
    client_a, client_b = EtcdClient(etcd3.endpoints), EtcdClient(etcd3.endpoints[::-1])
    try:
        lead_a = await Election(client_a, prefix, ttl=ttl).campaign(b"a")
        b_task = asyncio.create_task(Election(client_b, prefix, ttl=ttl).campaign(b"b"))
        await candidates(client_b, prefix, 2)
        await client_a.close()
        # etcd expires A's lease within TTL (+ its 500 ms expiry check) of A's last renewal; margin for load
        lead_b = await asyncio.wait_for(b_task, ttl + 2 * MARGIN)
        # A's own deadline passed no later than etcd's expiry: A has stepped down (or does so at once)
        await asyncio.wait_for(lead_a.lost.wait(), MARGIN)
        assert lead_a.lost.is_set() and lead_b.is_leader
        await lead_b.resign()
    finally:
        await client_a.close()
        await client_b.close()


async def test_leader_keeps_leading_across_etcd_leader_kill(etcd3: EmbeddedEtcd) -> None:
    ttl = 2
    leader = await asyncio.to_thread(etcd3.leader_index)
    endpoints = etcd3.endpoints[leader:] + etcd3.endpoints[:leader]
    async with EtcdClient(endpoints) as client:
        # renewed every 0.5 s: a stall of 1.5 s (a member kill's fail-over, well under 1 s) is survived with margin
        election = Election(client, KeyLayout("c").election_prefix(), ttl=ttl, renew_every=0.5)
        lead = await election.campaign(b"a")
        await asyncio.to_thread(etcd3.kill_member, leader)
        # Two TTLs without losing the lead: without renewals through the surviving members it would be gone by then.
        await stays_alive(lead.lease, 2 * ttl)
        assert lead.is_leader, lead.lost_reason
        current = await election.leader()
        assert current is not None and current.key == lead.key
        await lead.resign()


async def test_cancelled_campaign_leaves_no_key(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    lead = await Election(etcd_client, prefix).campaign(b"a")
    waiting = asyncio.create_task(Election(etcd_client, prefix).campaign(b"b"))
    await candidates(etcd_client, prefix, 2)  # b's key is written: its cancellation must remove it
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    listing = await etcd_client.get_prefix(prefix)
    assert [kv.value for kv in listing.kvs] == [b"a"]
    await lead.resign()
