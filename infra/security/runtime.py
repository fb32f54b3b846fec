"""The process-wide security settings: which certificate this process shows, and the one helper every outbound
channel and every server goes through.

Each ``main.py`` builds a :class:`SecuritySettings` from its flags (:func:`security_options` adds them) and
:func:`configure` s it; after that :func:`open_channel` gives mutual-TLS channels presenting this component's
certificate, ``grpc_server.start_server`` opens its port with client certificates required and a
:class:`RoleInterceptor` for the cluster named in this component's own certificate, and :func:`etcd_tls` gives the
etcd client its TLS (used when the etcd endpoints say ``https://``).

Secure by default: a CLI component given no TLS material and no ``--insecure`` refuses to start (exit 2, with the
way to get certificates). Library use that never calls :func:`configure` (unit tests building servers in-process)
stays plaintext, as before.

The trust domain is the cluster named in the certificates (``llumnix://<cluster>/<role>/<id>``), not the etcd key
prefix (``--cluster``): one CA may serve several etcd prefixes (the integration tests do), and a certificate from
another CA fails the handshake before any name is compared.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509

from pyllumnix.infra import tracing
from pyllumnix.infra.etcd.rbac import EtcdRbacError
from pyllumnix.infra.framed import FramedCall, M
from pyllumnix.infra.framed_calls import UnaryChannel
from pyllumnix.infra.security.authz import RoleInterceptor
from pyllumnix.infra.security.bootstrap import ClusterSecurity
from pyllumnix.infra.security.ca import CLIENT_ONLY_ROLES, CertPaths, Identity, identities_in, names_role, role_name
from pyllumnix.infra.security.issuer import ISSUER_ENV, CertificateIssuer, RemoteIssuer
from pyllumnix.infra.security.tls import (
    SERVER_NAME_OPTION,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_server_credentials,
)

log = logging.getLogger(__name__)

TLS_DIR_ENV = "LLUMNIX_TLS_DIR"
INSECURE_ENV = "LLUMNIX_INSECURE"
CLUSTER_FILE = "cluster"
"""A PKI folder written by ``bootstrap_local`` names its cluster (trust domain) in this file."""

HOW_TO_GET_CERTIFICATES = (
    "give --tls-dir DIR (a PKI folder as `llumnix serve` writes it: ca.pem and <role>-<id>.pem/-key.pem; also "
    f"${TLS_DIR_ENV}) or --ca/--cert/--key, or run the whole cluster with `llumnix serve`, which creates one; "
    "--insecure (plaintext, no authentication) is for isolated development only"
)


class SecurityConfigError(Exception):
    """The flags do not give a usable security setup (the CLI exits 2 with this message)."""


@dataclass(frozen=True)
class SecuritySettings:
    """This process's certificate (None: plaintext) and what it may do with it.

    ``authority``: what issues the certificates of the components this process starts (the providers' llumlets): a
    local PKI folder holding the CA key (the test harness's, an operator's), or ``llumnix serve``'s issuer (its
    scheduler replicas hold no CA key: ``$LLUMNIX_CERT_ISSUER``); None: this process cannot issue.
    """

    paths: CertPaths | None = None
    identity: Identity | None = None
    authority: CertificateIssuer | None = None
    tls_dir: Path | None = None
    reflection: bool = False

    @property
    def secure(self) -> bool:
        return self.paths is not None

    @property
    def cluster(self) -> str:
        assert self.identity is not None, "insecure settings have no cluster identity"
        return self.identity.cluster

    def child_args(self, own: CertPaths | None = None) -> list[str]:
        """Flags for a child component of the same cluster (the provider's llumlets): its ``own`` files (what
        :meth:`ensure` returned), else the same PKI as this process; or --insecure."""
        if not self.secure:
            return ["--insecure"]
        if own is not None:
            return ["--ca", str(own.ca), "--cert", str(own.cert), "--key", str(own.key)]
        if self.tls_dir is not None:
            return ["--tls-dir", str(self.tls_dir)]
        assert self.paths is not None
        return ["--ca", str(self.paths.ca), "--cert", str(self.paths.cert), "--key", str(self.paths.key)]

    def ensure(self, role: str, id: str, hosts: Sequence[str] = ()) -> CertPaths | None:
        """The files of a component this process starts, issued if need be, in a folder of the component's own
        without the CA key (hand it only these: :meth:`child_args`); None when insecure or when this process cannot
        issue (the component must then be given its own files)."""
        if self.authority is None:
            return None
        return self.authority.hand_out(role, id, hosts)

    def certify(self, role: str, id: str, hosts: Sequence[str], public_key_pem: bytes) -> tuple[bytes, bytes] | None:
        """(CA certificate, certificate) PEMs for a key a component made on its own machine (see
        :meth:`CertificateIssuer.certify`); None when insecure or when this process cannot issue."""
        if self.authority is None:
            return None
        return self.authority.certify(role, id, hosts, public_key_pem)


INSECURE = SecuritySettings()
_state: dict[str, SecuritySettings] = {"current": INSECURE}


def configure(settings: SecuritySettings) -> SecuritySettings:
    """Makes ``settings`` this process's (called once by each ``main``) and returns the settings it replaces, so a
    test or a benchmark that switches for a while can restore them: ``previous = configure(x) ... configure(previous)``.
    """
    previous = _state["current"]
    _state["current"] = settings
    return previous


def current() -> SecuritySettings:
    return _state["current"]


def identity_of(cert: Path) -> Identity:
    """The ``llumnix://`` identity a certificate file names (exactly one)."""
    ids = identities_in(x509.load_pem_x509_certificate(cert.read_bytes()))
    if len(ids) != 1:
        raise SecurityConfigError(f"{cert} names {len(ids)} llumnix:// identities; a component certificate has one")
    return ids[0]


def open_local_pki(directory: Path) -> ClusterSecurity:
    """A PKI folder (``ca.pem``, the cluster file, maybe the CA key)."""
    if not (directory / "ca.pem").exists():
        raise SecurityConfigError(f"{directory} has no ca.pem: not a PKI folder. {HOW_TO_GET_CERTIFICATES}")
    cluster_file = directory / CLUSTER_FILE
    cluster = cluster_file.read_text().strip() if cluster_file.exists() else ""
    return ClusterSecurity(directory, cluster)


def from_options(
    role: str,
    id: str,
    *,
    tls_dir: str | Path | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    insecure: bool = False,
    reflection: bool = False,
    env: dict[str, str] | None = None,
    hosts: Sequence[str] = (),
) -> SecuritySettings:
    """Settings from a component's flags (``$LLUMNIX_TLS_DIR`` / ``$LLUMNIX_INSECURE`` when no flag says).

    ``--tls-dir``: this component's files are ``<role>-<id>.pem``/``-key.pem`` there; a folder that holds the CA key
    too (a local PKI) issues them when missing, so llumlets with fresh ids start without a separate step; ``hosts``
    (the names and addresses peers dial this component at; empty ones are skipped) go into such a certificate beside
    the local defaults.
    """
    env = dict(os.environ) if env is None else env
    explicit = [v for v in (ca, cert, key) if v]
    if insecure and (tls_dir or explicit):
        raise SecurityConfigError("--insecure contradicts --tls-dir/--ca/--cert/--key: pick one")
    issuer_socket = env.get(ISSUER_ENV, "")
    remote = RemoteIssuer(issuer_socket) if issuer_socket and not insecure else None
    if explicit:
        if len(explicit) != 3:
            raise SecurityConfigError("--ca, --cert and --key go together")
        paths = CertPaths(Path(str(ca)), Path(str(cert)), Path(str(key)))
        for p in (paths.ca, paths.cert, paths.key):
            if not p.exists():
                raise SecurityConfigError(f"{p} does not exist")
        return SecuritySettings(paths, _checked_identity(paths.cert, role), authority=remote, reflection=reflection)
    if insecure:
        return SecuritySettings(reflection=reflection)
    directory = tls_dir or env.get(TLS_DIR_ENV, "")
    if not directory:
        if env.get(INSECURE_ENV, "").lower() in ("1", "true", "yes"):
            return SecuritySettings(reflection=reflection)
        raise SecurityConfigError(f"no TLS certificates for this {role}: {HOW_TO_GET_CERTIFICATES}")
    pki = open_local_pki(Path(directory).expanduser().resolve())
    cert_path = pki.directory / f"{role}-{id}.pem"
    authority: CertificateIssuer | None = remote
    if pki.ca_key.exists() and pki.cluster:
        authority = pki
        # Import here: grpc_server imports this module. A wildcard names no host: the certificate gets the name
        # such a process advertises instead; an IPv6 literal goes in bare.
        from pyllumnix.infra.grpc_server import advertised_host

        paths = pki.ensure(role, id, list(dict.fromkeys(advertised_host(h).strip("[]") for h in hosts if h)))
    elif cert_path.exists():
        paths = CertPaths(pki.ca_cert, cert_path, pki.directory / f"{role}-{id}-key.pem")
    else:
        raise SecurityConfigError(
            f"{pki.directory} has no certificate for {role} {id!r} ({cert_path.name}) and no CA key to issue one. "
            f"{HOW_TO_GET_CERTIFICATES}"
        )
    return SecuritySettings(
        paths, _checked_identity(paths.cert, role), authority=authority, tls_dir=pki.directory, reflection=reflection
    )


def component_id(settings: SecuritySettings, given: str, chosen: str, option: str) -> str:
    """This component's id: its certificate's. ``given`` is what ``option`` said ("" when absent), ``chosen`` the id
    the flags led to (``given`` or a generated default). A given id other than the certificate's is a usage error (exit
    2): peers know a component by its certificate (llumlets admit a leader's orders only from the certificate its
    election entry names, a destination serves only the source its caller's certificate names), so a process running
    under another id than its certificate's would be refused, or worse, impersonate the id it runs under. With no id
    given, the certificate's is taken."""
    import click

    identity = settings.identity
    if identity is None or identity.id == chosen:
        return chosen
    if given:
        raise click.UsageError(f"{option} {given} is not the certificate's id {identity.id!r}")
    return identity.id


def _checked_identity(cert: Path, role: str) -> Identity:
    identity = identity_of(cert)
    if identity.role != role:
        raise SecurityConfigError(f"{cert} is a {identity.role} certificate ({identity}); this component is a {role}")
    if role not in CLIENT_ONLY_ROLES and not names_role(x509.load_pem_x509_certificate(cert.read_bytes()), role):
        raise SecurityConfigError(
            f"{cert} ({identity}) lacks the DNS SAN {role_name(role)}, which components dialling a {role} check "
            "for: with your own CA, add it when issuing (README: multi-host with your own CA); a certificate from "
            "`llumnix serve` or a PKI folder holding the CA key (issued before role-bound names) is issued again "
            "by them when given that folder"
        )
    return identity


# -- channels and servers ----------------------------------------------------------------------------------------
def open_channel(
    address: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    peer: str | None,
    settings: SecuritySettings | None = None,
) -> grpc.aio.Channel:
    """THE way product code dials a peer: mutual TLS with this process's certificate, or plaintext when insecure.

    ``peer``: the role expected at ``address``; the server's certificate must name it (:func:`role_name`), not merely
    the host, so a component of another role on that host cannot pose as it. None (test harnesses, a tool dialling
    whatever role): the certificate must name the host, as before."""
    s = settings or current()
    traced = tracing.client_interceptors() or None  # the active trace context with every call, when tracing is on
    if s.paths is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=traced)
    named = [(SERVER_NAME_OPTION, role_name(peer))] if peer else []
    return grpc.aio.secure_channel(
        address, grpc_channel_credentials(s.paths), options=[*options, *named], interceptors=traced
    )


def open_framed(
    address: str,
    response_type: type[M],
    *,
    peer: str,
    timeout: float,
    settings: SecuritySettings | None = None,
) -> Awaitable[FramedCall[M]]:
    """The framed-stream twin of :func:`open_channel` (``infra.framed``): mutual TLS with this process's certificate,
    the server's certificate checked for the ``peer`` role's name; plaintext when insecure."""
    s = settings or current()
    if s.paths is None:
        return FramedCall.open(address, response_type, ssl_context=None, server_name=None, timeout=timeout)
    return FramedCall.open(
        address, response_type, ssl_context=_client_context(s.paths), server_name=role_name(peer), timeout=timeout
    )


def open_framed_calls(
    address: str, *, peer: str, timeout: float, settings: SecuritySettings | None = None
) -> Coroutine[Any, Any, UnaryChannel]:
    """A framed call channel (``infra.framed_calls``) to ``address``, secured as :func:`open_framed` secures a
    stream."""
    s = settings or current()
    if s.paths is None:
        return UnaryChannel.open(address, ssl_context=None, server_name=None, timeout=timeout)
    context = _client_context(s.paths)
    return UnaryChannel.open(address, ssl_context=context, server_name=role_name(peer), timeout=timeout)


def _client_context(paths: CertPaths) -> ssl.SSLContext:
    context = _client_contexts.get(paths)
    if context is None:  # (loads the files once per process, not per connection)
        context = _client_contexts[paths] = client_ssl_context(paths)
    return context


_client_contexts: dict[CertPaths, ssl.SSLContext] = {}


def server_port_credentials(settings: SecuritySettings) -> Any:
    """Credentials of a port that requires CA-signed client certificates (None: plaintext)."""
    return None if settings.paths is None else grpc_server_credentials(settings.paths)


def server_interceptors(settings: SecuritySettings) -> list[grpc.aio.ServerInterceptor]:
    """The role check for a mutual-TLS port (none for a plaintext one: there is no caller identity to check)."""
    return [] if settings.paths is None else [RoleInterceptor(settings.cluster)]


# -- etcd ----------------------------------------------------------------------------------------------------------
def split_etcd_endpoints(endpoints: Sequence[str]) -> tuple[list[str], bool]:
    """``https://h:p`` / ``http://h:p`` / ``h:p`` -> (``h:p`` list, whether TLS was asked for)."""
    tls = any(e.startswith("https://") for e in endpoints)
    if tls and not all(e.startswith("https://") for e in endpoints):
        raise SecurityConfigError(f"mixed http and https etcd endpoints: {', '.join(endpoints)}")
    return [e.split("://", 1)[-1] for e in endpoints], tls


def etcd_client(endpoints: Sequence[str], settings: SecuritySettings | None = None, **kwargs: Any) -> Any:
    """An ``EtcdClient`` for these endpoints: TLS with this component's certificate for ``https://`` ones."""
    from pyllumnix.infra.etcd.client import EtcdClient, EtcdTls

    s = settings or current()
    plain, tls = split_etcd_endpoints(endpoints)
    if not tls:
        return EtcdClient(plain, **kwargs)
    if s.paths is None:
        raise SecurityConfigError("https:// etcd endpoints need TLS certificates (--tls-dir or --ca/--cert/--key)")
    return EtcdClient(plain, tls=EtcdTls.from_files(s.paths.ca, s.paths.cert, s.paths.key), **kwargs)


# -- CLI -------------------------------------------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def security_options(func: F) -> F:
    """The click options every component takes: --tls-dir, --ca/--cert/--key, --insecure, --reflection."""
    import click

    options = [
        click.option(
            "--tls-dir",
            default="",
            envvar=TLS_DIR_ENV,
            help=f"PKI folder with ca.pem and this component's <role>-<id>.pem/-key.pem (env {TLS_DIR_ENV}).",
        ),
        click.option("--ca", "tls_ca", default="", help="CA certificate (PEM) trusted for every peer."),
        click.option("--cert", "tls_cert", default="", help="This component's certificate (PEM)."),
        click.option("--key", "tls_key", default="", help="This component's private key (PEM)."),
        click.option(
            "--insecure",
            is_flag=True,
            default=False,
            help="Plaintext gRPC, no caller authentication (isolated development only).",
        ),
        click.option("--reflection", is_flag=True, default=False, help="Serve gRPC reflection (admins only)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def configure_from_cli(role: str, id: str, kwargs: dict[str, Any], hosts: Sequence[str] = ()) -> SecuritySettings:
    """Pops the :func:`security_options` values from ``kwargs``, configures the process, exits 2 when unusable."""
    import click

    try:
        settings = from_options(
            role,
            id,
            tls_dir=kwargs.pop("tls_dir", "") or None,
            ca=kwargs.pop("tls_ca", "") or None,
            cert=kwargs.pop("tls_cert", "") or None,
            key=kwargs.pop("tls_key", "") or None,
            insecure=bool(kwargs.pop("insecure", False)),
            reflection=bool(kwargs.pop("reflection", False)),
            hosts=hosts,
        )
    except EtcdRbacError as exc:  # etcd down while this process issues its own certificate under etcd auth
        click.echo(f"error: cannot issue this component's certificate: {exc}", err=True)
        raise SystemExit(1) from exc
    except (SecurityConfigError, OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from exc
    if not settings.secure:
        log.warning("running --insecure: plaintext gRPC and no caller authentication")
    configure(settings)
    return settings
