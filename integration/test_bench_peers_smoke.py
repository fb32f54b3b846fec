"""`llumnix bench peers --smoke` (CI, without the peers): this project's own cluster as users get it (``llumnix serve``
with its default security), measured by the OpenAI-mode client, the warm-up and a run on the one cluster; every
request finishes, the cluster drains back to empty after each (every llumlet read), every process it started is alive
afterwards, and the CPU of each component is accounted for from /proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LLUMNIX = str(Path(sys.executable).parent / "llumnix")


def test_bench_peers_smoke(tmp_path: Path) -> None:
    report_path, chart = tmp_path / "peers.json", tmp_path / "peers.png"
    args = [LLUMNIX, "bench", "peers", "--smoke", "--json", str(report_path), "--plot", str(chart)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # its group is ours: the cluster it started stops with it
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"bench peers --smoke ran past 240 s:\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    report = json.loads(report_path.read_text())
    assert "default" in report["systems"]["llumnix"]["security"]
    (workload,) = report["workloads"]
    runs = report["results"][workload]["llumnix"]["runs"]
    system = report["systems"]["llumnix"]
    assert len(runs) == 1 and system["cluster_starts"] == 1  # the warm-up and the run on one cluster
    assert system["warmup_ok"] and system["warmup"]["drain"]["ok"] and report["failed_runs"] == []
    assert len(system["drain_probes"]["llumlet_metrics"]) == 4 and system["drain_probes"]["frontends"]
    for run in runs:
        assert run["completed"] == 8 and run["failed"] == 0 and run["dead_processes"] == []
        assert run["output_tokens"] == 8 * 16  # ignore_eos: exactly max_tokens each
        # the drain check read every llumlet and the frontend back to empty (a block left held would fail it)
        assert run["drain"]["ok"] and run["drain"]["left"] == [] and run["preemptions"] == 0
        for kind in ("llumlet", "frontend", "scheduler", "etcd"):
            assert run["cpu_s"][kind] > 0, kind
        assert run["ttft_s"]["p99"] is not None and run["cpu_ms_per_token_llumlet_frontend"] > 0
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert "llumnix TTFT p99" in err and "peers total wall" in err and report["wall_s"] > 0
