"""TLS credentials from a component's files: gRPC server/channel credentials and ``ssl.SSLContext`` objects.

Every internal hop is mutual TLS against the cluster CA: servers require a client certificate signed by it (grpc's
``require_client_auth=False`` does not even *ask* for one, so a port that wants caller identities must require them),
and clients verify the server's certificate and name. The same files give the aiohttp HTTPS server and the TCP data
plane (asyncio streams) their contexts, so one certificate per component covers all of its listeners.
"""

from __future__ import annotations

import ssl
from typing import Any

import grpc

from pyllumnix.infra.security.ca import CertPaths

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
