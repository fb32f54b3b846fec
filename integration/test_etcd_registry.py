"""Instance registry over real etcd: add/update/remove events, lease-bound removal, resync after compaction."""

from __future__ import annotations

import asyncio

import pytest

from integration.test_etcd_lease import stop_renewals
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.registry import InstanceRegistry, RegistryEvent, RegistryEventType, RegistryWatch
from pyllumnix.protos.llumnix.v1 import common_pb2

pytestmark = pytest.mark.integration

E = RegistryEventType


async def _next(w: RegistryWatch, timeout: float = 5.0) -> RegistryEvent:
    return await asyncio.wait_for(w.__anext__(), timeout)


async def test_register_watch_update_remove(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    reg = InstanceRegistry(etcd_client, KeyLayout(etcd_cluster_name))
    lease = await Lease.grant(etcd_client, 5)
    await reg.register("pre", b"p", lease)
    async with reg.watch() as w:
        first = await _next(w)
        assert first.type is E.RESYNC and dict(first.snapshot) == {"pre": b"p"}
        info = common_pb2.InstanceInfo()
        await reg.register("i1", info.SerializeToString() + b"1", lease)
        await reg.register("i1", b"v2", lease)
        await reg.deregister("i1")
        got = [await _next(w) for _ in range(3)]
        assert [(e.type, e.instance_id) for e in got] == [(E.ADD, "i1"), (E.UPDATE, "i1"), (E.REMOVE, "i1")]
        assert got[1].value == b"v2"
        assert got[0].revision < got[1].revision < got[2].revision
    snap = await reg.list()
    assert snap.entries == {"pre": b"p"}
    assert await reg.get("pre") == b"p" and await reg.get("i1") is None
    await lease.revoke()


async def test_revoked_and_expired_instances_are_removed(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    reg = InstanceRegistry(etcd_client, KeyLayout(etcd_cluster_name))
    revoked = await Lease.grant(etcd_client, 5)
    expiring = await Lease.grant(etcd_client, 1)
    async with reg.watch() as w:
        assert (await _next(w)).type is E.RESYNC
        await reg.register("a", b"a", revoked)
        await reg.register("b", b"b", expiring)
        assert {(await _next(w)).instance_id for _ in range(2)} == {"a", "b"}
        await revoked.revoke()
        ev = await _next(w)
        assert (ev.type, ev.instance_id) == (E.REMOVE, "a")
        await stop_renewals(expiring)  # as if the instance died: etcd expires the lease within TTL + 0.5 s
        ev = await _next(w, timeout=1 + 0.5 + 3)  # margin for a loaded machine
        assert (ev.type, ev.instance_id) == (E.REMOVE, "b")
    assert (await reg.list()).entries == {}


async def test_compaction_past_the_watcher_gives_a_resync_snapshot(
    etcd_client: EtcdClient, etcd_cluster_name: str
) -> None:
    reg = InstanceRegistry(etcd_client, KeyLayout(etcd_cluster_name))
    lease = await Lease.grant(etcd_client, 5)
    behind = await reg.register("old", b"o", lease)
    await reg.register("x", b"1", lease)
    await reg.deregister("old")
    last = await reg.register("x", b"2", lease)
    await etcd_client.compact(last)
    # A watcher that last saw `behind` resumes there: those revisions are gone, so it must resync.
    async with reg.watch(start_revision=behind + 1) as w:
        ev = await _next(w)
        assert ev.type is E.RESYNC
        assert dict(ev.snapshot) == {"x": b"2"}
        assert ev.revision >= last
        assert w.watch.resyncs == 1
        await reg.register("y", b"3", lease)
        ev = await _next(w)
        assert (ev.type, ev.instance_id, ev.value) == (E.ADD, "y", b"3")
    await lease.revoke()


async def test_watch_resumes_without_loss_after_member_kill(etcd3: EmbeddedEtcd) -> None:
    leader = await asyncio.to_thread(etcd3.leader_index)
    endpoints = etcd3.endpoints[leader:] + etcd3.endpoints[:leader]
    async with EtcdClient(endpoints) as watcher_client, EtcdClient(etcd3.endpoints[::-1]) as writer:
        layout = KeyLayout("c")
        reg_w, reg = InstanceRegistry(watcher_client, layout), InstanceRegistry(writer, layout)
        async with reg_w.watch() as w:
            assert (await _next(w)).type is E.RESYNC
            await reg.register("a", b"1", 0)
            assert (await _next(w)).instance_id == "a"
            await asyncio.to_thread(etcd3.kill_member, leader)
            for i in range(5):
                await reg.register(f"n{i}", b"x", 0)
            got = [await _next(w) for _ in range(5)]
            assert [e.instance_id for e in got] == [f"n{i}" for i in range(5)]
            assert all(e.type is E.ADD for e in got)
            assert w.watch.reconnects >= 1 and w.watch.resyncs == 1
