"""``infra/processes.describe_exit``: how a child ended, as the scheduler's provider and ``llumnix serve`` log it."""

from __future__ import annotations

import signal
import subprocess
import sys

from pyllumnix.infra.processes import describe_exit


def test_exit_codes_signals_and_a_running_child() -> None:
    assert describe_exit(None) == "running"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-200) == "signal 200"  # no such signal: the number


def test_a_real_child_killed_by_a_signal() -> None:
    """The sign convention is subprocess's: a child ended by SIGTERM has returncode -15."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.send_signal(signal.SIGTERM)
        assert describe_exit(child.wait(timeout=30)) == "signal SIGTERM"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
