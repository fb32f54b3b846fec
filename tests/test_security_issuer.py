"""A child component gets its own certificate, never the CA key (``infra.security.issuer``).

Before, every ``llumnix serve`` child (and every llumlet a provider started) was given the PKI folder holding the CA
key and the etcd root certificate: a compromised llumlet could mint an admin or scheduler certificate. Now a
process that starts components hands each a folder with only the CA certificate and its own pair, and serve's
scheduler replicas ask serve (over a Unix socket that admits only their pids, for llumlet certificates only).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.issuer import ISSUER_ENV, IssuerError, IssuerServer, RemoteIssuer


@pytest.fixture
def pki(tmp_path: Path) -> ClusterSecurity:
    security = bootstrap_local(tmp_path / "pki", "c1")
    security.handout_root = tmp_path / "certs"
    return security


def assert_own_folder_only(folder: Path, stem: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(["ca.pem", "cluster", f"{stem}.pem", f"{stem}-key.pem"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / f"{stem}-key.pem").stat().st_mode) == 0o600


def test_hand_out_gives_a_folder_without_the_ca_key(pki: ClusterSecurity, tmp_path: Path) -> None:
    own = pki.hand_out("llumlet", "i-1")
    assert own.cert.parent == tmp_path / "certs" / "llumlet-i-1"
    assert_own_folder_only(own.cert.parent, "llumlet-i-1")
    assert own.ca.read_bytes() == pki.ca_cert.read_bytes()
    # the folder works as the child's --tls-dir, and it cannot issue from it
    settings = runtime.from_options("llumlet", "i-1", tls_dir=own.cert.parent, env={})
    assert settings.identity is not None and settings.identity.id == "i-1"
    assert settings.authority is None and settings.ensure("llumlet", "i-2") is None


def test_a_provider_hands_its_llumlet_its_own_files(pki: ClusterSecurity) -> None:
    """The local PKI's settings (the scheduler's) give a new llumlet flags naming its own files only."""
    settings = runtime.from_options("scheduler", "s0", tls_dir=pki.directory, env={})
    own = settings.ensure("llumlet", "auto-1")
    assert own is not None
    args = settings.child_args(own)
    assert args == ["--ca", str(own.ca), "--cert", str(own.cert), "--key", str(own.key)]
    assert own.cert.parent != pki.directory and not (own.cert.parent / "ca-key.pem").exists()


def test_the_issuer_serves_only_the_processes_it_admits_and_only_llumlets(pki: ClusterSecurity) -> None:
    admitted: set[int] = set()
    server = IssuerServer(pki.hand_out, admitted.__contains__).start()
    try:
        remote = RemoteIssuer(server.path, timeout=10)
        with pytest.raises(IssuerError, match=rf"pid {os.getpid()} may not ask"):
            remote.hand_out("llumlet", "i-1")
        assert not (pki.directory / "llumlet-i-1.pem").exists(), "a refused request issued nothing"
        admitted.add(os.getpid())
        own = remote.hand_out("llumlet", "i-1", ["10.1.2.3"])
        assert_own_folder_only(own.cert.parent, "llumlet-i-1")
        assert runtime.identity_of(own.cert).id == "i-1"
        for role in ("admin", "scheduler", "frontend", "etcd"):
            with pytest.raises(IssuerError, match="only llumlet"):
                remote.hand_out(role, "evil")
            assert not (pki.directory / f"{role}-evil.pem").exists()
        with pytest.raises(IssuerError, match="identity id"):
            remote.hand_out("llumlet", "../x")
    finally:
        server.close()
    assert not server.path.exists()


def test_the_issuer_socket_in_the_environment_makes_a_scheduler_an_authority(pki: ClusterSecurity) -> None:
    """serve's replicas hold no CA key: $LLUMNIX_CERT_ISSUER names where their providers ask."""
    own = pki.hand_out("scheduler", "s0")
    server = IssuerServer(pki.hand_out, lambda pid: pid == os.getpid()).start()
    try:
        settings = runtime.from_options("scheduler", "s0", tls_dir=own.cert.parent, env={ISSUER_ENV: str(server.path)})
        issued = settings.ensure("llumlet", "auto-2")
        assert issued is not None and runtime.identity_of(issued.cert).id == "auto-2"
        assert not (issued.cert.parent / "ca-key.pem").exists()
    finally:
        server.close()
