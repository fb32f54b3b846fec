"""Cluster simulator CLI smoke: ``llumnix sim`` and ``llumnix sim compare`` write JSON, Markdown and PNG."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def test_sim_run_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["sim", "--instances", "3", "--profile", "tiny", "--policy", "llumnix", "--seed", "2"]
    args += ["--workload", "uniform:poisson:rate=80:in_min=16:in_max=150:out_min=8:out_max=100:n=80"]
    args += ["--priority-share", "0.1", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["conservation_ok"] and line["requests"] == 80
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["num_finished"] == 80
    assert set(summary["by_priority"]) == {"high", "normal"}
    assert "| prefill P99 (s) |" in (out / "summary.md").read_text()
    for png in ("latency_cdf.png", "instances.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert len((out / "requests.csv").read_text().splitlines()) == 81


def test_sim_autoscale_flags(tmp_path: Path) -> None:
    args = ["sim", "--instances", "2", "--profile", "tiny", "--policy", "infaas++", "--autoscale", "--min", "1"]
    args += ["--max", "3", "--scale-up", "10", "--scale-down", "60", "--startup-s", "0.5", "--scaling-interval-s", "1"]
    args += ["--workload", "fixed:poisson:rate=20:in=32:out=16:n=30", "--out", str(tmp_path / "a")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["instance_hours"] > 0


def test_sim_needs_workload_and_out() -> None:
    result = CliRunner().invoke(cli, ["sim", "--instances", "2"])
    assert result.exit_code != 0
    assert "--workload" in result.output


def test_compare_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["sim", "compare", "--scenario", "paper-fig13", "--requests", "60", "--instances", "2", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    md = (out / "COMPARE.md").read_text()
    assert "## The paper" in md and "2.9-8.6x" in md
    data = json.loads((out / "compare.json").read_text())
    assert len(data) == 4 and all(set(runs) == {"no-priority", "priority"} for runs in data.values())
    assert (out / "prefill_p99_vs_cv.png").exists()
