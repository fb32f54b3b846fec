"""Handing a child component its certificate without handing it the CA.

A process that starts components (``llumnix serve``, a scheduler's instance provider) gives each child only what it
needs: a folder holding the CA certificate (to trust peers), the child's own certificate and key, and the cluster
name; never the CA key (with it a compromised child could mint an admin or a scheduler certificate) nor the etcd
root certificate (with it, bypass etcd's per-component roles). :func:`hand_out` writes such a folder.

``llumnix serve`` holds the CA itself and issues every certificate: the llumlets a scheduler replica's provider starts
(autoscaling, ``llmctl scale``) are issued through :class:`IssuerServer`, a Unix socket serve listens on, which only
serve's own scheduler processes may ask (checked by the asking process's pid, ``SO_PEERCRED``), and only for llumlet
certificates; the replica finds it in ``$LLUMNIX_CERT_ISSUER`` and asks through :class:`RemoteIssuer`.

The children run as serve's user, so this is least privilege, not isolation: what the children are given (their
flags, environment and folders) names no CA key, but a process of the same user that goes looking may still read
serve's PKI folder. Run components as separate users (or on separate hosts, as in the README's multi-host setup) for
a boundary.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pyllumnix.infra.security.ca import CertPaths, Identity, _private_dir, _write_private

log = logging.getLogger(__name__)

ISSUER_ENV = "LLUMNIX_CERT_ISSUER"
"""The Unix socket of ``llumnix serve``'s issuer, given to its scheduler replicas only."""
CLUSTER_FILE = "cluster"
ISSUABLE_ROLES = frozenset({"llumlet"})
"""What a remote issuer hands out: a provider starts llumlets, nothing else."""
ISSUABLE_IDS = re.compile(r"(?:auto|ray)-[0-9a-f]{6}")
"""The ids a provider generates (``<id_prefix>-<6 hex>``, the local and Ray providers' prefixes): never serve's own
``instance-N`` nor any other component's id, so a scheduler cannot obtain the key of a llumlet it did not start."""
REQUEST_LIMIT = 64 * 1024
TIMEOUT_S = 60.0  # issuing under etcd auth creates the certificate's etcd user first (a few etcdctl calls)
READ_TIMEOUT_S = 5.0
"""How long an admitted process has to send its request: a slow or idle peer cannot hold a server thread."""
SOCKET_DIR_PREFIX = "llumnix-issuer-"


class IssuerError(Exception):
    """A certificate could not be issued (the message says why)."""


class CertificateIssuer(Protocol):
    """What may issue a child's certificate: a local PKI holding the CA key, or serve's issuer over its socket."""

    def hand_out(self, role: str, id: str, hosts: Sequence[str] = ()) -> CertPaths:
        """The child's own files (CA certificate, its certificate and key) in a folder without the CA key."""
        ...

    def certify(self, role: str, id: str, hosts: Sequence[str], public_key_pem: bytes) -> tuple[bytes, bytes]:
        """(CA certificate, certificate) PEMs for a key the child made where it runs: its private key never travels
        (a Ray-placed llumlet's node)."""
        ...


def hand_out(ca_cert: Path, own: CertPaths, role: str, id: str, cluster: str, root: Path) -> CertPaths:
    """Copies the CA certificate and a component's certificate and key into ``root/<role>-<id>/`` (0700; the key
    0600) with the cluster file, so the folder works as the child's ``--tls-dir`` and holds nothing else."""
    Identity(cluster, role, id)  # a malformed id names no folder
    folder = _private_dir(_private_dir(root) / f"{role}-{id}")
    os.chmod(folder, 0o700)
    stem = f"{role}-{id}"
    paths = CertPaths(folder / "ca.pem", folder / f"{stem}.pem", folder / f"{stem}-key.pem")
    _write_private(paths.key, own.key.read_bytes())
    _write_private(paths.cert, own.cert.read_bytes())  # after the key: a cert that exists has its key
    _write_private(paths.ca, ca_cert.read_bytes())
    _write_private(folder / CLUSTER_FILE, (cluster + "\n").encode())
    return paths


def _peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``: pid, uid, gid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        issuer = self.server.issuer
        self.request.settimeout(issuer.read_timeout)  # the request's read and the reply's write
        try:
            pid = _peer_pid(self.request)
            # The peer's pid first: a process that may not ask is answered before anything is read from it.
            reply = issuer.refusal(pid)
            if reply is None:
                try:
                    line = self.rfile.readline(REQUEST_LIMIT)
                except TimeoutError:
                    log.warning("pid %d sent no certificate request within %.3g s; closing", pid, issuer.read_timeout)
                    return
                reply = issuer.answer(pid, line)
        except Exception as exc:  # never let a request take the server down; say what failed
            log.exception("certificate request failed")
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            return  # the peer left (or does not read): nothing to tell it


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 64  # a burst of connections does not make a provider's request fail at once (EAGAIN)

    def __init__(self, path: str, issuer: IssuerServer) -> None:
        self.issuer = issuer
        super().__init__(path, _Handler)


class IssuerServer:
    """Issues llumlet certificates for the processes ``may_ask`` admits (by pid), on a Unix socket in a private
    temporary folder. ``issue(role, id, hosts)`` does the work (serve's: its PKI's ``hand_out``, which also gives the
    certificate its etcd user); it is called from the server's threads, one request at a time. Only ids of the
    ``ids`` pattern are issued, each to the first process that asked for it (that one may ask again).

    The folder's name carries this process's pid: one a SIGKILLed serve left behind is removed by the next issuer
    started (its pid is gone), since nothing else would. ``close`` removes the folders it handed out too: serve
    closes it after its schedulers stopped, and with them (``--stop-instances-on-exit``) the llumlets they started."""

    def __init__(
        self,
        issue: Callable[[str, str, Sequence[str]], CertPaths],
        may_ask: Callable[[int], bool],
        *,
        certify: Callable[[str, str, Sequence[str], bytes], tuple[bytes, bytes]] | None = None,
        ids: re.Pattern[str] = ISSUABLE_IDS,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        self._issue = issue
        self._certify = certify
        self._may_ask = may_ask
        self._ids = ids
        self.read_timeout = read_timeout
        self._issued: dict[str, int] = {}  # id -> the pid it was issued to
        self._folders: set[Path] = set()  # the folders handed out
        self._lock = threading.Lock()
        remove_stale_socket_dirs()
        # 0700, and a socket path short enough for AF_UNIX (a log folder may be too deep)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-"))
        self.path = self._dir / "issuer.sock"
        self._server = _Server(str(self.path), self)
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="cert-issuer", daemon=True)

    def start(self) -> IssuerServer:
        self._thread.start()
        return self

    def refusal(self, pid: int) -> dict[str, Any] | None:
        """The answer to a process that may not ask (None: it may)."""
        if self._may_ask(pid):
            return None
        log.warning("refused a certificate request from pid %d: not a process allowed to ask", pid)
        return {"error": f"pid {pid} may not ask for certificates"}

    def answer(self, pid: int, line: bytes) -> dict[str, Any]:
        refused = self.refusal(pid)
        if refused is not None:
            return refused
        try:
            request = json.loads(line)
            role, id, hosts = str(request["role"]), str(request["id"]), [str(h) for h in request.get("hosts", [])]
            public_key = request.get("public_key")
            public_key = None if public_key is None else str(public_key).encode()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return {"error": f"malformed request ({exc})"}
        if public_key is not None and self._certify is None:
            return {"error": "this issuer certifies no public key (it hands out key files only)"}
        if role not in ISSUABLE_ROLES:
            log.warning("refused a %s certificate to pid %d: only llumlets are issued here", role, pid)
            return {"error": f"a {role} certificate is not issued here (only {', '.join(sorted(ISSUABLE_ROLES))})"}
        if not self._ids.fullmatch(id):
            log.warning("refused the certificate of %s %r to pid %d: not an id a provider generates", role, id, pid)
            return {
                "error": f"{role} id {id!r} is not issued here (only ids a provider generates: {self._ids.pattern})"
            }
        with self._lock:
            owner = self._issued.get(id)
            if owner is not None and owner != pid:
                log.warning("refused the certificate of %s %s to pid %d: issued to pid %d", role, id, pid, owner)
                return {"error": f"{role} {id} was issued to another process"}
            if public_key is not None:
                assert self._certify is not None
                try:
                    ca_pem, cert_pem = self._certify(role, id, hosts, public_key)
                except ValueError as exc:  # not a P-256 public key (IdentityError): the asker's mistake, no traceback
                    log.warning("refused to certify %s %s for pid %d: %s", role, id, pid, exc)
                    return {"error": str(exc)}
                self._issued[id] = pid
                log.info("certified the key of %s %s for pid %d", role, id, pid)
                return {"ca_pem": ca_pem.decode(), "cert_pem": cert_pem.decode()}
            paths = self._issue(role, id, hosts)
            self._issued[id] = pid
            self._folders.add(paths.cert.parent)
        log.info("issued the certificate of %s %s for pid %d", role, id, pid)
        return {"ca": str(paths.ca), "cert": str(paths.cert), "key": str(paths.key)}

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)
        with self._lock:
            for folder in self._folders:
                shutil.rmtree(folder, ignore_errors=True)
            self._folders.clear()


def remove_stale_socket_dirs(root: Path | None = None) -> None:
    """Removes the socket folders of issuers whose process is gone (serve killed before ``close``): this user's
    ``llumnix-issuer-<pid>-*`` folders under ``root`` (the temporary folder) whose pid no longer runs."""
    root = Path(tempfile.gettempdir()) if root is None else root
    for folder in root.glob(f"{SOCKET_DIR_PREFIX}*-*"):
        pid = folder.name[len(SOCKET_DIR_PREFIX) :].partition("-")[0]
        try:
            if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by an issuer that is gone", folder)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # alive under another user (EPERM), or the folder went meanwhile


class RemoteIssuer:
    """Asks ``llumnix serve``'s :class:`IssuerServer` (at ``path``) for a child's certificate (blocking)."""

    def __init__(self, path: str | Path, timeout: float = TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def hand_out(self, role: str, id: str, hosts: Sequence[str] = ()) -> CertPaths:
        reply = self._ask(role, id, {"role": role, "id": id, "hosts": list(hosts)})
        return CertPaths(Path(reply["ca"]), Path(reply["cert"]), Path(reply["key"]))

    def certify(self, role: str, id: str, hosts: Sequence[str], public_key_pem: bytes) -> tuple[bytes, bytes]:
        ask = {"role": role, "id": id, "hosts": list(hosts), "public_key": public_key_pem.decode()}
        reply = self._ask(role, id, ask)
        if not isinstance(reply.get("ca_pem"), str) or not isinstance(reply.get("cert_pem"), str):
            raise IssuerError(f"the certificate issuer at {self.path} certified no key for {role} {id} (an older one?)")
        return str(reply["ca_pem"]).encode(), str(reply["cert_pem"]).encode()

    def _ask(self, role: str, id: str, ask: dict[str, Any]) -> dict[str, Any]:
        """One request to the issuer and its answer; IssuerError when it cannot be asked or refuses."""
        request = json.dumps(ask).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                try:
                    sock.sendall(request)
                except BrokenPipeError:
                    pass  # refused before the request was read (a process that may not ask): its answer is waiting
                with sock.makefile("rb") as replies:
                    line = replies.readline(REQUEST_LIMIT)
        except OSError as exc:
            raise IssuerError(f"cannot ask the certificate issuer at {self.path} for {role} {id}: {exc}") from exc
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise IssuerError(f"the certificate issuer at {self.path} gave no answer for {role} {id}") from exc
        if "error" in reply:
            raise IssuerError(f"the certificate issuer refused {role} {id}: {reply['error']}")
        return dict(reply)


def without_issuer(env: Iterable[tuple[str, str]]) -> dict[str, str]:
    """An environment for a child that must not ask for certificates (a llumlet): the issuer's socket removed."""
    return {k: v for k, v in env if k != ISSUER_ENV}
