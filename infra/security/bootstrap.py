"""Secure by default for a local cluster: a throwaway CA, a certificate per component, the token secret, an admin key.

``llumnix serve`` calls :func:`bootstrap_local` for its folder (reusing the CA and certificates already there, so a
restart keeps working), starts etcd with the ``etcd`` certificates, then :func:`provision_admin` creates an admin API
key (hashed in etcd) and writes the client context file so ``llmctl`` works with no flags. New components (llumlets
started by the autoscaler) get certificates from :meth:`ClusterSecurity.ensure`. Between etcd's start and the first
component, :meth:`ClusterSecurity.enable_etcd_rbac` turns on etcd auth with a user and role per certificate, so each
component reaches only its own keys; certificates issued after that get theirs in ``ensure``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.rbac import EtcdAuthAdmin, EtcdRbacError, grants_for, user_of
from pyllumnix.infra.security import issuer
from pyllumnix.infra.security.apikeys import ApiKeyStore
from pyllumnix.infra.security.ca import (
    CLIENT_ONLY_ROLES,
    DEFAULT_HOSTS,
    CertificateAuthority,
    CertPaths,
    Identity,
    _write_private,
    etcd_user_name,
    host_names,
    identities_in,
    names_role,
)
from pyllumnix.infra.security.context import ClientContext, save_context
from pyllumnix.infra.security.tokens import new_secret

SECRET_FILE = "cluster-secret"
CLUSTER_FILE = "cluster"
"""The folder names its cluster (its certificates' trust domain): a component given only the folder knows it."""
RBAC_FILE = "etcd-rbac.json"
"""Present while the folder's etcd enforces per-component roles (``enable_etcd_rbac``): where that etcd is and which
key prefix, so each certificate issued from now on gets its etcd user and role at once."""

log = logging.getLogger(__name__)


@dataclass
class ClusterSecurity:
    """A cluster's security folder: ``ca.pem``/``ca-key.pem``, ``<role>-<id>.pem``/``-key.pem``, the token secret."""

    directory: Path
    cluster: str
    hosts: tuple[str, ...] = DEFAULT_HOSTS
    issued: dict[Identity, CertPaths] = field(default_factory=dict)
    handout_root: Path | None = None
    """Where :meth:`hand_out` puts each child's folder (default: ``issued/`` in this folder)."""

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def secret_path(self) -> Path:
        return self.directory / SECRET_FILE

    def secret(self) -> bytes:
        """The cluster secret for capability and transfer tokens (frontends and llumlets' destinations need it)."""
        return self.secret_path.read_bytes()

    def authority(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_cert, self.ca_key)

    def paths(self, role: str, id: str) -> CertPaths:
        """The files of a component that already has a certificate here."""
        identity = Identity(self.cluster, role, id)
        cached = self.issued.get(identity)
        if cached is not None:
            return cached
        p = CertPaths(self.ca_cert, self.directory / f"{role}-{id}.pem", self.directory / f"{role}-{id}-key.pem")
        if not (p.cert.exists() and p.key.exists()):
            raise FileNotFoundError(f"no certificate for {identity} in {self.directory}; call ensure() first")
        self.issued[identity] = p
        return p

    def ensure(self, role: str, id: str, hosts: Iterable[str] = ()) -> CertPaths:
        """The component's files, issuing its certificate first if it has none (``hosts`` added to the defaults), or
        if the one it has predates role-bound names (:data:`~pyllumnix.infra.security.ca.ROLE_NAME_SUFFIX`; its
        peers would refuse it): a PKI folder kept from an earlier version keeps working."""
        identity = Identity(self.cluster, role, id)
        try:
            existing = self.paths(role, id)
        except FileNotFoundError:
            existing = None
        kept: list[str] = []
        if existing is not None:
            # etcd's certificate is checked for its host only (etcd clients may trust an operator's CA): kept as is.
            if role in CLIENT_ONLY_ROLES or role == "etcd":
                return existing
            old = x509.load_pem_x509_certificate(existing.cert_pem())
            if names_role(old, role):
                return existing
            log.info("re-issuing the certificate of %s: it predates role-bound names", identity)
            self.issued.pop(identity, None)
            kept = host_names(old)  # the names peers already dial it by
        issued = self.authority().issue(identity, [*self.hosts, *kept, *hosts])
        rbac = self._rbac() if existing is None else None  # a re-issue keeps the CN: its etcd user exists
        if rbac is not None:
            # Before the certificate exists: under etcd auth a user etcd does not know is refused everything, and a
            # failure here leaves no certificate behind, so the next ensure() tries again.
            admin, layout = rbac
            admin.ensure_component(etcd_user_name(identity), grants_for(role, id, layout))
        paths = issued.write(self.directory, self.ca_cert)
        self.issued[identity] = paths
        return paths

    def hand_out(self, role: str, id: str, hosts: Sequence[str] = ()) -> CertPaths:
        """A child component's files, issued here if need be, copied into a folder of its own with the CA
        certificate and without the CA key (``infra.security.issuer``): what a process that starts components hands
        each of them."""
        own = self.ensure(role, id, hosts)
        root = self.handout_root or self.directory / "issued"
        return issuer.hand_out(self.ca_cert, own, role, id, self.cluster, root)

    def certify(self, role: str, id: str, hosts: Sequence[str], public_key_pem: bytes) -> tuple[bytes, bytes]:
        """(CA certificate, certificate) PEMs for a key the component made on its own machine (a Ray-placed
        llumlet): with its etcd user under etcd auth, as :meth:`ensure`; no key is made or written here."""
        identity = Identity(self.cluster, role, id)
        cert = self.authority().certify(identity, public_key_pem, [*self.hosts, *hosts])  # a bad key: no etcd user
        rbac = self._rbac()
        if rbac is not None:
            admin, layout = rbac
            admin.ensure_component(etcd_user_name(identity), grants_for(role, id, layout))
        return self.ca_cert.read_bytes(), cert

    @property
    def rbac_path(self) -> Path:
        return self.directory / RBAC_FILE

    def _root_admin(self, endpoints: list[str]) -> EtcdAuthAdmin:
        """etcdctl as the etcd members' certificate, whose user holds etcd's root role."""
        root = self.paths("etcd", "etcd")
        return EtcdAuthAdmin(endpoints, self.ca_cert, root.cert, root.key)

    def _rbac(self) -> tuple[EtcdAuthAdmin, KeyLayout] | None:
        try:
            spec = json.loads(self.rbac_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise EtcdRbacError(
                f"{self.rbac_path} is unreadable ({exc}): cannot give a new certificate its etcd user"
            ) from exc
        return self._root_admin(list(spec["endpoints"])), KeyLayout(str(spec["cluster"]))

    def enable_etcd_rbac(self, endpoints: list[str], layout: KeyLayout) -> list[str]:
        """Switches on etcd auth with a user and role per certificate in this folder (see ``infra.etcd.rbac``), and
        notes it so later certificates get theirs when issued. Idempotent: a restart of serve on the same etcd data
        finds the users and auth on. Returns the users set up."""
        admin = self._root_admin(endpoints)
        users = []
        for cert in sorted(self.directory.glob("*.pem")):
            if cert.name == "ca.pem" or cert.name.endswith("-key.pem"):
                continue
            identities = identities_in(x509.load_pem_x509_certificate(cert.read_bytes()))
            if len(identities) != 1 or identities[0].cluster != self.cluster or identities[0].role == "etcd":
                continue
            identity = identities[0]
            user = user_of(cert)
            admin.ensure_component(user, grants_for(identity.role, identity.id, layout))
            users.append(user)
        admin.enable([user_of(self.paths("etcd", "etcd").cert)])
        _write_private(self.rbac_path, json.dumps({"endpoints": endpoints, "cluster": layout.cluster}).encode())
        log.info("etcd auth on at %s: a role per component for %d certificates", ", ".join(endpoints), len(users))
        return users


DEFAULT_COMPONENTS: Mapping[str, Sequence[str]] = {
    "etcd": ("etcd",),
    "scheduler": ("s0", "s1"),
    "frontend": ("f0",),
    "admin": ("admin",),
    "client": ("client",),
}


def bootstrap_local(
    directory: str | Path,
    cluster: str = "llumnix",
    *,
    components: Mapping[str, Sequence[str]] = DEFAULT_COMPONENTS,
    llumlets: Sequence[str] = (),
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> ClusterSecurity:
    """Creates (or reuses) the CA, the token secret and a certificate for every named component."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    security = ClusterSecurity(d, cluster, tuple(dict.fromkeys(hosts)))
    if not (security.ca_cert.exists() and security.ca_key.exists()):
        CertificateAuthority.create(f"llumnix {cluster} local CA").write(d)
    if not security.secret_path.exists():
        _write_private(security.secret_path, new_secret())
    cluster_file = d / CLUSTER_FILE
    if not cluster_file.exists() or cluster_file.read_text().strip() != cluster:
        cluster_file.write_text(cluster + "\n")
    wanted = {role: list(ids) for role, ids in components.items()}
    wanted.setdefault("llumlet", []).extend(llumlets)
    for role, ids in wanted.items():
        for id in ids:
            security.ensure(role, id)
    return security


async def provision_admin(
    security: ClusterSecurity,
    store: ApiKeyStore,
    *,
    context_path: str | Path | None = None,
    context_name: str | None = None,
    scheduler: Sequence[str] = (),
    frontend: Sequence[str] = (),
    http: str = "",
    etcd: Sequence[str] = (),
    admin_id: str = "admin",
) -> tuple[str, Path]:
    """Creates an admin API key (replacing an earlier one of the same name) and writes the context file.

    Returns the key (shown once) and the context file's path.
    """
    name = f"{admin_id}@{security.cluster}"
    if any(k.name == name for k in await store.list()):
        await store.revoke(name)
    key, _ = await store.create(name, "admin")
    paths = security.ensure("admin", admin_id)
    ctx = ClientContext(
        name=context_name or security.cluster,
        cluster=security.cluster,
        scheduler=list(scheduler),
        frontend=list(frontend),
        http=http,
        etcd=list(etcd),
        ca=paths.ca,
        cert=paths.cert,
        key=paths.key,
        api_key=key,
    )
    return key, save_context(ctx, context_path)
