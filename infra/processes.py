"""Child-process facts every component that starts processes reports the same way.

Here, not in the CLI layer (``tools/launch.py``), because the scheduler's local instance provider logs how a llumlet
it started ended, and the control plane imports nothing from ``tools`` (``tests/test_layers.py``).
"""

from __future__ import annotations

import signal


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


__all__ = ["describe_exit"]
