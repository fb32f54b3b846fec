"""TLS credentials from a component's files: gRPC server/channel credentials and ``ssl.SSLContext`` objects.

Every internal hop is mutual TLS against the cluster CA: servers require a client certificate signed by it (grpc's
``require_client_auth=False`` does not even *ask* for one, so a port that wants caller identities must require them),
and clients verify the server's certificate and name. The same files give the aiohttp HTTPS server and the TCP data
plane (asyncio streams) their contexts, so one certificate per component covers all of its listeners.
"""

from __future__ import annotations

import datetime
import ssl
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from pyllumnix.infra.security.ca import CertPaths, identities_in

# Channel options that make a TLS channel check the server certificate against a name other than the target host
# (for example when dialling an IP that the certificate names only by DNS).
SERVER_NAME_OPTION = "grpc.ssl_target_name_override"


def grpc_server_credentials(paths: CertPaths, *, require_client_cert: bool = True) -> Any:
    """Server credentials presenting ``paths.cert``; with ``require_client_cert`` callers must show a CA-signed cert.

    ``require_client_cert=False`` is for a public listener authenticated by API keys instead (the server then never
    learns a caller's certificate identity).
    """
    return grpc.ssl_server_credentials(
        [(paths.key_pem(), paths.cert_pem())],
        root_certificates=paths.ca_pem() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def grpc_channel_credentials(paths: CertPaths, *, client_cert: bool = True) -> Any:
    """Channel credentials trusting only the cluster CA, presenting this component's certificate."""
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=paths.ca_pem())
    return grpc.ssl_channel_credentials(
        root_certificates=paths.ca_pem(), private_key=paths.key_pem(), certificate_chain=paths.cert_pem()
    )


def grpc_channel_options(server_name: str | None = None) -> list[tuple[str, str]]:
    """Extra channel options for a TLS channel (the server-name override, when one is needed)."""
    return [(SERVER_NAME_OPTION, server_name)] if server_name else []


def secure_channel(
    address: str,
    paths: CertPaths,
    *,
    options: list[tuple[str, Any]] | tuple[tuple[str, Any], ...] = (),
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` with mutual TLS (the drop-in for ``grpc.aio.insecure_channel``)."""
    return grpc.aio.secure_channel(
        address, grpc_channel_credentials(paths), options=[*options, *grpc_channel_options(server_name)]
    )


def _base_context(purpose: ssl.Purpose, paths: CertPaths) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(paths.cert, paths.key)
    ctx.load_verify_locations(cafile=str(paths.ca))
    return ctx


def server_ssl_context(paths: CertPaths, *, require_client_cert: bool = True) -> ssl.SSLContext:
    """For ``aiohttp.web`` (HTTPS) and ``asyncio.start_server`` (data plane): the server's certificate, and with
    ``require_client_cert`` a handshake that fails unless the peer shows a certificate signed by the cluster CA."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, paths)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def client_ssl_context(paths: CertPaths, *, check_hostname: bool = True) -> ssl.SSLContext:
    """For ``aiohttp.ClientSession`` and ``asyncio.open_connection``: trusts only the cluster CA, presents our cert.

    Pass ``server_hostname=`` to ``open_connection`` when the address is not one the server's certificate names.
    """
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, paths)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_failure_hint(details: str) -> str:
    """A sentence explaining a connection failure of a mutual-TLS channel, or "" when it does not look like one.

    grpc reports a refused client certificate differently depending on who noticed: the client sees "Tls handshake
    failed" when it rejects the server (or the server sends an alert), but under TLS 1.3 a grpc server that rejects
    the *client's* certificate just closes the connection, which the client reports as "Socket closed". Clients
    append this hint to their UNAVAILABLE errors so the user learns where to look.
    """
    text = details.lower()
    if "hostname verification" in text or "no match found for server name" in text:
        return (
            "the server's certificate does not name what this client dials: for a component, the role's name "
            "(<role>.llumnix.invalid; certificates issued before role-bound names lack it: issue them again), "
            "otherwise its host"
        )
    if "expired" in text:
        return "a certificate has expired: issue a new one"
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return "the server's certificate is not signed by the CA this client trusts"
    if "handshake failed" in text or "bad_certificate" in text or "certificate_required" in text:
        return "the TLS handshake failed: check that both sides use certificates from the same cluster CA"
    if "socket closed" in text or "connection reset" in text:
        return (
            "the server closed the connection; with mutual TLS this usually means it refused this client's "
            "certificate (missing, expired, or from another CA)"
        )
    return ""


def own_certificate_problem(
    certificate_chain: bytes | None,
    root_certificates: bytes | None = None,
    *,
    now: datetime.datetime | None = None,
) -> str:
    """Why this client's own certificate will be refused (expired, not yet valid, not from the CA it trusts), or "".

    Checked on the client because the server cannot say: under TLS 1.3 a grpc server that rejects a client certificate
    just closes the connection, and the client sees only "Socket closed". ``root_certificates``: the CA bundle the
    client trusts (the cluster CA); a certificate no certificate in it signed is refused by every cluster server.
    """
    if not certificate_chain:
        return ""
    try:
        cert = x509.load_pem_x509_certificate(certificate_chain)
    except ValueError:
        return "this client's certificate is not a PEM certificate"
    ids = identities_in(cert)
    name = ids[0].uri if len(ids) == 1 else cert.subject.rfc4514_string()
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment > cert.not_valid_after_utc:
        return (
            f"this client's certificate ({name}) expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "issue a new one"
        )
    if moment < cert.not_valid_before_utc:
        return (
            f"this client's certificate ({name}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check the clocks)"
        )
    if root_certificates:
        try:
            roots = x509.load_pem_x509_certificates(root_certificates)
        except ValueError:
            return ""
        if not any(_issued_by(cert, root) for root in roots):
            trusted = ", ".join(root.subject.rfc4514_string() for root in roots)
            same_name = any(root.subject == cert.issuer for root in roots)
            issuer = "another CA of the same name" if same_name else cert.issuer.rfc4514_string()
            return (
                f"this client's certificate ({name}) is not signed by the CA it trusts ({trusted}) but by {issuer}; "
                "the cluster's servers refuse a certificate from another CA"
            )
    return ""


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe_tls_failure(
    details: str, certificate_chain: bytes | None = None, root_certificates: bytes | None = None
) -> str:
    """A sentence for a failed connection of a TLS channel: the problem with the client's own certificate when it has
    one (the precise cause), else :func:`tls_failure_hint` of the error text ("" when nothing points at TLS)."""
    return own_certificate_problem(certificate_chain, root_certificates) or tls_failure_hint(details)
