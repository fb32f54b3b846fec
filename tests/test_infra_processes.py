"""``infra/processes.describe_exit``: how a child ended, as the scheduler's provider and ``llumnix serve`` log it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyllumnix.infra.processes import describe_exit, stop_group
from pyllumnix.tools.launch import group_alive


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


def test_stop_group_terminates_the_whole_group_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    """The child leads its own session; its own child (a group member) ignores SIGTERM: both are gone after
    ``stop_group``, the stubborn one by SIGKILL after the grace period, and the leader is reaped."""
    pid_file = tmp_path / "member.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "m = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(m.pid))\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(60)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the group member did not start"
            time.sleep(0.05)
        member = int(pid_file.read_text())
        stop_group(leader, 0.5)
        assert leader.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while group_alive(leader.pid):
            assert time.monotonic() < deadline, f"member {member} outlived stop_group"
            time.sleep(0.05)
    finally:
        if leader.returncode is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait(timeout=30)
