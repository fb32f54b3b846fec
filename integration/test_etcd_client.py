"""EtcdClient against real etcd: KV, CAS, failover when the raft leader dies, bounded failure when nothing answers."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pyllumnix.infra.etcd.client import EtcdClient, cmp_mod_revision, op_delete, op_put
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.errors import EtcdLeaseNotFoundError, EtcdUnavailableError

pytestmark = pytest.mark.integration


async def test_kv_and_compare_and_swap(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    base = f"/{etcd_cluster_name}/"
    rev = await etcd_client.put(base + "a", b"1")
    await etcd_client.put(base + "b", b"2")
    kv = await etcd_client.get(base + "a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == rev and kv.version == 1
    assert await etcd_client.get(base + "missing") is None
    listing = await etcd_client.get_prefix(base)
    assert [(k.key, k.value) for k in listing.kvs] == [(base.encode() + b"a", b"1"), (base.encode() + b"b", b"2")]
    assert listing.revision >= rev

    # CAS on mod_revision: the stale writer loses and sees the current value.
    won = await etcd_client.put_if(base + "a", b"x", mod_revision=rev)
    assert won.succeeded
    lost = await etcd_client.put_if(base + "a", b"y", mod_revision=rev)
    assert not lost.succeeded and lost.current is not None and lost.current.value == b"x"
    # create_revision 0 means "only if absent".
    assert not (await etcd_client.put_if(base + "a", b"z", create_revision=0)).succeeded
    assert (await etcd_client.put_if(base + "c", b"3", create_revision=0)).succeeded

    kv_b = await etcd_client.get(base + "b")
    assert kv_b is not None
    res = await etcd_client.txn(
        [cmp_mod_revision(kv_b.key, kv_b.mod_revision)], [op_put(kv_b.key, b"22"), op_delete(base.encode() + b"c")]
    )
    assert res.succeeded
    assert await etcd_client.get(base + "c") is None
    assert await etcd_client.delete_prefix(base) == 2


async def test_put_with_unknown_lease_is_a_clear_error(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    with pytest.raises(EtcdLeaseNotFoundError):
        await etcd_client.put(f"/{etcd_cluster_name}/k", b"v", lease=0x7EADBEEF)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_etcd_fails_within_budget_naming_endpoints() -> None:
    endpoints = [f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"]
    client = EtcdClient(endpoints, call_timeout=0.5, retry_budget=2.0)
    start = time.monotonic()
    with pytest.raises(EtcdUnavailableError) as info:
        await client.put("/x", b"y")
    elapsed = time.monotonic() - start
    await client.close()
    assert elapsed < 5.0
    assert elapsed >= 1.5  # it did use its retry budget
    for ep in endpoints:
        assert ep in str(info.value)
    assert info.value.endpoints == endpoints


async def test_black_hole_endpoint_is_bounded_too() -> None:
    """A listener that never answers (accepts TCP, no HTTP/2) must not hang the caller either."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = EtcdClient([f"127.0.0.1:{port}"], call_timeout=0.3, retry_budget=1.5)
    start = time.monotonic()
    with pytest.raises(EtcdUnavailableError, match=f"127.0.0.1:{port}"):
        await client.get("/x")
    assert time.monotonic() - start < 5.0
    await client.close()
    server.close()


async def test_killing_the_leader_member_fails_over_within_a_lease_stall(etcd3: EmbeddedEtcd) -> None:
    """After the member it talks to dies, the client's calls succeed again (on another member) well within the stall
    a lease survives (llumlet leases: TTL 6 s - renewal period 2 s = 4 s), so no holder loses its lease to a member
    kill. Without fail-over each call would spend its whole retry budget (2.5 s) and then fail."""
    leader = await asyncio.to_thread(etcd3.leader_index)
    # The client talks to the leader first: the worst case, its connection dies with it.
    endpoints = etcd3.endpoints[leader:] + etcd3.endpoints[:leader]
    async with EtcdClient(endpoints) as client:
        await client.put("/failover/k", b"before")
        assert client.current_endpoint == etcd3.endpoints[leader]
        await asyncio.to_thread(etcd3.kill_member, leader)
        start = time.monotonic()
        await client.put("/failover/k", b"after")
        kv = await client.get("/failover/k")
        lease_id, _ = await client.lease_grant(5)
        await client.put("/failover/l", b"v", lease=lease_id)
        elapsed = time.monotonic() - start
        assert kv is not None and kv.value == b"after"
        # measured well under 1 s on an idle machine; the rest is margin for a loaded one
        assert elapsed < 3.0, f"operations after the leader kill took {elapsed:.2f}s"
        assert client.current_endpoint != etcd3.endpoints[leader]
