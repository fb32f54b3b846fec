"""A local certificate authority (``cryptography``) and the component certificates every internal hop presents.

Each certificate names its holder in a SAN URI ``llumnix://<cluster>/<role>/<id>``: servers authorize callers by that
identity (``authz``), so a certificate is worth exactly one role in one cluster. Certificates also carry DNS/IP SANs
for the addresses their holder serves on, because gRPC clients verify the server's name against the target address.
Keys are EC P-256 (a handshake costs a fraction of RSA's) and are written with mode 0600 in a 0700 folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

URI_SCHEME = "llumnix"
ROLES = ("frontend", "scheduler", "llumlet", "admin", "client", "etcd")
# Roles whose holders only ever connect out: their certificates are not valid for serving.
CLIENT_ONLY_ROLES = frozenset({"admin", "client"})
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
ROLE_NAME_SUFFIX = "llumnix.invalid"
"""Serving certificates also name their role as a DNS name, ``<role>.llumnix.invalid`` (``.invalid``: reserved, never
resolved), and a component dialling a peer checks the peer's certificate against the role it expects to reach, not
the host: a llumlet's certificate (valid for its host's address) cannot pass for the scheduler on that host."""


def role_name(role: str) -> str:
    """The DNS name a serving certificate of ``role`` carries, and a client dialling that role checks for."""
    return f"{role}.{ROLE_NAME_SUFFIX}"


def host_names(cert: x509.Certificate) -> list[str]:
    """The IP addresses and DNS names ``cert`` is valid for, less role names (what a re-issue keeps)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    dns = [d for d in sans.get_values_for_type(x509.DNSName) if not d.endswith(f".{ROLE_NAME_SUFFIX}")]
    return [*ips, *dns]


def names_role(cert: x509.Certificate, role: str) -> bool:
    """Whether ``cert`` carries ``role``'s name (certificates issued before role-bound names do not)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return role_name(role) in sans.get_values_for_type(x509.DNSName)


_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")
# Certificates are back-dated a little so a peer whose clock is slightly behind still accepts a fresh one.
CLOCK_SKEW = datetime.timedelta(minutes=5)


class IdentityError(ValueError):
    """A certificate identity that is missing or malformed."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate belongs to: one component (role + id) of one cluster."""

    cluster: str
    role: str
    id: str

    def __post_init__(self) -> None:
        for what, value in (("cluster", self.cluster), ("role", self.role), ("id", self.id)):
            if not _SEGMENT.fullmatch(value):
                raise IdentityError(f"identity {what} must be non-empty letters, digits or ._~- : {value!r}")
        if self.role not in ROLES:
            raise IdentityError(f"unknown role {self.role!r}; roles: {', '.join(ROLES)}")

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.cluster}/{self.role}/{self.id}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Inverse of :attr:`uri`; raises IdentityError naming what is wrong."""
        prefix = f"{URI_SCHEME}://"
        if not uri.startswith(prefix):
            raise IdentityError(f"not a {URI_SCHEME}:// identity: {uri!r}")
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 3:
            raise IdentityError(f"identity must be {prefix}<cluster>/<role>/<id>: {uri!r}")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.role} {self.id} of cluster {self.cluster}"


def etcd_user_name(identity: Identity) -> str:
    """The common name of ``identity``'s certificate, which etcd takes as its user name: ``<role>-<id>``."""
    return f"{identity.role}-{identity.id}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Writes ``data`` readable by the owner only (created 0600, never briefly world-readable), atomically: a
    component reading its files while another process issues them never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _private_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts if h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class CertPaths:
    """Where one component's TLS files are: the CA certificate it trusts, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def key_pem(self) -> bytes:
        return self.key.read_bytes()


@dataclass(frozen=True)
class IssuedCert:
    """A component's certificate and key, in memory."""

    identity: Identity
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, directory: str | Path, ca_cert: Path, name: str | None = None) -> CertPaths:
        """Writes ``<name>.pem`` and ``<name>-key.pem`` (0600) next to nothing else; ``name`` defaults to role-id."""
        d = _private_dir(Path(directory))
        stem = name or f"{self.identity.role}-{self.identity.id}"
        cert_path, key_path = d / f"{stem}.pem", d / f"{stem}-key.pem"
        _write_private(key_path, self.key_pem)
        _write_private(cert_path, self.cert_pem)  # after the key: a cert that exists has its key
        return CertPaths(ca=ca_cert, cert=cert_path, key=key_path)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA key and its self-signed certificate; issues component certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "llumnix local CA", *, days: int = 3650) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: the CA key must be an EC key")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Writes ``ca.pem`` and ``ca-key.pem`` (0600); returns both paths."""
        d = _private_dir(Path(directory))
        cert_path, key_path = d / "ca.pem", d / "ca-key.pem"
        _write_private(key_path, _key_pem(self.key))
        cert_path.write_bytes(self.cert_pem)
        return cert_path, key_path

    def issue(
        self,
        identity: Identity,
        hosts: Iterable[str] = DEFAULT_HOSTS,
        *,
        days: float = 365,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> IssuedCert:
        """A certificate for ``identity`` valid for ``hosts`` (IPs and DNS names it serves on).

        ``not_before``/``not_after`` override the validity window (tests issue expired certificates with them).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(identity, key.public_key(), hosts, days, not_before, not_after)
        return IssuedCert(identity, cert, key)

    def certify(self, identity: Identity, public_key_pem: bytes, hosts: Iterable[str] = DEFAULT_HOSTS) -> bytes:
        """The certificate (PEM) of a key made elsewhere: only its public part comes here, so the private key never
        leaves the machine that runs the component (a Ray-placed llumlet's node). Only P-256 keys, as :meth:`issue`'s.
        """
        try:
            public = serialization.load_pem_public_key(public_key_pem)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IdentityError(f"not a PEM public key (of a supported kind): {exc}") from exc
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
            raise IdentityError("only EC P-256 public keys are certified")
        return self._sign(identity, public, hosts, 365, None, None).public_bytes(serialization.Encoding.PEM)

    def _sign(
        self,
        identity: Identity,
        public: ec.EllipticCurvePublicKey,
        hosts: Iterable[str],
        days: float,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
    ) -> x509.Certificate:
        now = _now()
        start = not_before or now - CLOCK_SKEW
        end = not_after or now + datetime.timedelta(days=days)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.role not in CLIENT_ONLY_ROLES:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                # etcd takes the CN as the user name when client-cert auth meets etcd's own auth (infra.etcd.rbac):
                # role and id, so a llumlet and a scheduler of the same id are different etcd users.
                x509.NameAttribute(NameOID.COMMON_NAME, etcd_user_name(identity)),
            ]
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri), *_san_entries(hosts)]
        if identity.role not in CLIENT_ONLY_ROLES:
            sans.append(x509.DNSName(role_name(identity.role)))
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert


def identities_in(cert: x509.Certificate) -> list[Identity]:
    """Every well-formed ``llumnix://`` identity among a certificate's SAN URIs."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[Identity] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            out.append(Identity.parse(uri))
        except IdentityError:
            continue
    return out
