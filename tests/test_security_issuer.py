"""A child component gets its own certificate, never the CA key (``infra.security.issuer``).

Before, every ``llumnix serve`` child (and every llumlet a provider started) was given the PKI folder holding the CA
key and the etcd root certificate: a compromised llumlet could mint an admin or scheduler certificate. Now a
process that starts components hands each a folder with only the CA certificate and its own pair, and serve's
scheduler replicas ask serve (over a Unix socket that admits only their pids, for llumlet certificates only).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.issuer import (
    ISSUER_ENV,
    IssuerError,
    IssuerServer,
    RemoteIssuer,
    remove_stale_socket_dirs,
)


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
            remote.hand_out("llumlet", "auto-0000a1")
        assert not (pki.directory / "llumlet-auto-0000a1.pem").exists(), "a refused request issued nothing"
        admitted.add(os.getpid())
        own = remote.hand_out("llumlet", "auto-0000a1", ["10.1.2.3"])
        assert_own_folder_only(own.cert.parent, "llumlet-auto-0000a1")
        assert runtime.identity_of(own.cert).id == "auto-0000a1"
        for role in ("admin", "scheduler", "frontend", "etcd"):
            with pytest.raises(IssuerError, match="only llumlet"):
                remote.hand_out(role, "evil")
            assert not (pki.directory / f"{role}-evil.pem").exists()
        with pytest.raises(IssuerError, match="not issued here"):
            remote.hand_out("llumlet", "../x")
    finally:
        server.close()
    assert not server.path.exists()


def test_the_issuer_certifies_a_key_made_elsewhere_under_the_same_rules(pki: ClusterSecurity) -> None:
    """A Ray-placed llumlet makes its key on its node: serve's issuer signs its public key (llumlets only, provider
    ids only, to admitted processes only) and writes no key file; an issuer without ``certify`` says so."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    admitted = {os.getpid()}
    server = IssuerServer(pki.hand_out, admitted.__contains__, certify=pki.certify).start()
    try:
        remote = RemoteIssuer(server.path, timeout=10)
        ca_pem, cert_pem = remote.certify("llumlet", "ray-0000b1", ["10.1.2.4"], public)
        assert ca_pem == pki.ca_cert.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        assert (
            cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            == public
        )
        assert not list(pki.directory.rglob("llumlet-ray-0000b1*")), "no key or certificate file is written"
        with pytest.raises(IssuerError, match="only llumlet"):
            remote.certify("admin", "ray-0000b2", [], public)
        with pytest.raises(IssuerError, match="not issued here"):
            remote.certify("llumlet", "instance-0", [], public)
        from cryptography.hazmat.primitives.asymmetric import rsa

        rsa_public = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        with pytest.raises(IssuerError, match="only EC P-256"):
            remote.certify("llumlet", "ray-0000b3", [], rsa_public)
        with pytest.raises(IssuerError, match="not a PEM public key"):
            remote.certify("llumlet", "ray-0000b3", [], b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        admitted.clear()
        with pytest.raises(IssuerError, match="may not ask"):
            remote.certify("llumlet", "ray-0000b4", [], public)
    finally:
        server.close()
    plain = IssuerServer(pki.hand_out, lambda pid: True).start()
    try:
        with pytest.raises(IssuerError, match="certifies no public key"):
            RemoteIssuer(plain.path, timeout=10).certify("llumlet", "ray-0000b5", [], public)
    finally:
        plain.close()


def test_the_issuer_socket_in_the_environment_makes_a_scheduler_an_authority(pki: ClusterSecurity) -> None:
    """serve's replicas hold no CA key: $LLUMNIX_CERT_ISSUER names where their providers ask."""
    own = pki.hand_out("scheduler", "s0")
    server = IssuerServer(pki.hand_out, lambda pid: pid == os.getpid()).start()
    try:
        settings = runtime.from_options("scheduler", "s0", tls_dir=own.cert.parent, env={ISSUER_ENV: str(server.path)})
        issued = settings.ensure("llumlet", "auto-00000b")
        assert issued is not None and runtime.identity_of(issued.cert).id == "auto-00000b"
        assert not (issued.cert.parent / "ca-key.pem").exists()
    finally:
        server.close()


def test_the_issuer_gives_no_key_of_a_llumlet_it_did_not_start(pki: ClusterSecurity) -> None:
    """L2 (REVIEW10): a scheduler could obtain the key of any llumlet id, serve's own ``instance-0`` included, and
    impersonate that live llumlet. Now only ids a provider generates are issued, each to the process that first
    asked (which may ask again)."""
    pki.ensure("llumlet", "instance-0")  # serve's own llumlet
    server = IssuerServer(pki.hand_out, lambda pid: True)
    try:

        def ask(pid: int, id: str) -> dict[str, str]:
            return server.answer(pid, json.dumps({"role": "llumlet", "id": id}).encode())

        for id in ("instance-0", "auto-1", "f0", "auto-abc1234", "x-abc123"):
            assert "not issued here" in ask(100, id)["error"], id
        first = ask(100, "auto-abc123")
        assert "error" not in first and runtime.identity_of(Path(first["cert"])).id == "auto-abc123"
        assert ask(100, "auto-abc123") == first, "the same process may ask again (a retry)"
        assert "issued to another process" in ask(200, "auto-abc123")["error"]
        assert "error" not in ask(200, "ray-00ff00")
    finally:
        server.close()
    assert not Path(first["cert"]).parent.exists(), "the folders it handed out go with the issuer (L4)"


def test_processes_that_send_nothing_do_not_hold_issuer_threads(pki: ClusterSecurity) -> None:
    """L9 (REVIEW10): the issuer read a request before it checked the peer's pid, with no timeout: 300 idle
    connections from a refused process held 300 serve threads until they closed. Now a refused peer is answered at
    once, unread, and an admitted one that sends nothing is dropped after the read timeout."""
    admitted = False
    server = IssuerServer(pki.hand_out, lambda pid: admitted, read_timeout=0.5).start()
    socks: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(server.path))
            sock.settimeout(5)
            socks.append(sock)
            # No newline: the request never ends. The issuer answers a refused peer at once and closes, possibly
            # before this write (fresh-clone CI: BrokenPipeError); its answer still waits in this socket.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b'{"role": "llumlet"')
        for sock in socks:
            assert b"may not ask" in sock.recv(4096), "a refused peer is answered without its request"
        wait_for_threads(before)
        admitted = True
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(slow)
        slow.connect(str(server.path))
        slow.settimeout(5)
        slow.sendall(b'{"role": "llumlet"')
        t0 = time.monotonic()
        assert slow.recv(4096) == b"", "an admitted peer that never finishes its request is dropped"
        assert time.monotonic() - t0 < 3
        wait_for_threads(before)
    finally:
        for sock in socks:
            sock.close()
        server.close()


def wait_for_threads(count: int) -> None:
    deadline = time.monotonic() + 3
    while threading.active_count() > count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= count, f"{threading.active_count()} threads, {count} before"


def test_a_killed_issuers_socket_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    """L4 (REVIEW10): the socket folder in /tmp was removed only by close(); a SIGKILLed serve left it. Its name now
    carries the issuer's pid, and the next issuer removes those of processes that are gone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"llumnix-issuer-{gone.pid}-abc"
    live = tmp_path / f"llumnix-issuer-{os.getpid()}-def"
    other = tmp_path / "llumnix-issuer-xyz"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "issuer.sock").touch()
    remove_stale_socket_dirs(tmp_path)
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_a_refusal_answered_before_the_request_was_read_is_still_heard(pki: ClusterSecurity) -> None:
    """The issuer answers a process that may not ask before reading its request and closes; a client still sending
    then got EPIPE and reported "cannot ask the certificate issuer ... Broken pipe" (a CI run) instead of the refusal.
    A request larger than the socket's buffers makes that certain here."""
    server = IssuerServer(pki.hand_out, lambda pid: False).start()
    try:
        remote = RemoteIssuer(server.path, timeout=10)
        with pytest.raises(IssuerError, match="may not ask"):
            remote.hand_out("llumlet", "auto-0000c1", [f"host-{i:06d}.example" for i in range(40_000)])
    finally:
        server.close()
