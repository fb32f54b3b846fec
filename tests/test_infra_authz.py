"""Mutual TLS + the role table on real grpc.aio servers on 127.0.0.1 (certificates from pyllumnix.infra.security).

The right role passes; a wrong role gets PERMISSION_DENIED naming method, role and allowed roles; a certificate of
another cluster or with no identity gets UNAUTHENTICATED; certificates from another CA, expired certificates and a
missing client certificate fail the handshake, reported as UNAVAILABLE within the call's deadline.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pyllumnix.infra.security import authz
from pyllumnix.infra.security.authz import PROJECT_ROLES, RoleInterceptor, RoleTable, authorize, require_self
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.ca import CertificateAuthority, CertPaths, Identity, IdentityError, IssuedCert
from pyllumnix.infra.security.tls import grpc_server_credentials, secure_channel, tls_failure_hint
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

CLUSTER = "c1"
DEADLINE = 5.0


class Admin(admin_pb2_grpc.AdminServiceServicer):
    async def Scale(self, request: admin_pb2.ScaleRequest, context: Any) -> admin_pb2.ScaleResponse:
        return admin_pb2.ScaleResponse()


class Scheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    async def ReportLoad(self, request_iterator: Any, context: Any) -> scheduler_pb2.ReportLoadResponse:
        accepted = 0
        async for report in request_iterator:
            await require_self(context, report.load.instance_id)
            accepted += 1
        return scheduler_pb2.ReportLoadResponse(reports_accepted=accepted)


class Llumlet(llumlet_pb2_grpc.LlumletServiceServicer):
    async def StreamLoad(self, request: llumlet_pb2.StreamLoadRequest, context: Any) -> AsyncIterator[Any]:
        for seq in range(3):
            yield llumlet_pb2.StreamLoadResponse(load=common_pb2.InstanceLoad(instance_id="i-1", seq=seq))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    return bootstrap_local(tmp_path_factory.mktemp("pki"), CLUSTER, llumlets=["i-1", "i-2"])


def write(tmp: Path, issued: IssuedCert, ca: Path) -> CertPaths:
    return issued.write(tmp, ca, name=f"{issued.identity.role}-{issued.identity.id}-{time.monotonic_ns()}")


async def start_server(paths: CertPaths, table: RoleTable = PROJECT_ROLES, *, tls: bool = True) -> tuple[Any, str]:
    server = grpc.aio.server(interceptors=[RoleInterceptor(CLUSTER, table)])
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)  # type: ignore[abstract]
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(Scheduler(), server)  # type: ignore[abstract]
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(Llumlet(), server)  # type: ignore[abstract]
    health = health_aio.HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if tls:
        port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(paths))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def server(pki: ClusterSecurity) -> AsyncIterator[str]:
    srv, address = await start_server(pki.paths("scheduler", "s0"))
    yield address
    await srv.stop(None)


async def scale(address: str, paths: CertPaths) -> admin_pb2.ScaleResponse:
    async with secure_channel(address, paths) as channel:
        reply: admin_pb2.ScaleResponse = await admin_pb2_grpc.AdminServiceStub(channel).Scale(
            admin_pb2.ScaleRequest(), timeout=DEADLINE
        )
        return reply


async def report(address: str, paths: CertPaths, *instance_ids: str) -> int:
    requests = [scheduler_pb2.ReportLoadRequest(load=common_pb2.InstanceLoad(instance_id=i)) for i in instance_ids]
    async with secure_channel(address, paths) as channel:
        reply = await scheduler_pb2_grpc.SchedulerServiceStub(channel).ReportLoad(iter(requests), timeout=DEADLINE)
        return int(reply.reports_accepted)


async def rpc_error(coro: Any) -> grpc.aio.AioRpcError:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert time.monotonic() - start < DEADLINE + 2, "the refusal must come within the call's deadline"
    return info.value


async def test_allowed_role_passes(server: str, pki: ClusterSecurity) -> None:
    await scale(server, pki.paths("admin", "admin"))
    assert await report(server, pki.paths("llumlet", "i-1"), "i-1", "i-1") == 2


async def test_wrong_role_is_denied_with_method_and_roles(server: str, pki: ClusterSecurity) -> None:
    err = await rpc_error(scale(server, pki.paths("llumlet", "i-1")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "caller role llumlet may not call /llumnix.v1.AdminService/Scale; allowed: admin"
    err = await rpc_error(report(server, pki.paths("frontend", "f0"), "i-1"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "caller role frontend may not call /llumnix.v1.SchedulerService/ReportLoad; allowed: llumlet" in (
        err.details() or ""
    )


async def test_llumlet_reports_only_its_own_load(server: str, pki: ClusterSecurity) -> None:
    err = await rpc_error(report(server, pki.paths("llumlet", "i-1"), "i-1", "i-2"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "caller llumlet i-1 may not act for llumlet 'i-2'"


async def test_server_streaming_is_guarded(server: str, pki: ClusterSecurity) -> None:
    async def stream(paths: CertPaths) -> list[int]:
        async with secure_channel(server, paths) as channel:
            call = llumlet_pb2_grpc.LlumletServiceStub(channel).StreamLoad(
                llumlet_pb2.StreamLoadRequest(), timeout=DEADLINE
            )
            return [r.load.seq async for r in call]

    assert await stream(pki.paths("scheduler", "s1")) == [0, 1, 2]
    err = await rpc_error(stream(pki.paths("llumlet", "i-2")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "StreamLoad" in (err.details() or "")


async def test_health_is_open_to_every_role(server: str, pki: ClusterSecurity) -> None:
    for role, id in (("llumlet", "i-1"), ("client", "client"), ("frontend", "f0")):
        async with secure_channel(server, pki.paths(role, id)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_other_cluster_is_unauthenticated(server: str, pki: ClusterSecurity, tmp_path: Path) -> None:
    foreign = write(tmp_path, pki.authority().issue(Identity("c2", "admin", "admin")), pki.ca_cert)
    err = await rpc_error(scale(server, foreign))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "caller admin admin belongs to cluster 'c2'; this server serves cluster 'c1'"


def cert_without_identity(ca: CertificateAuthority) -> IssuedCert:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anonymous")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCert(Identity(CLUSTER, "client", "anonymous"), cert, key)


async def test_certificate_without_identity_is_unauthenticated(
    server: str, pki: ClusterSecurity, tmp_path: Path
) -> None:
    paths = write(tmp_path, cert_without_identity(pki.authority()), pki.ca_cert)
    err = await rpc_error(scale(server, paths))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "names no llumnix:// identity" in (err.details() or "") and "Scale" in (err.details() or "")


async def test_certificate_from_another_ca_fails_the_handshake(
    server: str, pki: ClusterSecurity, tmp_path: Path
) -> None:
    intruder = write(tmp_path, CertificateAuthority.create("other").issue(Identity(CLUSTER, "admin", "x")), pki.ca_cert)
    err = await rpc_error(scale(server, intruder))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # Under TLS 1.3 the client learns of the refusal as a closed socket; the hint says what that means.
    assert "certificate" in tls_failure_hint(err.details() or ""), err.details()


async def test_missing_client_certificate_fails_the_handshake(server: str, pki: ClusterSecurity) -> None:
    async with grpc.aio.secure_channel(server, grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())) as channel:
        err = await rpc_error(admin_pb2_grpc.AdminServiceStub(channel).Scale(admin_pb2.ScaleRequest(), timeout=2))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "certificate" in tls_failure_hint(err.details() or ""), err.details()


def expired(ca: CertificateAuthority, identity: Identity) -> IssuedCert:
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue(identity, not_before=now - datetime.timedelta(days=2), not_after=now - datetime.timedelta(days=1))


async def test_expired_client_certificate_fails_the_handshake(
    server: str, pki: ClusterSecurity, tmp_path: Path
) -> None:
    old = write(tmp_path, expired(pki.authority(), Identity(CLUSTER, "admin", "admin")), pki.ca_cert)
    err = await rpc_error(scale(server, old))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "certificate" in tls_failure_hint(err.details() or ""), err.details()


async def test_expired_server_certificate_is_refused_by_the_client(pki: ClusterSecurity, tmp_path: Path) -> None:
    old = write(tmp_path, expired(pki.authority(), Identity(CLUSTER, "scheduler", "old")), pki.ca_cert)
    srv, address = await start_server(old)
    try:
        err = await rpc_error(scale(address, pki.paths("admin", "admin")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "handshake failed" in (err.details() or "").lower()
        assert "expired" in tls_failure_hint(err.details() or ""), err.details()
    finally:
        await srv.stop(None)


async def test_method_missing_from_the_table_is_denied(pki: ClusterSecurity) -> None:
    table = RoleTable({"/llumnix.v1.SchedulerService/*": ["llumlet"]})
    srv, address = await start_server(pki.paths("scheduler", "s0"), table)
    try:
        err = await rpc_error(scale(address, pki.paths("admin", "admin")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "/llumnix.v1.AdminService/Scale is not in the role table" in (err.details() or "")
        assert await report(address, pki.paths("llumlet", "i-2"), "i-2") == 1
    finally:
        await srv.stop(None)


async def test_plaintext_server_with_the_interceptor_refuses_everyone(pki: ClusterSecurity) -> None:
    srv, address = await start_server(pki.paths("scheduler", "s0"), tls=False)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            err = await rpc_error(
                admin_pb2_grpc.AdminServiceStub(channel).Scale(admin_pb2.ScaleRequest(), timeout=DEADLINE)
            )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "not TLS" in (err.details() or "")
    finally:
        await srv.stop(None)


# ---- the table itself (pure) ----


def project_methods() -> Iterator[str]:
    pool = descriptor_pool.Default()
    for module in (admin_pb2, scheduler_pb2, llumlet_pb2, frontend_pb2_grpc):
        del module  # imported for their registration in the default pool
    for name in ("AdminService", "SchedulerService", "LlumletService", "FrontendService", "OutputSinkService"):
        service = pool.FindServiceByName(f"llumnix.v1.{name}")
        for method in service.methods:
            yield f"/llumnix.v1.{name}/{method.name}"


def test_every_project_rpc_has_a_rule() -> None:
    methods = list(project_methods())
    assert len(methods) > 20
    missing = [m for m in methods if PROJECT_ROLES.allowed(m) is None]
    assert not missing, f"decide who may call these RPCs in authz.PROJECT_ROLE_TABLE: {missing}"


@pytest.mark.parametrize(
    ("method", "role", "allowed"),
    [
        ("/llumnix.v1.SchedulerService/ReportLoad", "llumlet", True),
        ("/llumnix.v1.SchedulerService/ReportLoad", "scheduler", False),
        ("/llumnix.v1.SchedulerService/Dispatch", "frontend", True),
        ("/llumnix.v1.SchedulerService/Dispatch", "client", False),
        ("/llumnix.v1.LlumletService/MigrateOut", "scheduler", True),
        ("/llumnix.v1.LlumletService/MigrateOut", "admin", False),
        ("/llumnix.v1.LlumletService/SetInstanceState", "llumlet", False),
        ("/llumnix.v1.LlumletService/PreAllocate", "llumlet", True),
        ("/llumnix.v1.LlumletService/PreAllocate", "scheduler", False),
        ("/llumnix.v1.LlumletService/CommitMigration", "frontend", False),
        ("/llumnix.v1.OutputSinkService/PushOutputs", "llumlet", True),
        ("/llumnix.v1.OutputSinkService/PushOutputs", "client", False),
        ("/llumnix.v1.AdminService/Scale", "admin", True),
        ("/llumnix.v1.AdminService/SetConfig", "scheduler", False),
        ("/llumnix.v1.AdminService/ListInstances", "frontend", True),  # the frontend's /metrics
        ("/llumnix.v1.AdminService/ListClusterRequests", "frontend", False),
        ("/llumnix.v1.AdminService/SetConfig", "frontend", False),
        ("/llumnix.v1.FrontendService/Generate", "client", True),
        ("/llumnix.v1.FrontendService/Generate", "llumlet", False),
        ("/grpc.health.v1.Health/Check", "etcd", True),
        ("/some.Other/Method", "admin", False),
    ],
)
def test_authorize(method: str, role: str, allowed: bool) -> None:
    id = "admin" if role == "admin" else "x"
    denial = authorize(method, Identity(CLUSTER, role, id), CLUSTER, PROJECT_ROLES)
    assert (denial is None) == allowed, denial
    if denial is not None:
        assert denial.code == grpc.StatusCode.PERMISSION_DENIED and method in denial.message


def test_authorize_without_identity_and_bad_tables() -> None:
    denial = authorize("/a.B/C", IdentityError("no client certificate was presented"), CLUSTER, PROJECT_ROLES)
    assert denial is not None and denial.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in denial.message
    with pytest.raises(ValueError, match="unknown or no roles"):
        RoleTable({"/a.B/C": ["root"]})
    with pytest.raises(ValueError, match="rule key"):
        RoleTable({"a.B/C": ["admin"]})
    assert authz.ANY_ROLE in (PROJECT_ROLES.allowed("/grpc.health.v1.Health/Watch") or ())
