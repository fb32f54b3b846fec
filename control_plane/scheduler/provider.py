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
import signal
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class InstanceProvider(ABC):
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
        """Releases the provider (started instances keep running)."""


class LocalProcessProvider(InstanceProvider):
    """Spawns ``llumnix llumlet`` processes on this host, in their own session so they outlive this replica."""

    def __init__(self, llumlet_args: Sequence[str], log_dir: Path | None = None, id_prefix: str = "auto") -> None:
        self.llumlet_args = list(llumlet_args)
        self.log_dir = log_dir
        self.id_prefix = id_prefix
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._starting: set[str] = set()

    async def start_instances(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            iid = f"{self.id_prefix}-{uuid.uuid4().hex[:6]}"
            cmd = [sys.executable, "-m", "pyllumnix.tools.cli", "llumlet", "--instance-id", iid, *self.llumlet_args]
            stderr: Any = subprocess.DEVNULL
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                stderr = await asyncio.to_thread(open, self.log_dir / f"{iid}.log", "ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
                )
            finally:
                if self.log_dir is not None:
                    stderr.close()
            self.processes[iid] = proc
            self._starting.add(iid)
            ids.append(iid)
            log.info("started llumlet %s (pid %d)", iid, proc.pid)
        return ids

    async def stop_instance(self, instance_id: str) -> bool:
        proc = self.processes.pop(instance_id, None)
        self._starting.discard(instance_id)
        if proc is None:
            return False
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        return True

    def starting(self) -> set[str]:
        for iid in list(self._starting):
            proc = self.processes.get(iid)
            if proc is None or proc.returncode is not None:
                self._starting.discard(iid)  # died before registering
        return set(self._starting)

    def registered(self, instance_id: str) -> None:
        self._starting.discard(instance_id)
