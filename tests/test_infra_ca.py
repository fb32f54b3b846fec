"""The local CA and component certificates (identity URI, SANs, usages, 0600 keys), and the ``ssl.SSLContext``s for
the TCP data plane (asyncio streams) and aiohttp HTTPS: mutual TLS with the peer's identity, other CAs refused."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.ca import CertificateAuthority, CertPaths, Identity, IdentityError, identities_in
from pyllumnix.infra.security.identity import (
    NoIdentityError,
    identity_from_auth_context,
    identity_from_peercert,
    identity_from_transport,
)
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context


def test_identity_uri_round_trip_and_validation() -> None:
    ident = Identity("prod", "llumlet", "i-7")
    assert ident.uri == "llumnix://prod/llumlet/i-7"
    assert Identity.parse(ident.uri) == ident
    for bad in (
        "https://prod/llumlet/i-7",
        "llumnix://prod/llumlet",
        "llumnix://prod/root/x",
        "llumnix://p/llumlet/a/b",
    ):
        with pytest.raises(IdentityError):
            Identity.parse(bad)
    with pytest.raises(IdentityError, match="unknown role"):
        Identity("c", "god", "x")
    with pytest.raises(IdentityError):
        Identity("c", "llumlet", "")


def test_issued_certificate_contents(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    issued = ca.issue(Identity("c1", "llumlet", "i-1"), ["127.0.0.1", "localhost", "node-7.example", "10.0.0.7"])
    cert = issued.cert
    assert identities_in(cert) == [Identity("c1", "llumlet", "i-1")]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The role's name too: peers dialling a llumlet check for it (a client-only certificate names no role).
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "node-7.example", "llumlet.llumnix.invalid"}
    admin = ca.issue(Identity("c1", "admin", "a"), ["127.0.0.1"]).cert
    assert (
        admin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        == []
    )
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.7"),
    }
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    admin = ca.issue(Identity("c1", "admin", "ops")).cert
    assert set(admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH
    }
    cert.verify_directly_issued_by(ca.cert)
    # Files: keys 0600 in a 0700 folder; the CA can be loaded back and keeps issuing.
    ca_cert, ca_key = ca.write(tmp_path / "pki")
    paths = issued.write(tmp_path / "pki", ca_cert)
    for key in (ca_key, paths.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    again = CertificateAuthority.load(ca_cert, ca_key)
    again.issue(Identity("c1", "frontend", "f0")).cert.verify_directly_issued_by(ca.cert)


def test_identity_from_auth_context_and_peercert() -> None:
    auth = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----"],
        "peer_uri": [b"llumnix://c/llumlet/i-1"],
    }
    assert identity_from_auth_context(auth) == Identity("c", "llumlet", "i-1")
    legacy = {**auth, "peer_uri": [], "x509_subject_alternative_name": [b"llumnix://c/admin/a", b"127.0.0.1"]}
    assert identity_from_auth_context(legacy).role == "admin"
    with pytest.raises(NoIdentityError, match="not TLS"):
        identity_from_auth_context({})
    with pytest.raises(NoIdentityError, match="no client certificate"):
        identity_from_auth_context({"transport_security_type": [b"ssl"]})
    with pytest.raises(IdentityError, match="2 identities"):
        identity_from_auth_context({**auth, "peer_uri": [b"llumnix://c/llumlet/i-1", b"llumnix://c/admin/a"]})
    assert identity_from_peercert({"subjectAltName": (("URI", "llumnix://c/frontend/f"), ("DNS", "x"))}).id == "f"
    with pytest.raises(NoIdentityError):
        identity_from_peercert({})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    return bootstrap_local(tmp_path_factory.mktemp("pki"), "c1", llumlets=["i-1", "i-2"])


async def test_data_plane_streams_with_mutual_tls(pki: ClusterSecurity, tmp_path: Path) -> None:
    """A TCP data-plane listener sees which llumlet connected; a certificate from another CA never gets through."""
    seen: list[Identity] = []
    got = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(identity_from_transport(writer.transport))
            writer.write(await reader.readexactly(5))
            await writer.drain()
        finally:
            got.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ssl_context(pki.paths("llumlet", "i-2")))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(pki.paths("llumlet", "i-1"))), 5
        )
        writer.write(b"block")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"block"
        writer.close()
        await asyncio.wait_for(got.wait(), 5)
        assert seen == [Identity("c1", "llumlet", "i-1")]

        other = CertificateAuthority.create("other")
        intruder = other.issue(Identity("c1", "llumlet", "i-1")).write(tmp_path, pki.ca_cert, name="intruder")
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(intruder)), 5
            )
            # Under TLS 1.3 the server's refusal arrives with the first read.
            writer.write(b"block")
            await asyncio.wait_for(reader.readexactly(5), 5)
        # A client that trusts another CA refuses the server.
        distrust = other.write(tmp_path / "other")[0]
        mine = pki.paths("llumlet", "i-1")
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ssl_context(CertPaths(distrust, mine.cert, mine.key))
                ),
                5,
            )
        assert len(seen) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_aiohttp_https_with_client_certificates(pki: ClusterSecurity) -> None:
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"uri": identity_from_transport(request.transport).uri})

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(pki.paths("frontend", "f0")))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        ctx = client_ssl_context(pki.paths("admin", "admin"))
        async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/whoami", ssl=ctx) as resp:
            assert resp.status == 200 and (await resp.json()) == {"uri": "llumnix://c1/admin/admin"}
        # Without a client certificate the handshake fails: the client gets a connection error, not a response.
        plain = ssl.create_default_context(cafile=str(pki.ca_cert))
        with pytest.raises(aiohttp.ClientError):
            async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/whoami", ssl=plain) as resp:
                await resp.read()
    finally:
        await runner.cleanup()
