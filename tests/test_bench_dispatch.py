"""Smoke test of ``llumnix bench dispatch`` with small numbers: real etcd, a real scheduler process, a few seconds.

Beyond "the figures are there", the report's figures must agree with each other: each headline number is the
statistic it names of the per-round rows of the same run (a mix-up of rounds, a ratio inverted or taken from another
round, a median that is not one, fails here)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def test_bench_dispatch_figures_agree_with_each_other(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    args = ["bench", "dispatch", "--instances", "16", "--concurrency", "16", "--duration", "0.5", "--rounds", "3"]
    args += ["--decisions", "200", "--report-hz", "5", "--parts", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    assert summary.startswith("dispatch N=16 |")
    report = json.loads(out.read_text())
    assert report["known_instances"] == 16 and report["rounds"] == 3
    assert report["gc_frozen_objects"] > 0  # the scheduler's startup heap, frozen as run_scheduler does

    core = report["in_process"]
    assert core["n_decisions"] == 200 and core["n_instances"] == 16
    assert 0 < core["p50_ms"] <= core["p99_ms"] <= core["max_ms"]
    assert 0 < core["mean_ms"] <= core["max_ms"]

    served = report["served_dispatch"]
    assert served["calls"] > 0 and 0 < served["p50_ms"] <= served["p99_ms"]
    parts = served["parts_us_per_call"]
    assert len(parts) == 3 and all(v > 0 for v in parts.values()), parts
    # the parts are timed inside the served call: together they cannot exceed it (10 % for rounding and the calls
    # in flight when the round ended)
    assert sum(parts.values()) <= served["mean_ms"] * 1000 * 1.1, (parts, served["mean_ms"])

    g = report["grpc"]
    bare, dispatch = g["bare_rounds"], g["dispatch_rounds"]
    assert len(bare) == len(dispatch) == 3
    for row in bare + dispatch:
        assert row["errors"] == {} and row["leader"] and row["calls"] > 0
        assert row["rps"] == pytest.approx(row["calls"] / row["elapsed_s"], rel=0.01), row
        assert 0 < row["rpc_p50_ms"] <= row["rpc_p99_ms"], row
        assert 0 <= row["gc_full_passes"] <= row["gc_passes"] and row["gc_us_per_call"] >= 0, row
    pair_ratios = [d["rps"] / b["rps"] for b, d in zip(bare, dispatch, strict=True)]
    assert g["pair_ratios"] == pytest.approx(pair_ratios, abs=1e-3)
    assert g["ratio"] == pytest.approx(statistics.median(pair_ratios), abs=1e-3)
    assert g["bare_rps"] == pytest.approx(statistics.median(r["rps"] for r in bare), abs=0.1)
    assert g["dispatch_rps"] == pytest.approx(statistics.median(r["rps"] for r in dispatch), abs=0.1)
    assert g["ratio_of_medians"] == pytest.approx(g["dispatch_rps"] / g["bare_rps"], abs=2e-3)
    best = max(r["rps"] for r in dispatch) / max(r["rps"] for r in bare)
    assert g["best_ratio"] == pytest.approx(best, abs=1e-3)
    assert g["rounds_agree"] == (max(pair_ratios) <= 2.0 * min(pair_ratios))
    assert ("rounds disagree" in summary) == (not g["rounds_agree"]), summary
    for kind, rows in (("bare", bare), ("dispatch", dispatch)):
        assert g[f"{kind}_server_cpu_us_per_call"] == statistics.median(r["server_cpu_us_per_call"] for r in rows)
    cpu_ratio = statistics.median(r["server_cpu_us_per_call_excl_reports"] for r in bare) / statistics.median(
        r["server_cpu_us_per_call_excl_reports"] for r in dispatch
    )
    assert g["server_cpu_ratio"] == pytest.approx(cpu_ratio, abs=1e-3)
    assert g["errors"] == 0 and g["leader_changes"] == 0
    assert report["load_reports"]["reports_per_s_during_dispatch"] == statistics.median(
        r["reports_per_s"] for r in dispatch
    )
    assert report["load_reports"]["reports_per_s_during_dispatch"] > 0

    targets, meets = report["targets"], report["meets"]
    assert meets == {
        "in_process_p99": core["p99_ms"] <= targets["in_process_p99_ms"],
        "ratio": g["ratio"] >= targets["ratio"] if abs(g["ratio"] - targets["ratio"]) > 1e-3 else meets["ratio"],
    }
    # the one-line summary quotes the JSON's headline ratio
    assert f"{g['ratio']:.2f}" in summary, summary
    if "profile" in report:
        assert report["profile"]["top_by_own_time"]


def test_bench_dispatch_compare_tls_interleaves_plaintext_and_mutual_tls(tmp_path: Path) -> None:
    """--compare-tls: one run serves a plaintext and a mutual-TLS port (role check on) on the same replica; every call
    on both answers, and the headline mTLS/plaintext rate ratio is the median of the per-round quotients."""
    out = tmp_path / "dispatch.json"
    args = ["bench", "dispatch", "--instances", "16", "--concurrency", "8", "--duration", "0.5", "--rounds", "3"]
    args += ["--decisions", "100", "--report-hz", "5", "--compare-tls", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    plain, mtls, cost = report["grpc"], report["mtls"]["grpc"], report["mtls"]["vs_plaintext"]
    assert mtls["errors"] == 0 and mtls["bare_rps"] > 0 and mtls["dispatch_rps"] > 0, mtls
    assert len(mtls["dispatch_rounds"]) == len(plain["dispatch_rounds"]) == 3
    quotients = [m["rps"] / p["rps"] for p, m in zip(plain["dispatch_rounds"], mtls["dispatch_rounds"], strict=True)]
    assert cost["dispatch_pair_ratios"] == pytest.approx(quotients, abs=1e-3)
    assert cost["dispatch_rate_ratio"] == pytest.approx(statistics.median(quotients), abs=1e-3)
    assert report["meets"]["tls_dispatch_rate_ratio"] == cost["meets"]
    summary = result.output.strip().splitlines()[-1]
    assert "mTLS vs plaintext" in summary and f"rate ratio {cost['dispatch_rate_ratio']:.2f}" in summary, summary


def test_bench_dispatch_refuses_a_cluster_that_never_reports() -> None:
    """``--report-hz 0`` once meant "no reports": since the staleness rule every instance is then stale within a
    second and every Dispatch failed (UNAVAILABLE), so the rounds measured only errors. It is a usage error now."""
    args = ["bench", "dispatch", "--instances", "4", "--concurrency", "2", "--duration", "0.2", "--rounds", "1"]
    args += ["--decisions", "10", "--report-hz", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "--report-hz" in result.output and "x>0.0" in result.output, result.output
