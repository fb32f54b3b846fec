"""Starts the system's components as real processes (``python -m pyllumnix.tools.cli ...``) for integration tests.

Each component prints one JSON ``ready`` line on stdout; ``start`` waits for it (with a deadline) and returns its
fields. stderr goes to a log file that is printed when a start fails.
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


class Processes:
    """Tracks every started component and stops them all at the end of a test."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.components: list[Component] = []

    def start(self, name: str, *args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> Component:
        log_path = self.log_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyllumnix.tools.cli", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                env=full_env,
            )
        comp = Component(name, proc, log_path)
        self.components.append(comp)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before ready:\n{comp.log()[-3000:]}")
            readable, _, _ = select.select([proc.stdout], [], [], 0.1)
            if not readable:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            buf += chunk
            for line in buf.split(b"\n")[:-1]:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    comp.ready = msg
                    return comp
        comp.kill()
        raise TimeoutError(f"{name} not ready within {timeout} s:\n{comp.log()[-3000:]}")

    def stop_all(self) -> None:
        for comp in reversed(self.components):
            comp.terminate()
