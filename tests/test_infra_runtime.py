"""The process security settings: flags -> certificate (or a refusal that says how to get one), and start_server /
open_channel applying them (mutual TLS required, role checked)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pyllumnix.infra.grpc_server import start_server
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.runtime import (
    SecurityConfigError,
    SecuritySettings,
    from_options,
    identity_of,
    open_channel,
    split_etcd_endpoints,
)
from pyllumnix.infra.security.tls import tls_failure_hint


def test_no_certificates_and_no_insecure_is_refused_with_the_way_out() -> None:
    with pytest.raises(SecurityConfigError) as info:
        from_options("llumlet", "i-1", env={})
    message = str(info.value)
    assert "--tls-dir" in message and "llumnix serve" in message and "--insecure" in message


def test_insecure_by_flag_or_environment() -> None:
    assert not from_options("llumlet", "i-1", insecure=True, env={}).secure
    assert not from_options("llumlet", "i-1", env={"LLUMNIX_INSECURE": "1"}).secure
    with pytest.raises(SecurityConfigError, match="contradicts"):
        from_options("llumlet", "i-1", insecure=True, tls_dir="/nonexistent", env={})


def test_local_pki_issues_the_component_certificate_with_its_hosts(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path / "pki", "c1")
    settings = from_options("llumlet", "i-7", env={"LLUMNIX_TLS_DIR": str(pki.directory)}, hosts=["10.1.2.3", "::"])
    assert settings.secure and settings.identity is not None
    assert (settings.identity.cluster, settings.identity.role, settings.identity.id) == ("c1", "llumlet", "i-7")
    assert settings.authority is not None and settings.child_args() == ["--tls-dir", str(pki.directory)]
    assert settings.paths is not None
    cert = x509.load_pem_x509_certificate(settings.paths.cert.read_bytes())
    ips = {
        str(ip)
        for ip in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress
        )
    }
    assert "10.1.2.3" in ips and "::" not in ips


def test_a_folder_without_the_ca_key_needs_the_certificate(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path / "pki", "c1")
    pki.ca_key.unlink()
    with pytest.raises(SecurityConfigError, match="no certificate for llumlet 'i-9'"):
        from_options("llumlet", "i-9", tls_dir=pki.directory, env={})
    assert from_options("scheduler", "s0", tls_dir=pki.directory, env={}).secure  # bootstrap issued s0


def test_a_certificate_of_another_role_is_refused(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path / "pki", "c1")
    paths = pki.ensure("frontend", "f0")
    with pytest.raises(SecurityConfigError, match="is a frontend certificate"):
        from_options("scheduler", "s0", ca=paths.ca, cert=paths.cert, key=paths.key, env={})
    with pytest.raises(SecurityConfigError, match="go together"):
        from_options("frontend", "f0", ca=paths.ca, cert=paths.cert, env={})


def test_etcd_endpoints_say_whether_tls() -> None:
    assert split_etcd_endpoints(["https://a:1", "https://b:2"]) == (["a:1", "b:2"], True)
    assert split_etcd_endpoints(["a:1", "http://b:2"]) == (["a:1", "b:2"], False)
    with pytest.raises(SecurityConfigError, match="mixed"):
        split_etcd_endpoints(["https://a:1", "b:2"])


async def test_secure_server_requires_a_ca_signed_client(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path / "pki", "c1")
    server_paths = pki.ensure("llumlet", "i-1")
    server = await start_server([], security=SecuritySettings(server_paths, identity_of(server_paths.cert)))
    try:
        client_paths = pki.ensure("scheduler", "s0")
        client = SecuritySettings(client_paths, identity_of(client_paths.cert))
        async with open_channel(server.address, peer=None, settings=client) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_configure_returns_the_settings_it_replaces(tmp_path: Path) -> None:
    """A benchmark or fixture that switches this process to mTLS for a while restores what was there: before,
    ``configure`` returned the new settings, so the "restore" kept mTLS and later in-process clients failed."""
    before = runtime.current()
    pki = bootstrap_local(tmp_path / "pki", "c1")
    secure = from_options("frontend", "f-0", tls_dir=str(pki.directory), env={})
    previous = runtime.configure(secure)
    try:
        assert previous is before
        assert runtime.current() is secure
    finally:
        runtime.configure(previous)
    assert runtime.current() is before


async def test_a_peer_must_hold_the_role_it_is_dialled_as(tmp_path: Path) -> None:
    """Was: a client checked only that the server's certificate was the cluster CA's and named the host, so a
    llumlet's certificate (valid for its host) could pose as the scheduler, or the frontend's sink, on that host.
    Now a product channel names the role it dials and the certificate must carry that role's name."""
    pki = bootstrap_local(tmp_path / "pki", "c1")
    llumlet_paths = pki.ensure("llumlet", "i-1")
    server = await start_server([], security=SecuritySettings(llumlet_paths, identity_of(llumlet_paths.cert)))
    try:
        scheduler_paths = pki.ensure("scheduler", "s0")
        client = SecuritySettings(scheduler_paths, identity_of(scheduler_paths.cert))
        for peer, ok in (("llumlet", True), ("scheduler", False), ("frontend", False), (None, True)):
            async with open_channel(server.address, peer=peer, settings=client) as ch:
                check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                if ok:
                    assert (await check).status == health_pb2.HealthCheckResponse.SERVING, peer
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await check
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, peer
                assert "llumnix.invalid" in tls_failure_hint(info.value.details() or ""), info.value.details()
    finally:
        await server.stop(0)


def test_a_certificate_from_before_role_names_is_reissued_or_refused(tmp_path: Path) -> None:
    """A PKI folder kept from an earlier version: its serving certificates lack the role's name, so peers would refuse
    them. ``ensure`` issues them again; a component given such a file directly is refused with the way out."""
    from cryptography.hazmat.primitives import hashes, serialization

    from pyllumnix.infra.security.ca import CertificateAuthority, Identity, host_names, names_role

    pki = bootstrap_local(tmp_path / "pki", "c1")
    paths = pki.ensure("llumlet", "i-2")
    authority = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    old = authority.issue(Identity("c1", "llumlet", "i-2"), ["127.0.0.1"])
    assert names_role(old.cert, "llumlet")
    # What the earlier version issued: the same certificate less the role's DNS name.
    builder = x509.CertificateBuilder(
        issuer_name=old.cert.issuer,
        subject_name=old.cert.subject,
        public_key=old.key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=old.cert.not_valid_before_utc,
        not_valid_after=old.cert.not_valid_after_utc,
    ).add_extension(
        x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(old.identity.uri), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))]
        ),
        critical=False,
    )
    legacy = builder.sign(authority.key, hashes.SHA256())
    assert not names_role(legacy, "llumlet")
    paths.cert.write_bytes(legacy.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(old.key_pem)
    with pytest.raises(SecurityConfigError, match=r"lacks the DNS SAN llumlet\.llumnix\.invalid"):
        from_options("llumlet", "i-2", ca=paths.ca, cert=paths.cert, key=paths.key, env={})
    fresh = bootstrap_local(tmp_path / "pki", "c1").ensure("llumlet", "i-2")  # a later serve, same folder
    reissued = x509.load_pem_x509_certificate(fresh.cert.read_bytes())
    assert names_role(reissued, "llumlet")
    assert "10.0.0.5" in host_names(reissued), "the names peers dial it by are kept"
    assert from_options("llumlet", "i-2", ca=fresh.ca, cert=fresh.cert, key=fresh.key, env={}).secure
