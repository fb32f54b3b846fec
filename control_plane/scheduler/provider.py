"""Instance providers: how the autoscaler gets and gives back instances.

The interface is small so a Kubernetes provider can follow (start = create a pod running ``llumnix llumlet`` with the
cluster's etcd endpoints; stop = delete it). Scale-down never kills a busy instance: the scheduler drains it first
(infinite virtual usage), and a drained llumlet deregisters and exits on its own, so a provider's ``stop`` is only
the fallback for an instance that does not leave by itself.
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
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyllumnix.infra.processes import describe_exit
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.ca import CertPaths
from pyllumnix.infra.security.issuer import without_issuer
from pyllumnix.infra.security.runtime import SecuritySettings

log = logging.getLogger(__name__)


class InstanceProvider(ABC):
    #: The most instances this provider runs at once (None: no cap of its own); `Scale` beyond it is refused.
    max_instances: int | None = None

    @abstractmethod
    async def start_instances(self, count: int) -> list[str]:
        """Starts ``count`` instances; returns their ids (they register themselves in etcd when ready)."""

    @abstractmethod
    async def stop_instance(self, instance_id: str) -> bool:
        """Stops an instance this provider started; False if it does not know it."""

    @abstractmethod
    def starting(self) -> set[str]:
        """Ids started but not yet registered."""

    def registered(self, instance_id: str) -> None:  # noqa: B027 (optional hook)
        """Called when an instance appears in the registry."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases the provider (started instances keep running unless the provider was told otherwise)."""


DEFAULT_LOCAL_MAX_INSTANCES = 64
# A llumlet that exits before registering (a bad flag, a missing model, a port in use), or whose certificate could
# not be issued (serve's issuer or etcd auth broken), holds further starts back for EARLY_EXIT_BACKOFF_S, doubled with
# each such failure in a row up to EARLY_EXIT_BACKOFF_MAX_S; one that registers ends the run. Without it every scaling
# pass (as often as every 100 ms) spawned another that died the same way, each with a new certificate folder and log
# file, or ran a key generation and etcdctl calls again (REVIEW10 L3).
EARLY_EXIT_BACKOFF_S = 1.0
EARLY_EXIT_BACKOFF_MAX_S = 300.0
SECURITY_FLAGS = ("--tls-dir", "--ca", "--insecure")


def _remove_handed_out(own: CertPaths, instance_id: str) -> None:
    """Removes an ended llumlet's own certificate folder (``llumlet-<id>``: its key, never reused, since a provider
    gives every start a new id), so key material does not outlive its process on disk (REVIEW10/FIXE L4: before, the
    folders stayed until serve stopped, one per start). Any other folder is left alone."""
    folder = own.cert.parent
    if folder.name == f"llumlet-{instance_id}" and own.key.parent == folder:
        shutil.rmtree(folder, ignore_errors=True)


class LocalProcessProvider(InstanceProvider):
    """Spawns ``llumnix llumlet`` processes on this host, each in its own session (its own process group).

    By default they outlive this replica (another replica's provider cannot adopt them, but they keep serving).
    With ``stop_on_close`` the replica's exit stops every llumlet this provider started and waits for them: SIGTERM
    to its process group, SIGKILL after ``stop_timeout``. Every child's exit is logged with its code.
    ``max_instances`` caps the live children: a request beyond it starts only up to the cap. Children join with
    ``security`` (default: the process's settings): each new llumlet's own certificate files, issued first by the
    local PKI or serve's issuer (never the CA key), else this process's PKI folder or files, or ``--insecure``,
    unless ``llumlet_args`` already say.
    """

    def __init__(
        self,
        llumlet_args: Sequence[str],
        log_dir: Path | None = None,
        id_prefix: str = "auto",
        *,
        max_instances: int = DEFAULT_LOCAL_MAX_INSTANCES,
        stop_on_close: bool = False,
        stop_timeout: float = 10.0,
        security: SecuritySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.llumlet_args = list(llumlet_args)
        self.log_dir = log_dir
        self.id_prefix = id_prefix
        self.max_instances = self._cap = max_instances
        self.stop_on_close = stop_on_close
        self.stop_timeout = stop_timeout
        self.security = security
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._starting: set[str] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        self._clock = clock
        # Failed starts in a row (exited before registering, or no certificate), no start before ``_hold_until``.
        self.early_exits = 0
        self._hold_until = float("-inf")
        self._held_logged = False

    def alive(self) -> dict[str, asyncio.subprocess.Process]:
        """The children still running."""
        return {iid: p for iid, p in self.processes.items() if p.returncode is None}

    async def start_instances(self, count: int) -> list[str]:
        wait = self._hold_until - self._clock()
        if count > 0 and wait > 0:
            if not self._held_logged:  # once per hold: the scaling loop asks again every pass
                self._held_logged = True
                log.warning(
                    "not starting llumlets for %.0fs more: the last %d exited before registering or got no "
                    "certificate (see the logs)",
                    wait,
                    self.early_exits,
                )
            return []
        room = self._cap - len(self.alive())
        if count > room:
            log.warning(
                "asked to start %d llumlets; the provider cap of %d instances leaves room for %d",
                count,
                self._cap,
                max(room, 0),
            )
            count = max(room, 0)
        ids = []
        for _ in range(count):
            iid = f"{self.id_prefix}-{uuid.uuid4().hex[:6]}"
            security = self.security or runtime.current()
            # The new llumlet's certificate is issued before it starts (by the local PKI, or serve's issuer), in a
            # folder of its own: the llumlet gets its own files only, never the CA key.
            try:
                own = await asyncio.to_thread(security.ensure, "llumlet", iid)
            except Exception as exc:  # counts as an early exit: the next passes would fail alike, so hold them back
                self._hold(f"no certificate for llumlet {iid} ({exc})")
                raise
            cmd = [sys.executable, "-m", "pyllumnix.tools.cli", "llumlet", "--instance-id", iid, *self.llumlet_args]
            if not any(flag in self.llumlet_args for flag in SECURITY_FLAGS):
                cmd += security.child_args(own)  # its own files (or this process's PKI, or --insecure)
            stderr: Any = subprocess.DEVNULL
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                stderr = await asyncio.to_thread(open, self.log_dir / f"{iid}.log", "ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                    env=without_issuer(os.environ.items()),  # a llumlet asks for no certificate
                )
            finally:
                if self.log_dir is not None:
                    stderr.close()
            self.processes[iid] = proc
            self._starting.add(iid)
            ids.append(iid)
            log.info("started llumlet %s (pid %d)", iid, proc.pid)
            reaper = asyncio.get_running_loop().create_task(self._log_exit(iid, proc, own), name=f"reap-{iid}")
            self._reapers.add(reaper)
            reaper.add_done_callback(self._reapers.discard)
        return ids

    async def _log_exit(self, instance_id: str, proc: asyncio.subprocess.Process, own: CertPaths | None = None) -> None:
        code = await proc.wait()
        (log.info if code == 0 else log.warning)(
            "llumlet %s (pid %d) exited: %s", instance_id, proc.pid, describe_exit(code)
        )
        if own is not None:
            await asyncio.to_thread(_remove_handed_out, own, instance_id)
        if instance_id in self._starting and self.processes.get(instance_id) is proc:
            self._starting.discard(instance_id)
            del self.processes[instance_id]  # nothing left to stop or to count
            self._hold(f"llumlet {instance_id} exited before registering")

    def _hold(self, failure: str) -> None:
        """Holds starts back after one more failed start in a row (EARLY_EXIT_BACKOFF_S, doubled each time)."""
        self.early_exits += 1
        backoff = min(EARLY_EXIT_BACKOFF_MAX_S, EARLY_EXIT_BACKOFF_S * 2 ** (self.early_exits - 1))
        self._hold_until = self._clock() + backoff
        self._held_logged = False
        log.warning("%s (%d in a row): no llumlet is started for %.0fs", failure, self.early_exits, backoff)

    async def stop_instance(self, instance_id: str) -> bool:
        proc = self.processes.pop(instance_id, None)
        self._starting.discard(instance_id)
        if proc is None:
            return False
        await self._terminate(instance_id, proc)
        return True

    async def _terminate(self, instance_id: str, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``stop_timeout``; returns once it is reaped."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning(
                    "llumlet %s (pid %d) ignored SIGTERM for %.0fs; killing it",
                    instance_id,
                    proc.pid,
                    self.stop_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def close(self) -> None:
        """With ``stop_on_close``: stops every child still running (all at once) and waits for each."""
        if self.stop_on_close:
            children = self.alive()
            if children:
                log.info("stopping %d llumlet(s) this provider started: %s", len(children), ", ".join(sorted(children)))
            await asyncio.gather(*(self._terminate(iid, p) for iid, p in children.items()))
            self.processes.clear()
            self._starting.clear()
        # Let the reapers log the exits they saw; the rest (children left running) are not waited for.
        for reaper in list(self._reapers):
            if reaper.done() or self.stop_on_close:
                with contextlib.suppress(asyncio.CancelledError):
                    await reaper
            else:
                reaper.cancel()

    def starting(self) -> set[str]:
        # One that died before registering is not starting; its reaper (``_log_exit``) forgets it and holds starts.
        return {iid for iid in self._starting if (p := self.processes.get(iid)) is not None and p.returncode is None}

    def registered(self, instance_id: str) -> None:
        self._starting.discard(instance_id)
        if instance_id in self.processes:  # one of ours came up: starts work again, no hold
            self.early_exits = 0
            self._hold_until = float("-inf")
