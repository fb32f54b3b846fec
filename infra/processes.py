"""Child-process facts every component that starts processes reports the same way.

Here, not in the CLI layer (``tools/launch.py``), because the scheduler's local instance provider logs how a llumlet
it started ended, and the control plane imports nothing from ``tools`` (``tests/test_layers.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def describe_exit(returncode: int | None) -> str:
    """``exit code 3`` / ``signal SIGKILL`` / ``running``: how a child ended, for logs (a negative ``returncode`` is
    the signal that ended it, as ``subprocess`` reports)."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def stop_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """Stops the process group a child we started leads (spawned in a session of its own): SIGTERM, then SIGKILL
    after ``grace`` seconds, and reaps the child. Signals only while the child is unreaped (its pid, the group id,
    cannot have been reused)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


__all__ = ["describe_exit", "stop_group"]
