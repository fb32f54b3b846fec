"""RayInstanceProvider: Ray places and runs llumlets on a multi-host cluster; etcd stays the source of truth.

Ray's part is placement and process lifetime only: the registry, the leases (liveness), the election and the
configuration stay in etcd, exactly as with the local provider. A llumlet started here registers itself in etcd and
its lease is what tells the scheduler it is alive; Ray's own view of a node or an actor is never consulted for that.

Per instance: one placement group (its CPU/GPU bundle, pinned to one node through Ray's ``node:<ip>`` resource) and
one detached, named actor (``llumlet-<id>``, in the Ray namespace ``llumnix-<cluster>``), so another replica (a new
leader) can find it by name and stop it. Which node: ``placement="spread"`` picks the node holding the fewest of this
provider's instances, ``"pack"`` the one holding the most that still has room; ``hosts`` restricts both to these node
IPs (host pinning).

The actor supervises the llumlet as a child process rather than running it in-process: the llumlet owns its event
loop, signal handlers and (for vLLM) the engine's CUDA context and worker processes, none of which belong inside a Ray
worker; a child is stopped by its process group (SIGTERM, then SIGKILL), its exit code is logged, and the actor stays
responsive while the llumlet is busy. The llumlet binds and advertises the node's IP (``ray.util.get_node_ip_address``
on the placed node), never a wildcard or a loopback address.

Security: the llumlet's private key is made by the actor on its node, in a private (0700) folder removed when the
actor is told to stop its llumlet (a stop, a failed or cancelled start), and never leaves it: only the public key
comes back; this provider has it certified (for the node the placement group landed on: its IP in the certificate's
names) and hands the actor the CA and the certificate, public both, before the llumlet starts. Before, the key was
made here and passed as an actor argument, which Ray keeps in its
control store (GCS) with the actor's creation task and sends over its own (by default plaintext) connections.

Stop: the scheduler drains an instance before it stops it (a drained llumlet deregisters and exits by itself); stop
then SIGTERMs whatever is left through the actor, kills the actor and removes the placement group.

Failures are clear and leave nothing half-made: a Ray address that does not answer (``ray_connect_timeout``), a
placement that cannot be satisfied (``placement_timeout``) or a node that disappears before the actor answers
(``start_timeout``) raise ProviderError after removing the placement group and the actor; the llumlet never got to
register, or its lease expires with it. After the actor answers, a watch follows the start until the llumlet
registers: a llumlet that exits first (bad arguments, a crash: its exit code is logged), an actor that stops answering
(its node is gone: ``probe_failures`` probes in a row unanswered, far sooner than Ray's own node-death detection) or no
registration within ``register_timeout`` ends the start: actor and placement group are removed, the instance stops
counting as starting (so the autoscaler may start another) and ``start_failures`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyllumnix.control_plane.scheduler.provider import SECURITY_FLAGS, InstanceProvider
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.runtime import SecuritySettings

log = logging.getLogger(__name__)

ACTOR_PREFIX = "llumlet-"


class ProviderError(Exception):
    """Ray could not place or start an instance (the message says why; nothing was left behind)."""


class LlumletSupervisor:
    """The body of the Ray actor: runs one ``llumnix llumlet`` child on its node and stops it on request.

    Secure: construction makes the llumlet's key on this node (:meth:`public_key` gives its public part);
    :meth:`start` gets the CA and the certificate and starts the llumlet. Insecure: :meth:`start` with None."""

    def __init__(self, instance_id: str, args: list[str], secure: bool) -> None:
        import ray

        self.instance_id = instance_id
        self.node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._public: bytes | None = None
        self.secure = secure
        self._terminated = False
        if secure:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ec

            self._dir = tempfile.mkdtemp(prefix=f"llumnix-{instance_id}-")  # 0700
            try:
                key = ec.generate_private_key(ec.SECP256R1())
                self._write("key.pem", key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ))  # fmt: skip
            except BaseException:
                self._remove_dir()
                raise
            self._public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )

    def _write(self, name: str, content: bytes) -> None:
        assert self._dir is not None
        path = os.path.join(self._dir, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(content)

    def public_key(self) -> bytes | None:
        """The public part of the key made here (None when insecure): all of it that leaves this node."""
        return self._public

    def start(self, pem: dict[str, bytes] | None) -> tuple[str, int]:
        """Starts the llumlet, secure with ``pem`` (``ca``, ``cert``: for the key made here); returns :meth:`info`."""
        if self.proc is not None:
            return self.info()
        if self._terminated:
            raise RuntimeError(f"{self.instance_id}: terminated before it started")
        args = self.args
        cmd = [sys.executable, "-m", "pyllumnix.tools.cli", "llumlet", "--instance-id", self.instance_id, *args]
        if "--host" not in args:
            cmd += ["--host", self.node_ip]
        if "--advertise-host" not in args:
            cmd += ["--advertise-host", self.node_ip]
        if self.secure:
            if pem is None or self._dir is None:
                raise ValueError(f"{self.instance_id}: a secure llumlet needs its certificate")
            for name in ("ca", "cert"):
                with contextlib.suppress(FileNotFoundError):  # a start retried after a partial write
                    os.unlink(os.path.join(self._dir, f"{name}.pem"))
                self._write(f"{name}.pem", pem[name])
            cmd += ["--ca", f"{self._dir}/ca.pem", "--cert", f"{self._dir}/cert.pem", "--key", f"{self._dir}/key.pem"]
        elif not any(flag in args for flag in SECURITY_FLAGS):
            cmd.append("--insecure")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        return self.info()

    def info(self) -> tuple[str, int]:
        """(node IP, llumlet pid; 0 before :meth:`start`)."""
        return self.node_ip, self.proc.pid if self.proc is not None else 0

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def terminate(self, timeout: float) -> int:
        """SIGTERM to the llumlet's process group, SIGKILL after ``timeout``; returns its exit code (0 if it never
        started). The key's folder goes either way."""
        self._terminated = True
        if self.proc is None:
            self._remove_dir()
            return 0
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._remove_dir()
        return int(self.proc.returncode)

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class _Placed:
    pg: Any
    actor: Any
    node_ip: str
    registered: bool = False
    watch: asyncio.Task[None] | None = None


class RayInstanceProvider(InstanceProvider):
    """Starts llumlets as detached Ray actors, one placement group each (see the module docstring)."""

    def __init__(
        self,
        ray_address: str,
        llumlet_args: Sequence[str],
        *,
        cluster: str = "llumnix",
        id_prefix: str = "ray",
        cpus: float = 1.0,
        gpus: float = 0.0,
        placement: str = "spread",
        hosts: Sequence[str] = (),
        max_instances: int | None = None,
        stop_on_close: bool = False,
        stop_timeout: float = 10.0,
        ray_connect_timeout: float = 30.0,
        placement_timeout: float = 30.0,
        start_timeout: float = 60.0,
        register_timeout: float = 300.0,
        start_poll_interval: float = 0.5,
        probe_timeout: float = 2.0,
        probe_failures: int = 3,
        security: SecuritySettings | None = None,
    ) -> None:
        if placement not in ("spread", "pack"):
            raise ValueError(f"placement must be 'spread' or 'pack', got {placement!r}")
        if cpus < 0 or gpus < 0 or cpus + gpus <= 0:
            raise ValueError(f"an instance needs CPUs or GPUs (cpus={cpus}, gpus={gpus})")
        self.ray_address = ray_address
        self.llumlet_args = list(llumlet_args)
        self.namespace = f"llumnix-{cluster}"
        self.id_prefix = id_prefix
        self.cpus, self.gpus = cpus, gpus
        self.placement = placement
        self.hosts = list(hosts)
        self.max_instances = max_instances
        self.stop_on_close = stop_on_close
        self.stop_timeout = stop_timeout
        self.ray_connect_timeout = ray_connect_timeout
        self.placement_timeout = placement_timeout
        self.start_timeout = start_timeout
        self.register_timeout = register_timeout
        self.start_poll_interval = start_poll_interval
        self.probe_timeout = probe_timeout
        self.probe_failures = probe_failures
        self.security = security
        self.instances: dict[str, _Placed] = {}
        self._discards: set[asyncio.Task[None]] = set()  # cleanups of cancelled starts, kept until they end
        # instance id -> why its start failed after the actor answered (the llumlet exited, its node vanished, ...)
        self.start_failures: dict[str, str] = {}
        self._connected = False
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ Ray connection
    def _ray(self) -> Any:
        try:
            import ray
        except ImportError as e:
            raise ProviderError("the ray provider needs Ray: pip install 'pyllumnix[ray]'") from e
        return ray

    async def connect(self) -> None:
        """Joins the Ray cluster as a driver (once); ProviderError if it does not answer in time."""
        if self._connected:
            return
        ray = self._ray()
        address = self.ray_address
        if ray.is_initialized():  # an earlier connect's ray.init finished after its caller gave up (a cancelled RPC)
            self._connected = True
            return

        def init() -> None:
            ray.init(
                address=address,
                namespace=self.namespace,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
            )

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ProviderError(f"--ray-address must be HOST:PORT of a Ray head (GCS), got {address!r}")
        try:  # ray.init retries an unreachable GCS for a long time: a TCP probe first gives a prompt, clear error
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), self.ray_connect_timeout)
            writer.close()
        except (OSError, TimeoutError) as e:
            raise ProviderError(f"the Ray head at {address} does not answer ({e or 'timed out'})") from e
        try:
            await asyncio.wait_for(asyncio.to_thread(init), self.ray_connect_timeout)
        except TimeoutError as e:
            raise ProviderError(
                f"could not join the Ray cluster at {address} within {self.ray_connect_timeout}s"
            ) from e
        except Exception as e:
            raise ProviderError(f"could not join the Ray cluster at {address}: {e}") from e
        self._connected = True

    def _nodes(self) -> dict[str, dict[str, float]]:
        """Alive node IP -> its available resources."""
        ray = self._ray()
        nodes = {n["NodeManagerAddress"]: n for n in ray.nodes() if n.get("Alive")}
        return {ip: dict(n.get("Resources", {})) for ip, n in nodes.items()}

    def _choose_node(self) -> str:
        nodes = self._nodes()
        candidates = [ip for ip in nodes if not self.hosts or ip in self.hosts]
        if not candidates:
            wanted = f" among --ray-hosts {', '.join(self.hosts)}" if self.hosts else ""
            raise ProviderError(f"no alive Ray node{wanted} (alive: {', '.join(sorted(nodes)) or 'none'})")
        fits = [
            ip for ip in candidates if nodes[ip].get("CPU", 0) >= self.cpus and nodes[ip].get("GPU", 0) >= self.gpus
        ]
        if not fits:
            sizes = ", ".join(
                f"{ip}: {nodes[ip].get('CPU', 0)} CPU / {nodes[ip].get('GPU', 0)} GPU" for ip in candidates
            )
            raise ProviderError(f"no Ray node can hold an instance of {self.cpus} CPU / {self.gpus} GPU ({sizes})")
        mine = {ip: 0 for ip in fits}
        for placed in self.instances.values():
            if placed.node_ip in mine:
                mine[placed.node_ip] += 1
        key = (lambda ip: (mine[ip], ip)) if self.placement == "spread" else (lambda ip: (-mine[ip], ip))
        return min(fits, key=key)

    # ------------------------------------------------------------------ InstanceProvider
    async def _prune(self) -> None:
        """Forgets instances whose node is gone (the host died: its llumlets went with it, their leases expire) and
        removes their placement groups, so they neither count against ``max_instances`` nor hold a slot."""
        from ray.util.placement_group import remove_placement_group

        alive = set(await asyncio.to_thread(self._nodes))
        for iid, placed in list(self.instances.items()):
            if placed.node_ip not in alive:
                log.warning("llumlet %s: its Ray node %s is gone; forgetting it", iid, placed.node_ip)
                del self.instances[iid]
                with contextlib.suppress(Exception):
                    self._ray().kill(placed.actor, no_restart=True)
                with contextlib.suppress(Exception):
                    remove_placement_group(placed.pg)

    async def start_instances(self, count: int) -> list[str]:
        await self.connect()
        await self._prune()
        if self.max_instances is not None:
            count = max(0, min(count, self.max_instances - len(self.instances)))
        ids: list[str] = []
        async with self._lock:  # placements one after the other: each choice sees the previous ones
            for _ in range(count):
                iid = f"{self.id_prefix}-{uuid.uuid4().hex[:6]}"
                await self._start_one(iid)
                ids.append(iid)
        return ids

    async def _start_one(self, iid: str) -> None:
        ray = self._ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        node_ip = await asyncio.to_thread(self._choose_node)
        bundle: dict[str, float] = {f"node:{node_ip}": 0.001}
        if self.cpus:
            bundle["CPU"] = self.cpus
        if self.gpus:
            bundle["GPU"] = self.gpus
        pg = placement_group([bundle], strategy="STRICT_PACK", name=f"pg-{iid}", lifetime="detached")
        actor = None
        try:
            try:
                await asyncio.wait_for(pg.ready(), self.placement_timeout)
            except TimeoutError as e:
                raise ProviderError(
                    f"placement of {iid} ({bundle}) not satisfied within {self.placement_timeout}s on node {node_ip}"
                ) from e
            security = self.security or runtime.current()
            remote = ray.remote(num_cpus=0)(LlumletSupervisor)
            actor = remote.options(
                name=f"{ACTOR_PREFIX}{iid}",
                namespace=self.namespace,
                lifetime="detached",
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote(iid, self.llumlet_args, security.secure)
            try:
                public = await asyncio.wait_for(actor.public_key.remote(), self.start_timeout)
                pem = await self._certify(security, iid, node_ip, public)
                placed_ip, pid = await asyncio.wait_for(actor.start.remote(pem), self.start_timeout)
            except TimeoutError as e:
                raise ProviderError(f"{iid}'s actor on {node_ip} did not start within {self.start_timeout}s") from e
            except ProviderError:
                raise
            except Exception as e:  # the node died, the actor failed to construct, ...
                raise ProviderError(f"{iid}'s actor on {node_ip} failed to start: {e}") from e
        except BaseException as exc:
            # In a task of its own, so that no cancellation (a lost leadership, a stop: now, or while it is awaited
            # below) cuts it short: the actor's node keeps the key's folder otherwise, and Ray the detached actor
            # and placement group.
            task = asyncio.get_running_loop().create_task(self._discard(ray, actor, pg), name=f"discard-{iid}")
            self._discards.add(task)
            task.add_done_callback(self._discards.discard)
            if not isinstance(exc, asyncio.CancelledError):
                await asyncio.shield(task)
            raise
        placed = self.instances[iid] = _Placed(pg=pg, actor=actor, node_ip=placed_ip)
        placed.watch = asyncio.get_running_loop().create_task(self._watch_start(iid, placed), name=f"start-{iid}")
        log.info("started llumlet %s on Ray node %s (pid %d there)", iid, placed_ip, pid)

    async def _discard(self, ray: Any, actor: Any, pg: Any) -> None:
        """Undoes a start that failed: the actor terminates its llumlet and removes its key's folder (``ray.kill``
        runs nothing of the actor's), then it is killed and its placement group removed. Never raises."""
        from ray.util.placement_group import remove_placement_group

        if actor is not None:
            with contextlib.suppress(Exception):
                # As long as a start may take: an actor still being built runs its queued terminate once it is.
                await asyncio.wait_for(actor.terminate.remote(0.0), self.start_timeout)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(pg)

    @staticmethod
    async def _certify(
        security: SecuritySettings, iid: str, node_ip: str, public: bytes | None
    ) -> dict[str, bytes] | None:
        """The CA and certificate for the key the actor made on ``node_ip`` (None when insecure)."""
        if not security.secure:
            return None
        if public is None:
            raise ProviderError(f"{iid}'s actor made no key, yet this cluster is secure")
        issued = await asyncio.to_thread(security.certify, "llumlet", iid, [node_ip], public)
        if issued is None:
            raise ProviderError(
                "a Ray-placed llumlet needs a certificate and this scheduler cannot issue one "
                "(run it under `llumnix serve`, which issues it, or with a PKI folder holding the CA key)"
            )
        return {"ca": issued[0], "cert": issued[1]}

    async def _watch_start(self, iid: str, placed: _Placed) -> None:
        """Follows a start until the llumlet registers; ends a start that cannot succeed (module docstring)."""
        deadline = asyncio.get_running_loop().time() + self.register_timeout
        unanswered = 0
        reason = ""
        reachable = True
        while not reason:
            await asyncio.sleep(self.start_poll_interval)
            if placed.registered or self.instances.get(iid) is not placed:
                return
            try:
                code = await asyncio.wait_for(placed.actor.returncode.remote(), self.probe_timeout)
            except Exception as e:  # no answer in time, or Ray says the actor (or its node) died
                unanswered += 1
                if unanswered >= self.probe_failures:
                    reason = f"its Ray actor on {placed.node_ip} stopped answering ({e!r}): the node is gone"
                    reachable = False
            else:
                unanswered = 0
                if code is not None:
                    reason = f"the llumlet exited with code {code} before it registered"
            if not reason and asyncio.get_running_loop().time() > deadline:
                reason = f"it did not register within {self.register_timeout:g}s"
        if placed.registered or self.instances.get(iid) is not placed:
            return
        del self.instances[iid]
        self.start_failures[iid] = reason
        log.error("llumlet %s on Ray node %s did not start: %s; removing it", iid, placed.node_ip, reason)
        await self._teardown(iid, placed, ask_actor=reachable)

    async def stop_instance(self, instance_id: str) -> bool:
        placed = self.instances.pop(instance_id, None)
        if placed is None:
            return False
        if placed.watch is not None:
            placed.watch.cancel()
        await self._teardown(instance_id, placed)
        return True

    async def _teardown(self, instance_id: str, placed: _Placed, *, ask_actor: bool = True) -> None:
        """Stops the llumlet through its actor (unless the actor is known unreachable: no waiting on a dead node),
        then kills the actor and removes the placement group."""
        ray = self._ray()
        from ray.util.placement_group import remove_placement_group

        if ask_actor:
            try:
                code = await asyncio.wait_for(placed.actor.terminate.remote(self.stop_timeout), self.stop_timeout + 10)
                log.info("llumlet %s on %s exited with code %s", instance_id, placed.node_ip, code)
            except Exception as e:  # the node or the actor is gone already: its process went with it
                log.warning("llumlet %s on %s: no clean stop (%s)", instance_id, placed.node_ip, e)
        with contextlib.suppress(Exception):
            ray.kill(placed.actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(placed.pg)

    def starting(self) -> set[str]:
        return {iid for iid, p in self.instances.items() if not p.registered}

    def registered(self, instance_id: str) -> None:
        placed = self.instances.get(instance_id)
        if placed is not None:
            placed.registered = True
            if placed.watch is not None:
                placed.watch.cancel()

    def node_of(self, instance_id: str) -> str | None:
        placed = self.instances.get(instance_id)
        return placed.node_ip if placed is not None else None

    async def close(self) -> None:
        for placed in self.instances.values():
            if placed.watch is not None:
                placed.watch.cancel()
        if self.stop_on_close:
            await asyncio.gather(*(self._teardown(iid, p) for iid, p in self.instances.items()))
            self.instances.clear()
        if self._discards:  # cancelled starts still being undone: before Ray goes
            await asyncio.wait(set(self._discards), timeout=self.start_timeout + 5)
        if self._connected:
            with contextlib.suppress(Exception):
                self._ray().shutdown()
            self._connected = False
