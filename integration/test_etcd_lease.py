"""Lease keep-alive through member failures, and loss detection when renewals stop."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.embedded import EmbeddedEtcd
from pyllumnix.control_plane.etcd.lease import Lease

pytestmark = pytest.mark.integration


async def test_keepalive_survives_killing_the_leader_member(etcd3: EmbeddedEtcd) -> None:
    ttl = 2
    leader = await asyncio.to_thread(etcd3.leader_index)
    endpoints = etcd3.endpoints[leader:] + etcd3.endpoints[:leader]
    async with EtcdClient(endpoints) as client:
        lease = await Lease.grant(client, ttl)
        await client.put("/lease/k", b"v", lease=lease.id)
        await asyncio.to_thread(etcd3.kill_member, leader)
        await asyncio.sleep(2 * ttl + 0.5)
        assert lease.alive, lease.lost_reason
        assert await client.lease_time_to_live(lease.id) > 0
        kv = await client.get("/lease/k")
        assert kv is not None and kv.lease == lease.id
        await lease.revoke()
        assert await client.get("/lease/k") is None
        assert await client.lease_time_to_live(lease.id) == -1


async def test_keepalive_survives_killing_a_follower(etcd3: EmbeddedEtcd) -> None:
    ttl = 1
    leader = await asyncio.to_thread(etcd3.leader_index)
    follower = (leader + 1) % 3
    endpoints = etcd3.endpoints[follower:] + etcd3.endpoints[:follower]
    async with EtcdClient(endpoints) as client:
        lease = await Lease.grant(client, ttl)
        await asyncio.to_thread(etcd3.kill_member, follower)
        await asyncio.sleep(2 * ttl + 0.5)
        assert lease.alive, lease.lost_reason
        assert await client.lease_time_to_live(lease.id) >= 0
        await lease.close()


async def test_stopped_keepalive_reports_loss_within_ttl(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    ttl = 1
    lease = await Lease.grant(etcd_client, ttl)
    key = f"/{etcd_cluster_name}/leased"
    await etcd_client.put(key, b"v", lease=lease.id)
    await asyncio.sleep(0.5)
    stopped = time.monotonic()
    lease.stop_keepalive()
    await asyncio.wait_for(lease.lost.wait(), timeout=ttl + 0.5)
    assert time.monotonic() - stopped <= ttl + 0.2
    assert lease.remaining() == 0.0
    # etcd itself expires it shortly after (its expiry check runs every 500 ms).
    deadline = time.monotonic() + ttl + 2
    while await etcd_client.get(key) is not None:
        assert time.monotonic() < deadline, "leased key outlived its lease"
        await asyncio.sleep(0.1)


async def test_revoked_elsewhere_is_reported_as_lost(etcd_client: EtcdClient) -> None:
    lease = await Lease.grant(etcd_client, 5)
    await etcd_client.lease_revoke(lease.id)  # e.g. an operator, or a zombie cleanup
    await asyncio.wait_for(lease.lost.wait(), timeout=3)
    assert lease.lost_reason is not None and "TTL <= 0" in lease.lost_reason
