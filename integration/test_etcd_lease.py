"""Lease keep-alive through member failures, and loss detection when renewals stop.

Timing: the bounds test the properties with margin for a loaded machine, not the design limits themselves. Survival
is observed over a window longer than the TTL (a lease that was not renewed would be gone by its end); loss is due at
the lease's own deadline (no later than TTL after the last renewal sent) and is checked to come neither before that
deadline nor later than it plus a scheduling margin.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.lease import Lease

pytestmark = pytest.mark.integration

# Shorter than the design (llumlet leases: TTL 6 s renewed every 2 s): a renewal stall of TTL - renew_every = 1.5 s is
# survived, which covers a member kill's fail-over (measured well under 1 s) with margin.
TTL, RENEW_EVERY = 2, 0.5
# Slack for event-loop and process scheduling on a loaded machine (a load average of 10 has been seen).
MARGIN = 1.5


async def stop_renewals(lease: Lease, timeout: float = 10.0) -> None:
    """``lease.stop_keepalive()`` at a moment its keep-alive task sleeps between renewals: right after a renewal is
    seen to move the lease's deadline (the task moves it just before it sleeps, on this event loop). Stopping it in the
    middle of a round trip can be swallowed (see ``test_stop_keepalive_mid_renewal_stops_renewing``)."""
    start = time.monotonic() + lease.remaining()
    deadline = time.monotonic() + timeout
    while time.monotonic() + lease.remaining() < start + 0.05:
        assert lease.alive and time.monotonic() < deadline, f"no renewal seen: {lease.lost_reason}"
        await asyncio.sleep(0.005)
    lease.stop_keepalive()


async def stays_alive(lease: Lease, seconds: float) -> None:
    """Fails as soon as ``lease`` is reported lost within the next ``seconds``."""
    try:
        await asyncio.wait_for(lease.lost.wait(), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"lease lost: {lease.lost_reason}")


async def test_keepalive_survives_killing_the_leader_member(etcd3: EmbeddedEtcd) -> None:
    leader = await asyncio.to_thread(etcd3.leader_index)
    endpoints = etcd3.endpoints[leader:] + etcd3.endpoints[:leader]
    async with EtcdClient(endpoints) as client:
        lease = await Lease.grant(client, TTL, renew_every=RENEW_EVERY)
        await client.put("/lease/k", b"v", lease=lease.id)
        await asyncio.to_thread(etcd3.kill_member, leader)
        # Two TTLs without a loss: without renewals through the surviving members it would have expired by then.
        await stays_alive(lease, 2 * TTL)
        assert await client.lease_time_to_live(lease.id) > 0
        kv = await client.get("/lease/k")
        assert kv is not None and kv.lease == lease.id
        await lease.revoke()
        assert await client.get("/lease/k") is None
        assert await client.lease_time_to_live(lease.id) == -1


async def test_keepalive_survives_killing_a_follower(etcd3: EmbeddedEtcd) -> None:
    leader = await asyncio.to_thread(etcd3.leader_index)
    follower = (leader + 1) % 3
    endpoints = etcd3.endpoints[follower:] + etcd3.endpoints[:follower]
    async with EtcdClient(endpoints) as client:
        lease = await Lease.grant(client, TTL, renew_every=RENEW_EVERY)
        await asyncio.to_thread(etcd3.kill_member, follower)
        await stays_alive(lease, 2 * TTL)
        assert await client.lease_time_to_live(lease.id) > 0
        assert client.current_endpoint != etcd3.endpoints[follower]  # the renewals did move to a live member
        await lease.close()


async def test_stopped_keepalive_reports_loss_within_ttl(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    lease = await Lease.grant(etcd_client, TTL, renew_every=RENEW_EVERY)
    key = f"/{etcd_cluster_name}/leased"
    await etcd_client.put(key, b"v", lease=lease.id)
    await stop_renewals(lease)
    stopped = time.monotonic()
    # The local deadline is at most TTL after the last renewal sent (all sent before the stop): never later than
    # etcd's own expiry, so the holder stops acting on the lease before etcd can hand its keys to someone else.
    due = lease.remaining()
    assert 0 < due <= TTL
    await asyncio.wait_for(lease.lost.wait(), timeout=TTL + MARGIN)
    elapsed = time.monotonic() - stopped
    assert lease.lost_reason is not None and "no successful keep-alive" in lease.lost_reason, lease.lost_reason
    assert elapsed >= due - 0.05, f"loss reported {due - elapsed:.2f}s before the lease's deadline"
    assert lease.remaining() == 0.0
    # etcd itself expires it shortly after (its expiry check runs every 500 ms).
    deadline = time.monotonic() + TTL + 2 * MARGIN
    while await etcd_client.get(key) is not None:
        assert time.monotonic() < deadline, "leased key outlived its lease"
        await asyncio.sleep(0.1)


async def test_revoked_elsewhere_is_reported_as_lost(etcd_client: EtcdClient) -> None:
    ttl = 6
    lease = await Lease.grant(etcd_client, ttl, renew_every=2.0)  # the llumlet design: TTL 6 s, renewed every 2 s
    await etcd_client.lease_revoke(lease.id)  # e.g. an operator, or a zombie cleanup
    # Reported by the next keep-alive's answer, well before the local deadline (TTL) could have fired.
    await asyncio.wait_for(lease.lost.wait(), timeout=ttl - 1)
    assert lease.lost_reason is not None and "TTL <= 0" in lease.lost_reason


async def test_stop_keepalive_mid_renewal_stops_renewing(etcd_client: EtcdClient) -> None:
    """stop_keepalive right after a round trip with etcd (when a keep-alive answer is likely just in): every lease
    still ends. Without the bug all of them are lost within TTL + margin and gone from etcd."""
    leases = []
    for _ in range(8):
        lease = await Lease.grant(etcd_client, TTL, renew_every=0.1)
        await etcd_client.lease_time_to_live(lease.id)  # a round trip: the keep-alive's first answer arrives meanwhile
        lease.stop_keepalive()
        leases.append(lease)
    await asyncio.wait_for(asyncio.gather(*(lease.lost.wait() for lease in leases)), TTL + MARGIN)
    for lease in leases:
        assert lease.lost_reason is not None and "no successful keep-alive" in lease.lost_reason
