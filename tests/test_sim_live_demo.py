"""``llumnix sim live``: the prediction on the live cluster's shape, and the table that puts live beside simulated.

The live half needs a running ``llumnix serve`` (minutes of real time); it is exercised by the committed run in
``docs/sim/live/``. Here: the simulator half on a tiny workload, and the ratio arithmetic on hand-made figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pyllumnix.tools.sim.cli import sim
from pyllumnix.tools.sim.live_demo import compare_table, markdown


def _overall(prefill_p99: float, prefill_mean: float = 1.0) -> dict[str, Any]:
    return {"overall": {"prefill_s": {"p99": prefill_p99, "mean": prefill_mean}}}


def test_ratios_are_infaas_over_llumnix_and_live_is_set_against_the_prediction() -> None:
    sim_res = {"llumnix": _overall(10.0), "infaas++": _overall(50.0)}
    live_res = {"llumnix": _overall(20.0, 2.0), "infaas++": _overall(80.0, 1.0)}
    rows = {r["figure"]: r for r in compare_table(live_res, sim_res)}
    p99 = rows["prefill P99"]
    assert p99["sim_ratio"] == pytest.approx(5.0)
    assert p99["live_ratio"] == pytest.approx(4.0)
    assert p99["live_vs_sim"] == pytest.approx(0.8)
    assert rows["prefill mean"]["live_ratio"] == pytest.approx(0.5)  # Llumnix worse: below 1
    # A figure neither side reported has no ratio rather than a made-up one.
    assert rows["decode P99"]["sim_ratio"] is None and "live_vs_sim" not in rows["decode P99"]


def test_without_a_live_run_the_table_holds_the_prediction_only() -> None:
    rows = compare_table(None, {"llumnix": _overall(1.0), "infaas++": _overall(3.0)})
    assert all("live" not in r for r in rows)
    report = {"instances": 4, "workload": "w", "seed": 0, "command": "c", "table": rows, "summary": "s"}
    text = markdown(report)
    assert "| prefill P99 | 3 | 1 | 3x | - | - | - | - |" in text


def test_predict_only_runs_both_policies_on_the_live_shape(tmp_path: Path) -> None:
    out = tmp_path / "live"
    result = CliRunner().invoke(
        sim,
        ["live", "--predict-only", "--workload", "M-M:poisson:rate=4:n=40", "--instances", "2", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "live.json").read_text())
    assert report["live"] is None and set(report["simulated"]) == {"llumnix", "infaas++"}
    for policy in ("llumnix", "infaas++"):
        assert report["simulated"][policy]["overall"]["prefill_s"]["count"] == 40
    assert report["simulated"]["infaas++"]["migrations"] == 0  # the baseline never migrates
    assert "prefill P99 INFaaS++/Llumnix: simulated" in result.output
    assert (out / "LIVE.md").read_text().startswith("# Live demonstration")


def test_migrations_are_counted_from_the_llumlet_logs(tmp_path: Path) -> None:
    from pyllumnix.tools.sim.live_demo import _committed_migrations

    line = "2026-12-01 18:17:20,363 INFO pyllumnix.data_plane.llumlet.migration.coordinator: migration m1 of r1 "
    (tmp_path / "llumlet-0.log").write_text(line + "committed: 1 stages, downtime 288.4 ms\n" + line + "in: freed 0\n")
    (tmp_path / "llumlet-1.log").write_text(line + "committed: 2 stages, downtime 113.5 ms\n")
    (tmp_path / "frontend.log").write_text(line + "committed: 2 stages\n")  # not a llumlet's
    assert _committed_migrations(tmp_path) == 2
