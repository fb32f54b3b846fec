"""Leader election over real etcd: one leader, hand-over on resign, step-down and takeover when a lease is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.election import Election, LeaderInfo
from pyllumnix.control_plane.etcd.embedded import EmbeddedEtcd
from pyllumnix.control_plane.etcd.keys import KeyLayout

pytestmark = pytest.mark.integration


async def test_one_leader_then_resign_hands_over(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    a, b = Election(etcd_client, prefix, ttl=2), Election(etcd_client, prefix, ttl=2)
    observer = a.observe()
    assert await asyncio.wait_for(observer.__anext__(), 3) is None
    lead_a = await asyncio.wait_for(a.campaign(b"addr-a"), 3)
    assert lead_a.is_leader
    seen = await asyncio.wait_for(observer.__anext__(), 3)
    assert isinstance(seen, LeaderInfo) and seen.value == b"addr-a"
    b_task = asyncio.create_task(b.campaign(b"addr-b"))
    await asyncio.sleep(0.5)
    assert not b_task.done(), "a second candidate must wait while the first leads"
    leader = await a.leader()
    assert leader is not None and leader.value == b"addr-a"

    await lead_a.proclaim(b"addr-a2")
    seen = await asyncio.wait_for(observer.__anext__(), 3)
    assert seen is not None and seen.value == b"addr-a2"

    start = time.monotonic()
    await lead_a.resign()
    assert (lead_a.is_leader, lead_a.lost.is_set()) == (False, True)
    lead_b = await asyncio.wait_for(b_task, 3)
    assert time.monotonic() - start < 1.0
    assert lead_b.is_leader
    seen = await asyncio.wait_for(observer.__anext__(), 3)
    assert seen is not None and seen.value == b"addr-b"
    await lead_b.resign()
    assert await asyncio.wait_for(observer.__anext__(), 3) is None
    await observer.aclose()


async def test_leader_that_stops_renewing_steps_down_and_successor_takes_over(
    etcd_client: EtcdClient, etcd_cluster_name: str
) -> None:
    ttl = 1
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    lead_a = await Election(etcd_client, prefix, ttl=ttl).campaign(b"a")
    b_task = asyncio.create_task(Election(etcd_client, prefix, ttl=ttl).campaign(b"b"))
    await asyncio.sleep(0.3)
    stopped = time.monotonic()
    lead_a.lease.stop_keepalive()
    await asyncio.wait_for(lead_a.lost.wait(), ttl + 0.5)
    assert time.monotonic() - stopped <= ttl + 0.2
    assert not lead_a.is_leader
    lead_b = await asyncio.wait_for(b_task, 2 * ttl)
    assert time.monotonic() - stopped <= 2 * ttl
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
        await asyncio.sleep(0.3)
        crashed = time.monotonic()
        await client_a.close()
        lead_b = await asyncio.wait_for(b_task, 2 * ttl + 0.5)
        assert time.monotonic() - crashed <= 2 * ttl
        await asyncio.wait_for(lead_a.lost.wait(), ttl + 0.5)
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
        election = Election(client, KeyLayout("c").election_prefix(), ttl=ttl)
        lead = await election.campaign(b"a")
        await asyncio.to_thread(etcd3.kill_member, leader)
        await asyncio.sleep(2 * ttl + 0.5)
        assert lead.is_leader, lead.lost_reason
        current = await election.leader()
        assert current is not None and current.key == lead.key
        await lead.resign()


async def test_cancelled_campaign_leaves_no_key(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    lead = await Election(etcd_client, prefix).campaign(b"a")
    waiting = asyncio.create_task(Election(etcd_client, prefix).campaign(b"b"))
    await asyncio.sleep(0.3)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    listing = await etcd_client.get_prefix(prefix)
    assert [kv.value for kv in listing.kvs] == [b"a"]
    await lead.resign()
