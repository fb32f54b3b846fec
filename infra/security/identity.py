"""The caller's identity as the TLS handshake proved it: from a grpc.aio context, an SSL object or a transport.

Only a certificate that the handshake verified against the cluster CA yields an identity: grpc fills ``auth_context``
from the verified peer certificate (a server that does not require client certificates never asks for one), and
Python's ``getpeercert()`` returns an empty dict unless the certificate was verified.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

from pyllumnix.infra.security.ca import URI_SCHEME, Identity, IdentityError

_PREFIX = f"{URI_SCHEME}://".encode()


class NoIdentityError(IdentityError):
    """The peer showed no certificate, or one that names no llumnix identity."""


def identity_from_auth_context(auth: Mapping[str, Sequence[bytes]]) -> Identity:
    """The identity in a grpc ``auth_context()``; raises NoIdentityError/IdentityError saying what is missing."""
    if not auth or b"ssl" not in auth.get("transport_security_type", ()):
        raise NoIdentityError("the connection is not TLS: no client certificate")
    if not auth.get("x509_pem_cert"):
        raise NoIdentityError("no client certificate was presented")
    # grpc lists SAN URIs as "peer_uri"; older cores only as part of "x509_subject_alternative_name".
    uris = [u for u in auth.get("peer_uri", ()) if u.startswith(_PREFIX)]
    if not uris:
        uris = [u for u in auth.get("x509_subject_alternative_name", ()) if u.startswith(_PREFIX)]
    if not uris:
        subject = b", ".join(auth.get("x509_subject", ())).decode(errors="replace") or "?"
        raise NoIdentityError(f"the client certificate ({subject}) names no {URI_SCHEME}:// identity")
    if len(uris) > 1:
        raise IdentityError(f"the client certificate names {len(uris)} identities; exactly one is allowed")
    return Identity.parse(uris[0].decode(errors="replace"))


@functools.lru_cache(maxsize=4096)
def _parse_uri(uri: bytes) -> Identity:
    return Identity.parse(uri.decode(errors="replace"))


def peer_identity(context: Any) -> Identity:
    """The identity of the caller of a grpc.aio (or sync) ``ServicerContext``.

    The per-call path reads only the verified peer's SANs (``peer_identities``), not the whole auth context with its
    PEM, and parses each distinct URI once; the full auth context is read only to explain a refusal.
    """
    names = context.peer_identities()
    if names:
        uris = [n for n in names if n.startswith(_PREFIX)]
        if len(uris) == 1:
            return _parse_uri(uris[0])
    return identity_from_auth_context(context.auth_context())


def identity_from_peercert(peercert: Mapping[str, Any] | None) -> Identity:
    """The identity in ``SSLObject.getpeercert()`` (a verified certificate's decoded fields)."""
    if not peercert:
        raise NoIdentityError("no verified client certificate")
    uris = [
        value
        for kind, value in peercert.get("subjectAltName", ())
        if kind == "URI" and str(value).startswith(f"{URI_SCHEME}://")
    ]
    if len(uris) != 1:
        raise NoIdentityError(f"the peer certificate names {len(uris)} {URI_SCHEME}:// identities; exactly one needed")
    return Identity.parse(uris[0])


def identity_from_transport(transport: Any) -> Identity:
    """The peer identity of an asyncio transport (a TLS stream or an aiohttp request's ``request.transport``)."""
    if transport is None:
        raise NoIdentityError("no transport")
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        raise NoIdentityError("the connection is not TLS: no client certificate")
    return identity_from_peercert(ssl_object.getpeercert())
