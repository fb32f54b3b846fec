"""Cluster config in one etcd key: typed get/put, compare-and-swap on revision, watch."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.config_store import ConfigStore
from pyllumnix.infra.etcd.errors import ConfigConflictError, UndecodableValueError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import config_pb2

pytestmark = pytest.mark.integration


async def test_cas_and_watch(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    store = ConfigStore(etcd_client, KeyLayout(etcd_cluster_name).config_key, config_pb2.ClusterConfig)
    assert await store.get() == (None, 0)
    changes = store.watch()
    assert await asyncio.wait_for(changes.__anext__(), 3) == (None, 0)

    cfg = config_pb2.ClusterConfig()
    rev1 = await store.put(cfg, expected_revision=0)
    with pytest.raises(ConfigConflictError) as info:
        await store.put(cfg, expected_revision=0)  # created meanwhile
    assert info.value.current_revision == rev1
    got, rev = await store.get()
    assert got == cfg and rev == rev1
    rev2 = await store.put(cfg, expected_revision=rev1)
    assert rev2 > rev1
    with pytest.raises(ConfigConflictError):
        await store.put(cfg, expected_revision=rev1)  # stale

    seen = [await asyncio.wait_for(changes.__anext__(), 3) for _ in range(2)]
    assert [r for _, r in seen] == [rev1, rev2]
    assert all(m == cfg for m, _ in seen)
    await changes.aclose()


async def test_undecodable_value_is_skipped_by_watch_and_named_by_get(
    etcd_client: EtcdClient, etcd_cluster_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage at the key never ends the watch: it is logged once and skipped, and the next valid write is seen."""
    key = KeyLayout(etcd_cluster_name).config_key
    store = ConfigStore(etcd_client, key, config_pb2.ClusterConfig)
    bad_rev = await etcd_client.put(key, b"not a protobuf")
    with pytest.raises(UndecodableValueError, match=f"revision {bad_rev}"):
        await store.get()
    changes = store.watch()  # its initial snapshot is the garbage: skipped, nothing yielded
    next_item = asyncio.ensure_future(changes.__anext__())
    # The watch has read its initial snapshot once it logged the garbage there (then it watches from that revision).
    deadline = time.monotonic() + 5
    while not any(f"revision {bad_rev}" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the watch never read its initial snapshot"
        await asyncio.sleep(0.02)
    assert not next_item.done()
    await etcd_client.put(key, b"\xff\xff\xff")  # more garbage while watching: skipped as well
    good = config_pb2.ClusterConfig(load_report_interval_ms=70)
    good_rev = await store.put(good)
    # The first thing the watch yields is the valid write: neither garbage revision ended it or came out of it.
    assert await asyncio.wait_for(next_item, 5) == (good, good_rev)
    logged = [r for r in caplog.records if "is not a valid llumnix.v1.ClusterConfig" in r.getMessage()]
    assert len(logged) == 2, [r.getMessage() for r in logged]  # once per bad revision
    await changes.aclose()
