"""The cluster under the drill: the processes it started (``LocalCluster``) and what it asks the cluster
(``Observer``: the leader, the instances, each llumlet's blocks).

Every process the drill starts is a child it knows by PID: schedulers, llumlets and the frontend through
:class:`~pyllumnix.tools.launch.Launcher`, etcd members through :class:`EmbeddedEtcd`. Stalls are SIGSTOP/SIGCONT of
those PIDs; ``stop`` continues whatever is stopped and ends everything, also after a failure or Ctrl-C.
Schedulers and the frontend get fixed ports, so a restarted one is reachable where it was before (the frontend's
``--scheduler`` list stays valid); a restarted llumlet gets a new port and re-registers its address.

Secure by default, as ``llumnix serve``: a local PKI in ``<log_dir>/pki`` (components talk mutual TLS with role
checks) and, once the cluster is up, an admin API key and a client context file (``<log_dir>/context.yaml``) that the
drill's own clients use (:meth:`LocalCluster.credentials`), so the faults are judged on the production path.
``ClusterOptions.secure=False`` (``llumnix drill --insecure``) runs every component ``--insecure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from pyllumnix.infra.etcd.embedded import EmbeddedEtcd, EtcdServerTls, free_port
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
)
from pyllumnix.tools.drill.credentials import PLAINTEXT, Credentials, from_context
from pyllumnix.tools.launch import Component, Launcher

# Short reconnect backoff: a restarted component must be seen as soon as it listens, not after grpc's 1-120 s backoff.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass
class ClusterOptions:
    log_dir: Path
    schedulers: int = 2
    llumlets: int = 3
    etcd_members: int = 1
    profile: str = "llama-7b-a10"
    # A small KV payload keeps the sim engine fast on a small machine (the latency model is unchanged).
    bytes_per_token: int = 64
    transport: str = "tcp"
    cluster: str = "drill"
    start_timeout: float = 120.0
    secure: bool = True


class LocalCluster:
    """etcd, scheduler replicas, llumlets and a frontend, each a child process of the drill."""

    def __init__(self, opts: ClusterOptions) -> None:
        self.opts = opts
        self.launcher = Launcher(
            opts.log_dir,
            secure=opts.secure,
            pki_dir=opts.log_dir / "pki" if opts.secure else None,
            cluster=opts.cluster,
        )
        self.context_path: Path | None = None
        self.etcd: EmbeddedEtcd | None = None
        self.scheduler_ports = {f"scheduler-{i}": free_port() for i in range(opts.schedulers)}
        self.llumlet_ports = {f"instance-{i}": free_port() for i in range(opts.llumlets)}
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.schedulers: dict[str, Component] = {}
        self.llumlets: dict[str, Component] = {}
        self.frontend: Component | None = None
        self._starts: dict[str, int] = {}
        self._paused: set[tuple[int, bool]] = set()
        self._lock = threading.Lock()
        self._etcd_pids_seen: set[int] = set()

    # addresses -------------------------------------------------------------------------------------------------
    @property
    def scheduler_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.scheduler_ports.values()]

    def scheduler_address(self, replica_id: str) -> str:
        return f"127.0.0.1:{self.scheduler_ports[replica_id]}"

    @property
    def frontend_grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def frontend_http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def etcd_endpoints(self) -> str:
        """The endpoints as components are given them: ``https://`` when etcd serves TLS (a secure drill)."""
        assert self.etcd is not None
        scheme = "https://" if self.etcd.tls is not None else ""
        return ",".join(scheme + e for e in self.etcd.endpoints)

    # starting ---------------------------------------------------------------------------------------------------
    def _common(self) -> list[str]:
        return ["--etcd", self.etcd_endpoints, "--cluster", self.opts.cluster]

    def _start(self, name: str, *args: str) -> Component:
        with self._lock:
            n = self._starts.get(name, 0)
            self._starts[name] = n + 1
        log_name = name if n == 0 else f"{name}.restart{n}"
        return self.launcher.start(log_name, *args, timeout=self.opts.start_timeout)

    def start_scheduler(self, replica_id: str) -> Component:
        comp = self._start(
            replica_id,
            "scheduler",
            *self._common(),
            "--replica-id",
            replica_id,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.scheduler_ports[replica_id]),
            "--provider",
            "none",
        )
        self.schedulers[replica_id] = comp
        return comp

    def start_llumlet(self, instance_id: str, *, new_port: bool = False) -> Component:
        """``new_port``: a restarted llumlet listens elsewhere, as a replacement instance would (the drill judges each
        fault on its own; a restart on the old address is a separate question)."""
        if new_port:
            self.llumlet_ports[instance_id] = free_port()
        comp = self._start(
            instance_id,
            "llumlet",
            *self._common(),
            "--instance-id",
            instance_id,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.llumlet_ports[instance_id]),
            "--engine",
            "sim",
            "--profile",
            self.opts.profile,
            "--bytes-per-token",
            str(self.opts.bytes_per_token),
            "--transport",
            self.opts.transport,
        )
        self.llumlets[instance_id] = comp
        return comp

    def start_frontend(self) -> Component:
        from pyllumnix.data_plane.engine.profile import get_profile

        comp = self._start(
            "frontend",
            "frontend",
            *self._common(),
            "--scheduler",
            ",".join(self.scheduler_addresses),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--model",
            self.opts.profile,
            "--max-model-len",
            str(get_profile(self.opts.profile).max_model_len),
        )
        self.frontend = comp
        return comp

    def start(self) -> None:
        """Starts everything (blocking); llumlets start side by side. Raises LaunchError with the failing log."""
        self.etcd = EmbeddedEtcd(self.opts.etcd_members, tls=self._etcd_tls()).start()
        self.etcd_pids()
        with ThreadPoolExecutor(max_workers=max(self.opts.llumlets, self.opts.schedulers)) as pool:
            list(pool.map(self.start_scheduler, self.scheduler_ports))
            list(pool.map(self.start_llumlet, self.llumlet_ports))
        self.start_frontend()
        if self.opts.secure:
            self.context_path = asyncio.run(self._provision_admin())

    def _etcd_tls(self) -> EtcdServerTls | None:
        """A secure drill runs etcd as ``serve`` does: TLS with client-certificate auth from the drill's PKI, so the
        hop to the registry is authenticated too (None with ``--insecure``)."""
        if not self.opts.secure:
            return None
        pki = self.launcher.pki
        assert pki is not None
        server = pki.ensure("etcd", "etcd")
        health = pki.ensure("admin", "admin")
        return EtcdServerTls(server.ca, server.cert, server.key, health.cert, health.key)

    async def _provision_admin(self) -> Path:
        """An admin API key (hashed in etcd) and the client context file naming this cluster, as ``serve`` writes."""
        from pyllumnix.infra.etcd.client import EtcdClient
        from pyllumnix.infra.etcd.keys import KeyLayout
        from pyllumnix.infra.security.apikeys import ApiKeyStore
        from pyllumnix.infra.security.bootstrap import provision_admin

        assert self.etcd is not None and self.launcher.pki is not None
        async with EtcdClient(self.etcd.endpoints, tls=self.etcd.client_tls()) as etcd:
            _, path = await provision_admin(
                self.launcher.pki,
                ApiKeyStore(etcd, KeyLayout(self.opts.cluster)),
                context_path=self.opts.log_dir / "context.yaml",
                context_name=f"drill-{self.opts.cluster}",
                scheduler=self.scheduler_addresses,
                frontend=[self.frontend_grpc],
                http=self.frontend_http,
                etcd=self.etcd_endpoints.split(","),
            )
        return path

    def credentials(self) -> Credentials:
        """How the drill's clients reach this cluster: the admin context's mutual TLS and API key (plaintext when the
        cluster runs ``--insecure``)."""
        if self.context_path is None:
            return PLAINTEXT
        creds, _ = from_context(str(self.context_path), None)
        return creds

    # signals ----------------------------------------------------------------------------------------------------
    def pause(self, pid: int, *, group: bool = False) -> None:
        """SIGSTOP a process the drill started (``group``: its whole process group, a launched component's)."""
        with self._lock:
            self._paused.add((pid, group))
        (os.killpg if group else os.kill)(pid, signal.SIGSTOP)

    def resume(self, pid: int, *, group: bool = False) -> None:
        with self._lock:
            self._paused.discard((pid, group))
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(pid, signal.SIGCONT)

    def etcd_pids(self) -> list[int]:
        assert self.etcd is not None
        pids = [m.process.pid for m in self.etcd.members if m.process is not None and m.running]
        self._etcd_pids_seen.update(pids)
        return pids

    def started_pids(self) -> list[int]:
        """Every process the drill started (components and etcd members, restarts included)."""
        pids = [c.pid for c in self.launcher.components]
        if self.etcd is not None:
            pids += self._etcd_pids_seen
        return sorted(set(pids))

    def exited_llumlets(self) -> list[str]:
        return sorted(iid for iid, comp in self.llumlets.items() if not comp.alive())

    # stopping ---------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Continues every stopped process, then ends all of them (reverse start order, etcd last)."""
        with self._lock:
            paused = list(self._paused)
            self._paused.clear()
        for pid, group in paused:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if group else os.kill)(pid, signal.SIGCONT)
        try:
            self.launcher.stop_all(timeout=5.0)
        finally:
            if self.etcd is not None:
                self.etcd.stop()


@dataclass(frozen=True)
class LeaderSeen:
    replica_id: str
    address: str
    term: int


class Observer:
    """Read-only questions to the control plane; every call has a short deadline and returns None when unanswered."""

    def __init__(self, schedulers: Sequence[str], timeout: float = 0.5, credentials: Credentials = PLAINTEXT) -> None:
        self.schedulers = list(schedulers)
        self.timeout = timeout
        self.credentials = credentials
        self._md = credentials.call_metadata()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str, peer: str = "scheduler") -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self.credentials.channel(address, CHANNEL_OPTIONS, peer=peer)
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def get_leader(self, address: str) -> admin_pb2.GetLeaderResponse | None:
        try:
            stub = admin_pb2_grpc.AdminServiceStub(self._channel(address))
            request = admin_pb2.GetLeaderRequest()
            reply: admin_pb2.GetLeaderResponse = await stub.GetLeader(request, timeout=self.timeout, metadata=self._md)
        except grpc.aio.AioRpcError:
            return None
        return reply

    async def leaders(self, addresses: Sequence[str] | None = None) -> list[LeaderSeen]:
        """Every replica that answers that it leads now (two means a split brain)."""
        addrs = list(addresses if addresses is not None else self.schedulers)
        replies = await asyncio.gather(*(self.get_leader(a) for a in addrs))
        return [
            LeaderSeen(r.answered_by.replica_id, r.answered_by.grpc_address or a, r.term)
            for a, r in zip(addrs, replies, strict=True)
            if r is not None and r.answered_by.leader
        ]

    async def wait_leader(
        self, timeout: float, *, newer_than: int = -1, addresses: Sequence[str] | None = None, poll: float = 0.05
    ) -> LeaderSeen | None:
        """The first replica answering as leader with a term above ``newer_than`` (None after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [s for s in await self.leaders(addresses) if s.term > newer_than]
            if seen:
                return max(seen, key=lambda s: s.term)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(poll)

    async def list_instances(self) -> list[scheduler_pb2.InstanceStatus] | None:
        """The leader's view of the instances (None when no replica answers as leader)."""
        for seen in await self.leaders():
            try:
                reply = await admin_pb2_grpc.AdminServiceStub(self._channel(seen.address)).ListInstances(
                    admin_pb2.ListInstancesRequest(), timeout=self.timeout * 4, metadata=self._md
                )
            except grpc.aio.AioRpcError:
                continue
            return list(reply.instances)
        return None

    async def get_load(self, address: str) -> common_pb2.InstanceLoad | None:
        try:
            reply = await llumlet_pb2_grpc.LlumletServiceStub(self._channel(address, "llumlet")).GetLoad(
                llumlet_pb2.GetLoadRequest(), timeout=self.timeout * 2, metadata=self._md
            )
        except grpc.aio.AioRpcError:
            return None
        load: common_pb2.InstanceLoad = reply.load
        return load

    async def resign(self, address: str) -> None:
        """AdminService.ResignLeader on ``address`` (raises the call's AioRpcError)."""
        await admin_pb2_grpc.AdminServiceStub(self._channel(address)).ResignLeader(
            admin_pb2.ResignLeaderRequest(), timeout=5, metadata=self._md
        )

    async def active_instances(self) -> dict[str, str] | None:
        """instance id -> llumlet address of every ACTIVE instance the leader lists (None: no leader answered)."""
        statuses = await self.list_instances()
        if statuses is None:
            return None
        return {
            s.info.instance_id: s.info.grpc_address for s in statuses if s.state == common_pb2.INSTANCE_STATE_ACTIVE
        }

    async def wait_healthy(self, instances: Sequence[str], timeout: float) -> tuple[bool, str]:
        """Until a leader answers and lists every one of ``instances`` ACTIVE; (ok, what is missing)."""
        deadline = time.monotonic() + timeout
        missing = "no leader"
        while time.monotonic() < deadline:
            active = await self.active_instances()
            if active is not None:
                absent = sorted(set(instances) - set(active))
                if not absent:
                    return True, ""
                missing = f"not active: {', '.join(absent)}"
            await asyncio.sleep(0.1)
        return False, missing
