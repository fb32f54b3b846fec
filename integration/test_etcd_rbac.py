"""etcd auth per component (attack9 B2): a real TLS etcd with ``ClusterSecurity.enable_etcd_rbac`` as ``llumnix
serve`` runs it. Each certificate reaches only its own part of the keyspace: a llumlet's certificate cannot mint an API
key, rewrite another instance's registry record, the config or the election; every component can still do what it
does in a cluster (register under a lease, campaign, keep the config, check API keys). A certificate issued after
auth was switched on (a restarted or autoscaled llumlet's) gets its user at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest

from pyllumnix.infra.etcd.client import EtcdClient, EtcdTls
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd, EtcdServerTls
from pyllumnix.infra.etcd.errors import EtcdRequestError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.rbac import user_of
from pyllumnix.infra.security.apikeys import ApiKeyStore, ApiKeyStoreError
from pyllumnix.infra.security.bootstrap import RBAC_FILE, ClusterSecurity, bootstrap_local

pytestmark = pytest.mark.integration

LAYOUT = KeyLayout("rbac")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    components = {"etcd": ["etcd"], "scheduler": ["s0"], "frontend": ["f0"], "admin": ["admin"], "client": ["c"]}
    return bootstrap_local(tmp_path_factory.mktemp("pki"), "rbac", components=components, llumlets=["i0", "i1"])


@pytest.fixture(scope="module")
def etcd(pki: ClusterSecurity) -> Iterator[EmbeddedEtcd]:
    member, admin = pki.paths("etcd", "etcd"), pki.paths("admin", "admin")
    with EmbeddedEtcd(1, tls=EtcdServerTls(member.ca, member.cert, member.key, admin.cert, admin.key)) as server:
        pki.enable_etcd_rbac([f"https://{e}" for e in server.endpoints], LAYOUT)
        yield server
        pki.rbac_path.unlink(missing_ok=True)


def client(etcd: EmbeddedEtcd, pki: ClusterSecurity, role: str, id: str) -> EtcdClient:
    p = pki.ensure(role, id)
    return EtcdClient(etcd.endpoints, tls=EtcdTls.from_files(p.ca, p.cert, p.key), retry_budget=2.0)


@pytest.fixture
async def llumlet(etcd: EmbeddedEtcd, pki: ClusterSecurity) -> AsyncIterator[EtcdClient]:
    async with client(etcd, pki, "llumlet", "i0") as c:
        yield c


async def denied(call: Awaitable[Any]) -> None:
    with pytest.raises(EtcdRequestError) as info:
        await call
    assert info.value.code == "PERMISSION_DENIED", info.value


async def test_llumlet_certificate_cannot_write_outside_its_own_key(llumlet: EtcdClient, etcd: EmbeddedEtcd) -> None:
    await denied(llumlet.put(LAYOUT.apikeys_prefix + "x", b'{"role": "admin"}'))
    await denied(llumlet.put(LAYOUT.instance_key("i1"), b"tarpit"))
    await denied(llumlet.put(LAYOUT.config_key, b""))
    await denied(llumlet.put(LAYOUT.scale_target_key, b""))
    await denied(llumlet.put(LAYOUT.election_prefix() + "1", b"me"))
    await denied(llumlet.delete(LAYOUT.election_prefix() + "1"))
    await denied(llumlet.get_prefix(LAYOUT.apikeys_prefix))
    await denied(llumlet.get_prefix("/"))
    with pytest.raises(ApiKeyStoreError, match="PERMISSION_DENIED"):
        await ApiKeyStore(llumlet, LAYOUT).create("evil", "admin")


async def test_llumlet_registers_under_its_lease_and_reads_what_it_reads(llumlet: EtcdClient) -> None:
    lease = await Lease.grant(llumlet, 5)
    try:
        await llumlet.put(LAYOUT.instance_key("i0"), b"info", lease=lease.id)
        listed = await llumlet.get_prefix(LAYOUT.instances_prefix)
        assert [kv.key.decode() for kv in listed.kvs] == [LAYOUT.instance_key("i0")]
        await llumlet.get_prefix(LAYOUT.election_prefix())
    finally:
        await lease.revoke()  # needs write on every key bound to the lease: its own only
    assert await llumlet.get(LAYOUT.instance_key("i0")) is None


async def test_each_role_does_its_job_and_nothing_more(etcd: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    async with (
        client(etcd, pki, "admin", "admin") as admin,
        client(etcd, pki, "frontend", "f0") as frontend,
        client(etcd, pki, "scheduler", "s0") as scheduler,
        client(etcd, pki, "client", "c") as anyone,
    ):
        key, record = await ApiKeyStore(admin, LAYOUT).create("alice", "user")
        assert (await ApiKeyStore(frontend, LAYOUT).verify(key)).id == record.id
        await frontend.get_prefix(LAYOUT.instances_prefix)
        await frontend.get_prefix(LAYOUT.election_prefix())  # whether a lost-instance notice is the leader's
        await denied(frontend.put(LAYOUT.apikeys_prefix + "x", b"{}"))
        await denied(frontend.put(LAYOUT.instance_key("i0"), b"x"))
        lease = await Lease.grant(frontend, 5)  # its registration, for the leader's lost-instance notices
        try:
            await frontend.put(LAYOUT.frontend_key("f0", "127.0.0.1:9"), b"127.0.0.1:9", lease=lease.id)
            await denied(frontend.put(LAYOUT.frontend_key("f1", "127.0.0.1:9"), b"127.0.0.1:9"))
            listed = await scheduler.get_prefix(LAYOUT.frontends_prefix)
            assert [kv.value for kv in listed.kvs] == [b"127.0.0.1:9"]
        finally:
            await lease.revoke()

        await scheduler.put(LAYOUT.election_prefix() + "abc", b"scheduler s0")
        await scheduler.delete(LAYOUT.election_prefix() + "abc")
        await scheduler.put(LAYOUT.config_key, b"")
        await scheduler.put(LAYOUT.scale_target_key, b"")
        await scheduler.get_prefix(LAYOUT.instances_prefix)
        await denied(scheduler.put(LAYOUT.apikeys_prefix + "x", b"{}"))
        await denied(scheduler.put(LAYOUT.instance_key("i0"), b"x"))

        await denied(admin.put(LAYOUT.instance_key("i0"), b"x"))
        await denied(anyone.get_prefix(LAYOUT.instances_prefix))


async def test_a_certificate_issued_later_gets_its_user(etcd: EmbeddedEtcd, pki: ClusterSecurity) -> None:
    assert (pki.directory / RBAC_FILE).exists()
    async with client(etcd, pki, "llumlet", "i0-r1") as late:  # issued now, as serve's restarted llumlet's
        assert user_of(pki.paths("llumlet", "i0-r1").cert) == "llumlet-i0-r1"
        await late.put(LAYOUT.instance_key("i0-r1"), b"info")
        await late.delete(LAYOUT.instance_key("i0-r1"))
        await denied(late.put(LAYOUT.instance_key("i0"), b"x"))


async def test_enabling_again_is_harmless(etcd: EmbeddedEtcd, pki: ClusterSecurity, llumlet: EtcdClient) -> None:
    users = pki.enable_etcd_rbac([f"https://{e}" for e in etcd.endpoints], LAYOUT)  # a restart of serve
    assert {"llumlet-i0", "scheduler-s0", "frontend-f0", "admin-admin"} <= set(users)
    await denied(llumlet.put(LAYOUT.apikeys_prefix + "x", b"{}"))
