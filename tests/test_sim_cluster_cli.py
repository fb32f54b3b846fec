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
    args += ["--scaling-warmup-s", "0", "--split-steps", "--migrate-out-threshold", "10"]
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
    result = CliRunner().invoke(cli, [*args, "--seeds", "1"])
    assert result.exit_code == 0, result.output
    md = (out / "COMPARE.md").read_text()
    assert "## The paper" in md and "2.9-8.6x" in md
    data = json.loads((out / "compare.json").read_text())["runs"]["0"]
    assert len(data) == 4 and all(set(runs) == {"no-priority", "priority"} for runs in data.values())
    assert (out / "prefill_p99_vs_cv.png").exists()


def test_compare_fig11_reduced_smoke(tmp_path: Path) -> None:
    """CI's reduced Fig. 11: two seeds of one trace on the calibrated testbed (prefill-only / decode-only steps),
    Llumnix vs INFaaS++; the report carries median [min-max] ratios, the targets, the calibration table and tails."""
    out = tmp_path / "fig11"
    args = ["sim", "compare", "--scenario", "paper-fig11", "--requests", "40", "--instances", "2", "--seeds", "2"]
    args += ["--traces", "M-M", "--policies", "llumnix", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "compare.json").read_text())
    assert doc["seeds"] == [0, 1]
    for seed in ("0", "1"):
        (group,) = doc["runs"][seed]
        runs = doc["runs"][seed][group]
        assert set(runs) == {"infaas++", "llumnix"}
        for summary in runs.values():
            assert summary["config"]["split_steps"] and summary["config"]["migrate_out_threshold"] == 10.0
            assert summary["conservation"]["ok"] and summary["seed"] == int(seed)
            assert set(summary["tail"]["prefill_s"]) == {"p50", "p99", "p999"}
            assert 0.0 <= summary["tail"]["prefill_over_10s"] <= summary["tail"]["prefill_over_2s"] <= 1.0
    # different seeds, different arrivals
    assert doc["runs"]["0"][group]["infaas++"]["overall"] != doc["runs"]["1"][group]["infaas++"]["overall"]
    md = (out / "COMPARE.md").read_text()
    for heading in ("## Acceptance targets", "## Calibration", "## Absolute figures", "prefill P99.9", "0.047-0.075"):
        assert heading in md, heading
    assert "] |" in md  # a [min-max] spread beside the medians
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(cli, [*args[:-2], "--traces", "X-Y", "--out", str(out)])
    assert bad.exit_code != 0 and "unknown traces" in bad.output
    # two worker processes give the very same runs (each is deterministic), in the same order
    par = tmp_path / "par"
    result = CliRunner().invoke(cli, [*args[:-1], str(par), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    doc2 = json.loads((par / "compare.json").read_text())
    for seed, runs in doc["runs"].items():
        for group, by_label in runs.items():
            assert list(doc2["runs"][seed][group]) == list(by_label)
            for label, summary in by_label.items():
                assert doc2["runs"][seed][group][label]["overall"] == summary["overall"]


def test_compare_fig14_and_sweep_reduced_smoke(tmp_path: Path) -> None:
    """CI's reduced Fig. 14 and rate sweep (`make sim-report` runs both at full size): Fig. 14 runs the artifact's
    scaler (start at half the instances, range 1 to all of them, a 100 s warm-up, the last instance drained,
    scale-down = scale-up + 50 across the threshold sweep) under both policies, INFaaS++ without migration; the sweep
    runs M-M at 0.5-2x the artifact's middle rate (scaled to the instances) with M-M's migrate-out threshold."""
    out = tmp_path / "fig14"
    args = ["sim", "compare", "--scenario", "paper-fig14", "--requests", "30", "--instances", "4", "--seeds", "1"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = json.loads((out / "compare.json").read_text())["runs"]["0"]
    thresholds = sorted(int(g.split("=")[1].split()[0]) for g in runs if g.startswith("threshold"))
    assert thresholds == [5, 25, 45, 65, 85]
    assert {g for g in runs if g.startswith("gamma")} == {f"gamma cv={cv} rate=0.5" for cv in (2, 4, 6)}
    for group, by_policy in runs.items():
        assert set(by_policy) == {"infaas++", "llumnix"}, group
        for policy, summary in by_policy.items():
            config = summary["config"]
            assert config["autoscale"] and config["scaling_warmup_s"] == 100.0 and config["drain_victim"] == "last"
            assert (config["min_instances"], config["max_instances"]) == (1, 4)
            assert summary["instances"]["initial"] == 2
            assert config["scale_down_threshold"] == config["scale_up_threshold"] + 50
            assert config["enable_migration"] == (policy == "llumnix")
            assert summary["conservation"]["ok"] and summary["instance_hours"] > 0
    assert all(s["migration"]["committed"] == 0 for s in (r["infaas++"] for r in runs.values()))
    md = (out / "COMPARE.md").read_text()
    assert ">= 15 % fewer instance-hours, P99 prefill no worse" in md and "instance-hours" in md
    for png in ("instances.png", "threshold_instance_hours.png", "threshold_p99.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    sweep = tmp_path / "sweep"
    args = ["sim", "compare", "--scenario", "paper-fig11-sweep", "--traces", "M-M", "--requests", "30"]
    result = CliRunner().invoke(cli, [*args, "--instances", "2", "--seeds", "1", "--out", str(sweep)])
    assert result.exit_code == 0, result.output
    runs = json.loads((sweep / "compare.json").read_text())["runs"]["0"]
    rates = sorted(float(g.split("rate=")[1]) for g in runs)
    middle = 7.7 * 2 / 16
    assert [round(r / middle, 2) for r in rates] == [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    for by_policy in runs.values():
        assert set(by_policy) == {"infaas++", "llumnix"}
        for summary in by_policy.values():
            assert summary["config"]["split_steps"] and summary["config"]["migrate_out_threshold"] == 10.0
            assert summary["conservation"]["ok"]
    for png in ("mm_prefill_mean_vs_rate.png", "mm_prefill_p99_vs_rate.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"


def test_sim_high_headroom_reserve_flag(tmp_path: Path) -> None:
    """``--high-headroom-reserve`` reaches the run's config (the ClusterConfig field's simulator side); a value out of
    range is a usage error naming the option."""
    args = ["sim", "--instances", "2", "--profile", "tiny", "--high-headroom-reserve", "8"]
    args += ["--workload", "fixed:poisson:rate=20:in=32:out=16:n=20:priority_share=0.2", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["config"]["high_headroom_reserve_blocks"] == 8
    bad = CliRunner().invoke(cli, [*args[:4], "--high-headroom-reserve=-1", *args[6:]])
    assert bad.exit_code == 2 and "--high-headroom-reserve" in bad.output
