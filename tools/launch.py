"""Starts components as child processes (``python -m pyllumnix.tools.cli <component> ...``) and waits until each
prints its ``{"event": "ready", ...}`` line. Used by ``llumnix serve`` and by the integration tests.

Each child's stderr goes to ``<log_dir>/<name>.log``; a child that exits or stays silent past the deadline raises with
the tail of its log, so a failed start explains itself.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LaunchError(RuntimeError):
    """A component did not become ready."""


@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.ready["grpc_address"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Launcher:
    """Tracks every started component; ``stop_all`` ends them in reverse start order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.components: list[Component] = []

    def start(self, name: str, *args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> Component:
        log_path = self.log_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyllumnix.tools.cli", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        comp = Component(name, proc, log_path)
        self.components.append(comp)
        comp.ready = self._wait_ready(comp, timeout)
        return comp

    @staticmethod
    def _wait_ready(comp: Component, timeout: float) -> dict[str, Any]:
        stdout = comp.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            if comp.proc.poll() is not None:
                raise LaunchError(f"{comp.name} exited with {comp.proc.returncode}:\n{comp.log()[-3000:]}")
            readable, _, _ = select.select([stdout], [], [], 0.1)
            if not readable:
                continue
            buf += os.read(stdout.fileno(), 65536)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    return msg
        comp.kill()
        raise LaunchError(f"{comp.name} not ready within {timeout:g} s:\n{comp.log()[-3000:]}")

    def stop_all(self, timeout: float = 10.0) -> None:
        for comp in reversed(self.components):
            comp.terminate(timeout)
