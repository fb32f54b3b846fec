"""`llumnix drill` as a person runs it: a short drill (leader-kill, llumlet-stall 4, burst 100) on a local cluster the
drill starts itself, which must pass (exit 0) and report every field the issue asks for.

The drill is the acceptance test of the control plane's failover (issue #12): a failure here names the scenario and
the check in the drill's own summary, which the assertion message carries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LLUMNIX = str(Path(sys.executable).parent / "llumnix")
SCENARIOS = ["leader-kill", "llumlet-stall 4", "burst 100"]


def run_drill(tmp_path: Path, *scenarios: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    report = tmp_path / "drill.json"
    args = [LLUMNIX, "drill", "--json", str(report), "--log-dir", str(tmp_path / "logs")]
    for s in scenarios:
        args += ["--scenario", s]
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the drill stop the cluster it started; its group is ours, so nothing else is touched.
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"drill ran past {timeout} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err), time.monotonic() - started


@pytest.mark.timeout(300)
def test_short_drill_passes(tmp_path: Path) -> None:
    result, seconds = run_drill(tmp_path, *SCENARIOS, timeout=240)
    assert result.returncode == 0, f"drill failed:\n{result.stderr[-6000:]}"
    data = json.loads((tmp_path / "drill.json").read_text())
    assert data == json.loads(result.stdout)
    assert data["passed"] is True and data["error"] == ""
    # the local cluster runs secure by default (mutual TLS, role checks, the drill's clients on an admin API key)
    assert data["config"]["security"].startswith("mutual TLS"), data["config"]["security"]
    # ... and so does its etcd (TLS with client-certificate auth, as `llumnix serve` runs it)
    assert all(e.startswith("https://") for e in data["config"]["etcd"].split(",")), data["config"]["etcd"]
    assert (tmp_path / "logs" / "context.yaml").exists() and (tmp_path / "logs" / "pki" / "ca.pem").exists()
    assert data["reference"]["streams"] > 0 and data["reference"]["unfinished"] == 0
    by_name = {s["scenario"]: s for s in data["scenarios"]}
    assert list(by_name) == SCENARIOS
    for s in data["scenarios"]:
        assert s["passed"] and all(c["passed"] for c in s["checks"])
        assert s["requests"] > 0 and s["finished"] > 0
        assert s["lost"] == s["hung"] == s["altered"] == s["errors_unexpected"] == 0
        assert s["longest_first_token_gap_s"] is not None
        assert not any(s["blocks_held"].values()) and s["blocks_held"]
    kill = by_name["leader-kill"]
    assert kill["fault"]["old_leader"] != kill["fault"]["new_leader"] != ""
    assert 0 < kill["time_to_new_leader_s"] <= 3.0
    assert by_name["burst 100"]["requests"] >= 100
    assert by_name["llumlet-stall 4"]["recovery_s"] is not None
    assert seconds < 240
    # Every process the drill started is gone (it stops them by PID / process group, also on failure).
    assert data["config"]["pids"]
    for pid in data["config"]["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(180)
def test_interrupted_drill_stops_everything_it_started(tmp_path: Path) -> None:
    """SIGTERM while the frontend is SIGSTOPped by the drill: the drill continues and stops every process it started,
    reports the interruption and exits 1."""
    report = tmp_path / "drill.json"
    args = [
        LLUMNIX,
        "drill",
        "--json",
        str(report),
        "--log-dir",
        str(tmp_path / "logs"),
        "--scenario",
        "frontend-stall 60",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "frontend-stall 60: running" in line:
                break
        else:
            pytest.fail(f"the drill never started its scenario (exit {proc.wait()})")
        time.sleep(5)  # warmup (2 s), then the frontend is stopped
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["error"] == "interrupted"
    assert len(data["config"]["pids"]) >= 5
    for pid in data["config"]["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
