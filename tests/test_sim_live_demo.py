"""``llumnix sim live``: the prediction on the live cluster's shape, and the table that puts live beside simulated.

The live half needs a running ``llumnix serve`` (minutes of real time); it is exercised by the committed run in
``docs/sim/live/``. Here: the simulator half on a tiny workload, and the ratio arithmetic on hand-made figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pyllumnix.tools.recording_sink import RecordingSink
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


def test_engine_loop_overhead_per_step_from_the_llumlet_logs(tmp_path: Path) -> None:
    from pyllumnix.tools.sim.live_demo import engine_loop

    pre = "2026-12-01 18:17:20,363 INFO pyllumnix.data_plane.llumlet.llumlet: "
    (tmp_path / "llumlet-0.log").write_text(
        pre + "engine loop of instance-0: 100 steps, modelled 5.000 s, stepped 5.200 s, between steps 0.100 s\n"
    )
    (tmp_path / "llumlet-1.log").write_text(
        pre + "engine loop of instance-1: 300 steps, modelled 15.000 s, stepped 15.300 s, between steps 0.200 s, "
        "overhead sq 0.002000 s2\n"
    )
    (tmp_path / "frontend.log").write_text(pre + "engine loop of x: 1 steps, modelled 0 s, stepped 9 s, between 0 s\n")
    loop = engine_loop(tmp_path)
    assert set(loop["instances"]) == {"instance-0", "instance-1"}
    assert loop["total"]["steps"] == 400
    # (20.5 stepped + 0.3 between - 20.0 modelled) / 400 steps = 2 ms a step
    assert loop["overhead_ms_per_step"] == pytest.approx(2.0)
    assert loop["between_ms_per_step"] == pytest.approx(0.75)
    assert loop["overhead_sd_ms_per_step"] is None  # instance-0's line (an older llumlet) has no sum of squares
    (tmp_path / "llumlet-0.log").write_text(
        pre + "engine loop of instance-0: 100 steps, modelled 5.000 s, stepped 5.200 s, between steps 0.100 s, "
        "overhead sq 0.003000 s2\n"
    )
    # sqrt(0.005 s2 / 400 - (2 ms)^2) = sqrt(12.5 - 4) ms
    assert engine_loop(tmp_path)["overhead_sd_ms_per_step"] == pytest.approx(8.5**0.5, abs=1e-3)
    assert engine_loop(tmp_path / "missing")["overhead_ms_per_step"] is None  # no figures: none made up


def test_the_live_step_overhead_is_added_to_every_simulated_step_that_does_work() -> None:
    from pyllumnix.tools.sim.live_demo import LiveSimConfig

    plain = LiveSimConfig(instances=2).engine_profile()
    slow = LiveSimConfig(instances=2, step_overhead_ms=4.0).engine_profile()
    assert slow.total_blocks == plain.total_blocks and slow.split_steps == plain.split_steps
    assert slow.step_seconds(0, 8, 4000) == pytest.approx(plain.step_seconds(0, 8, 4000) + 0.004)
    assert slow.step_seconds(512, 8, 4000) == pytest.approx(plain.step_seconds(512, 8, 4000) + 0.004)
    assert slow.step_seconds(0, 0, 0) == 0.0  # an empty step stays free (the simulator idles on it)


def test_predict_with_the_measured_overhead_slows_the_simulated_decode() -> None:
    from pyllumnix.tools.sim.live_demo import predict

    workload = "M-M:poisson:rate=4:n=40"
    plain = predict(workload, 0, 2)
    slow = predict(workload, 0, 2, overhead_ms={"llumnix": 10.0, "infaas++": 10.0})
    for policy in ("llumnix", "infaas++"):
        assert slow[policy]["step_overhead_ms"] == 10.0 and plain[policy]["step_overhead_ms"] == 0.0
        assert sum(plain[policy]["dispatched"]) == 40  # every request placed once, on one of the 2 instances
        # ~10 ms on ~30-60 ms decode steps (llama-7b-a10: 29.2 ms + 1.25 ms per sequence + context)
        ratio = slow[policy]["overall"]["decode_s"]["mean"] / plain[policy]["overall"]["decode_s"]["mean"]
        assert 1.1 < ratio < 1.4, ratio


def test_reused_live_runs_are_set_against_the_calibrated_prediction(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    workload = "M-M:poisson:rate=4:n=40"
    loop = {"overhead_ms_per_step": 3.0}
    live_runs = {
        "llumnix": {**_overall(2.0), "engine_loop": loop, "migration_downtime_ms": 150.0},
        "infaas++": {**_overall(6.0), "engine_loop": {"overhead_ms_per_step": 5.0}},
    }
    (work / "live_runs.json").write_text(json.dumps(live_runs))
    out = tmp_path / "out"
    args = ["live", "--workload", workload, "--instances", "2", "--out", str(out), "--reuse-live", str(work)]
    result = CliRunner().invoke(sim, [*args, "--ensemble", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "live.json").read_text())
    assert report["step_overhead_ms"] == {"llumnix": 3.0, "infaas++": 5.0}
    assert len(report["simulated_calibrated"]) == 2  # one simulation per jitter seed
    assert report["simulated_calibrated"][1]["infaas++"]["step_overhead_ms"] == 5.0
    p99 = next(r for r in report["table_calibrated"] if r["figure"] == "prefill P99")
    assert p99["live_ratio"] == pytest.approx(3.0)
    assert p99["live_vs_sim"] == pytest.approx(3.0 / p99["sim_ratio"])
    assert p99["sim_ratio_min"] <= p99["sim_ratio"] <= p99["sim_ratio_max"] and len(p99["sim_ratios"]) == 2
    assert report["migration_stage_ms"] == 150.0  # the live llumnix run's mean downtime
    text = (out / "LIVE.md").read_text()
    assert "measured per-step overhead" in text and "llumnix 3.00 ms" in text
    assert "simulated with the live step overhead" in report["summary"]


def test_without_engine_loop_figures_the_calibration_refuses(tmp_path: Path) -> None:
    (tmp_path / "live_runs.json").write_text(json.dumps({"llumnix": _overall(1.0), "infaas++": _overall(2.0)}))
    args = ["live", "--workload", "M-M:poisson:rate=4:n=10", "--instances", "2", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(sim, [*args, "--reuse-live", str(tmp_path)])
    assert result.exit_code != 0 and "no engine-loop figures" in result.output


async def test_the_llumlet_accounts_for_its_loop_time(sink: RecordingSink, caplog: pytest.LogCaptureFixture) -> None:
    """Modelled step time, wall time per step and the wall time handlers held the engine between steps."""
    import asyncio
    import logging

    from pyllumnix.data_plane.engine.sim import SimEngine
    from pyllumnix.data_plane.llumlet.llumlet import Llumlet
    from pyllumnix.protos.llumnix.v1 import common_pb2

    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "inst-loop")
    llumlet.start()
    caplog.set_level(logging.INFO, logger="pyllumnix.data_plane.llumlet.llumlet")
    try:
        assert sink.server is not None
        request = common_pb2.EngineRequest(
            request_id="r", prompt_token_ids=[1, 2, 3], frontend_address=sink.server.address,
            sampling=common_pb2.SamplingParams(max_tokens=60, seed=1, ignore_eos=True),
        )  # fmt: skip
        await llumlet.add_request(request)
        while llumlet.stats.steps < 5:
            await asyncio.sleep(0.005)
        async with llumlet.engine_lock:  # a handler holding the engine between two steps
            await asyncio.sleep(0.2)
        await sink.wait("r", timeout=30)
        async with llumlet.engine_lock:  # the last step's accounting is done
            pass
        st = llumlet.stats
        assert st.steps == 60  # one token a step, the first from the prefill
        assert st.step_modelled_s > 0 and st.step_wall_s >= st.step_modelled_s * 0.99
        assert 0.2 <= st.between_steps_s < 0.2 + st.step_wall_s
        assert st.overhead_sq_s2 >= 0.2**2  # the one step that waited 0.2 s carries it in its own overhead
    finally:
        await llumlet.stop()
    assert any(r.getMessage().startswith(f"engine loop of inst-loop: {st.steps} steps") for r in caplog.records)


def test_the_overhead_is_drawn_per_step_with_the_measured_mean_and_spread() -> None:
    from pyllumnix.tools.sim.live_demo import LiveSimConfig

    def draws(jitter_seed: int) -> list[float]:
        prof = LiveSimConfig(step_overhead_ms=2.0, step_overhead_sd_ms=6.0, jitter_seed=jitter_seed).engine_profile()
        plain = LiveSimConfig().engine_profile().step_seconds(0, 4, 1000)
        return [prof.step_seconds(0, 4, 1000) - plain for _ in range(20000)]

    a = draws(0)
    assert min(a) >= 0.0  # never faster than modelled
    assert sum(a) / len(a) == pytest.approx(0.002, rel=0.1)
    sd = (sum((x - 0.002) ** 2 for x in a) / len(a)) ** 0.5
    assert sd == pytest.approx(0.006, rel=0.15)
    assert draws(0)[:50] == a[:50] and draws(1)[:50] != a[:50]  # reproducible per jitter seed, distinct across


def test_ensemble_table_takes_the_median_ratio_and_its_range() -> None:
    from pyllumnix.tools.sim.live_demo import ensemble_table

    members = [{"llumnix": _overall(10.0), "infaas++": _overall(x)} for x in (20.0, 60.0, 30.0)]
    live_res = {"llumnix": _overall(10.0), "infaas++": _overall(40.0)}
    p99 = next(r for r in ensemble_table(live_res, members) if r["figure"] == "prefill P99")
    assert (p99["sim_ratio"], p99["sim_ratio_min"], p99["sim_ratio_max"]) == pytest.approx((3.0, 2.0, 6.0))
    assert p99["sim"] == {"llumnix": 10.0, "infaas++": 30.0}
    assert p99["live_ratio"] == pytest.approx(4.0) and p99["live_vs_sim"] == pytest.approx(4.0 / 3.0)


def test_per_request_comparison_reads_the_kept_run(tmp_path: Path) -> None:
    """Records, dispatch spans and migration spans of a kept live run, set against simulated records."""
    from pyllumnix.tools.metrics.records import RequestRecord
    from pyllumnix.tools.sim import live_compare

    def rec(rid: str, arrival: float, first: float, n: int = 3) -> dict[str, Any]:
        times = [first + 0.05 * i for i in range(n)]
        return {"request_id": rid, "priority": 1, "input_len": 8, "arrival": arrival, "first_token_time": first,
                "finish_time": times[-1], "num_output_tokens": n, "token_times": times, "error": ""}  # fmt: skip

    live_lines = [rec("a", 0.0, 0.1), rec("b", 1.0, 13.0), rec("c", 2.0, 2.5), rec("d", 3.0, 3.2)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(x) + "\n" for x in live_lines))
    live = live_compare.live_records(tmp_path / "records.jsonl")
    assert [r.request_id for r in live] == ["a", "b", "c", "d"] and live[1].token_times == (13.0, 13.05, 13.1)

    def srec(rid: str, arrival: float, first: float) -> RequestRecord:
        return RequestRecord(rid, 1, arrival, first, first + 0.08, 3, 8)  # 0.04 s a token

    sim_records = [srec("a", 0.0, 0.2), srec("b", 1.0, 12.0), srec("c", 2.0, 14.0), srec("d", 3.0, 3.1)]
    row = live_compare.compare(live, sim_records)
    assert row["requests"] == 4
    assert row["queued_over_10s"] == {"live": 1, "sim": 2, "both": 1}
    assert row["share_prefill_over_2s"] == {"live": 0.25, "sim": 0.5}
    assert row["worst_live"][0] == ("b", 12.0, 11.0) and row["worst_sim"][0] == ("c", 12.0, 0.5)
    assert row["decode_live_over_sim_median"] == pytest.approx(1.25)

    traces = tmp_path / "traces"
    traces.mkdir()
    spans = [{"name": "dispatch", "attributes": {"llumnix.instance_id": i}} for i in ("x", "y", "x", "x")]
    spans.append({"name": "add_request", "attributes": {"llumnix.instance_id": "y"}})  # not a dispatch
    (traces / "llumnix-frontend-1.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))
    assert live_compare.live_dispatch(traces) == [1, 3]
    committed = {"llumnix.outcome": "MIGRATION_OUTCOME_COMMITTED", "llumnix.downtime_ms": 20.0}
    migs = [
        {"name": "migration", "start_ns": 0, "end_ns": 2_000_000_000, "attributes": committed},
        {"name": "migration", "start_ns": 0, "end_ns": 500_000_000, "attributes": {"llumnix.outcome": "X"}},
        {"name": "migration.commit", "start_ns": 0, "end_ns": 1, "attributes": committed},
    ]
    (traces / "llumnix-llumlet-instance-0-2.jsonl").write_text("".join(json.dumps(s) + "\n" for s in migs))
    m = live_compare.live_migrations(traces)
    assert (m["attempted"], m["committed"]) == (2, 1)
    assert m["duration_s"]["mean"] == pytest.approx(2.0) and m["downtime_s"]["mean"] == pytest.approx(0.02)


def test_migration_downtime_from_the_llumlet_logs(tmp_path: Path) -> None:
    from pyllumnix.tools.sim.live_demo import migration_downtime_ms

    pre = "2026-12-01 18:17:20,363 INFO pyllumnix.data_plane.llumlet.migration.coordinator: migration m1 of r1 "
    (tmp_path / "llumlet-0.log").write_text(
        pre + "committed: 2 stages, downtime 140.4 ms = reserve 13.2 + send 1 blocks 58.2\n" + pre + "in: freed 0\n"
    )
    (tmp_path / "llumlet-1.log").write_text(pre + "committed: 1 stages, downtime 59.6 ms = reserve 1.0\n")
    assert migration_downtime_ms(tmp_path) == pytest.approx(100.0)
    assert migration_downtime_ms(tmp_path / "none") is None


def test_the_live_migration_cost_replaces_the_paper_transfer_model() -> None:
    """A stage costs the live handshake (its measured downtime) plus the live payload's bytes, not 7B's 8 MiB blocks
    at 20 Gbit/s with 2 ms handshakes."""
    from pyllumnix.tools.sim.live_demo import LIVE_BYTES_PER_TOKEN, live_config

    paper = live_config("llumnix", 4, 0)
    live = live_config("llumnix", 4, 0, stage_ms=150.0)
    paper_blocks, live_blocks = paper.engine_profile().block_bytes, live.engine_profile().block_bytes
    assert live_blocks == 16 * LIVE_BYTES_PER_TOKEN == 128 * 1024 and paper_blocks == 8 * 1024 * 1024
    assert paper.transfer.stage_seconds(4, paper_blocks) == pytest.approx(0.002 + 4 * 8 * 2**20 * 8 / 20e9)
    assert live.transfer.stage_seconds(4, live_blocks) == pytest.approx(0.150 + 4 * 2**17 * 8 / 20e9)
    assert live.engine_profile().total_blocks == paper.engine_profile().total_blocks  # capacity unchanged
