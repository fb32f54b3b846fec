"""Smoke test of ``llumnix bench dispatch`` with small numbers: real etcd, a real scheduler process, a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def test_bench_dispatch_reports_positive_figures(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    args = ["bench", "dispatch", "--instances", "16", "--concurrency", "16", "--duration", "0.5", "--rounds", "1"]
    args += ["--decisions", "200", "--report-hz", "5", "--parts", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("dispatch N=16 |")
    report = json.loads(out.read_text())
    assert report["known_instances"] == 16
    for key in ("p50_ms", "p99_ms"):
        assert report["in_process"][key] > 0
        assert report["served_dispatch"][key] > 0
    parts = report["served_dispatch"]["parts_us_per_call"]
    assert len(parts) == 3 and all(v > 0 for v in parts.values()), parts
    grpc_figures = report["grpc"]
    for key in ("bare_rps", "dispatch_rps", "ratio", "bare_server_cpu_us_per_call", "dispatch_server_cpu_us_per_call"):
        assert grpc_figures[key] > 0, key
    assert len(grpc_figures["pair_ratios"]) == 1 and grpc_figures["ratio"] == grpc_figures["pair_ratios"][0]
    for row in grpc_figures["bare_rounds"] + grpc_figures["dispatch_rounds"]:
        assert row["errors"] == {} and row["leader"] and row["calls"] > 0
    assert report["load_reports"]["reports_per_s_during_dispatch"] > 0
    assert set(report["meets"]) == {"in_process_p99", "ratio"}
    if "profile" in report:
        assert report["profile"]["top_by_own_time"]
