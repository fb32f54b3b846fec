"""``llumnix sim live``: the simulator's comparison on a live cluster, with the simulator's prediction beside it.

One workload is replayed twice against ``llumnix serve`` (4 sim llumlets on the calibrated ``llama-7b-a10`` profile,
scaled KV payload, default security: mutual TLS inside, the client context file it writes), once with the dispatch
policy ``llumnix`` and once with ``infaas++`` -- switched through the cluster config (``llmctl config set
dispatch.policy``), as an operator would -- each time by ``llumnix bench serving`` (gRPC, the context's credentials).
The simulator runs the same arrivals on a cluster of the same shape (same profile, mixed engine steps as the live
llumlet runs them, 50 ms load reports as the live llumlets send) under both policies. The report puts the live
ratio INFaaS++ / Llumnix of every latency figure next to the simulated one, twice: simulated with the profile alone,
and calibrated from the live run itself -- every simulated step costs the llumlets' measured per-step overhead (mean
and spread, drawn per step, over ``--ensemble`` draws) and a migration stage the live run's measured mean downtime.
With ``--work-dir`` the runs' records stay and ``per_request`` compares them with the simulation request by request
(``live_compare.py``); ``--reuse-live`` recomputes the simulations against a kept run.

Every process is started by this command (``llumnix serve`` in its own process group) and stopped by it, also on
failure. Sized by the workload: the default took 22-24 minutes here (two replays of 9-13 minutes: the arrivals span
207 s, M-M's longest requests then decode ~6k tokens); smaller M-M runs did not queue enough on 4 instances for the
policies to part (docs/sim/REPORT.md).

stdout is the JSON report alone (also written to ``--out``); the summary line and the progress bar (one step per
simulated or live policy run, the simulator's virtual clock beneath; a terminal only, ``LLUMNIX_PROGRESS`` forces) go
to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.progress import Progress

from pyllumnix.data_plane.engine.profile import Profile
from pyllumnix.tools.bench_peers import start_project
from pyllumnix.tools.progress import Steps, progress_bar
from pyllumnix.tools.serve import DEFAULTS as SERVE_DEFAULTS
from pyllumnix.tools.sim import live_compare
from pyllumnix.tools.sim.cluster import ClusterSimulator
from pyllumnix.tools.sim.config import SimConfig, TransferModel
from pyllumnix.tools.sim.runner import _run_with_progress, load_workload
from pyllumnix.tools.sim.summary import run_summary
from pyllumnix.tools.sim.tracker import Track

POLICIES = ("llumnix", "infaas++")
TRACE_ENV = "LLUMNIX_TRACE_FILE"
# The KV bytes per token `llumnix serve` gives its sim llumlets (a scaled payload; the latency model stays 7B's).
LIVE_BYTES_PER_TOKEN = int(SERVE_DEFAULTS["bytes_per_token"])
# M-M at 1.5x the artifact's middle rate for 4 instances (7.7 x 4/16 x 1.5): queues form on 4 instances (arrivals
# over ~3.5 min, then the drain of the longest requests, ~6 min).
DEFAULT_WORKLOAD = "M-M:poisson:rate=2.9:n=600"
FIGURES = (
    ("prefill mean", ("prefill_s", "mean")),
    ("prefill P50", ("prefill_s", "p50")),
    ("prefill P99", ("prefill_s", "p99")),
    ("decode mean", ("decode_s", "mean")),
    ("decode P99", ("decode_s", "p99")),
    ("e2e mean", ("e2e_s", "mean")),
    ("e2e P99", ("e2e_s", "p99")),
)


def _get(d: dict[str, Any], path: tuple[str, ...]) -> float | None:
    cur: Any = d
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, int | float) else None


def _ratio(base: float | None, new: float | None) -> float | None:
    """Baseline / policy (> 1: Llumnix better); None when either is missing or the policy's is 0."""
    return None if base is None or new is None or new <= 0 else base / new


@dataclass(frozen=True)
class SteppedProfile(Profile):
    """A profile whose every engine step costs more than modelled by what a live llumlet adds to each step (sleep
    overshoot, handing the outputs on, handlers and migration stages between two steps): ``step_overhead_ms`` on
    average, drawn per step from a gamma distribution with standard deviation ``step_overhead_sd_ms`` when that is
    set (the live overhead is mostly ~1 ms with rare long pauses: a skewed, non-negative distribution), else fixed."""

    step_overhead_ms: float = 0.0
    step_overhead_sd_ms: float = 0.0
    rng: np.random.Generator | None = field(default=None, compare=False, repr=False)

    def step_seconds(self, prefill_tokens: int, decode_batch: int, decode_context_tokens: int) -> float:
        base = super().step_seconds(prefill_tokens, decode_batch, decode_context_tokens)
        if base <= 0.0 or self.step_overhead_ms <= 0.0:
            return base
        mean, sd = self.step_overhead_ms, self.step_overhead_sd_ms
        if sd > 0.0 and self.rng is not None:
            return base + float(self.rng.gamma((mean / sd) ** 2, sd * sd / mean)) / 1000.0
        return base + mean / 1000.0


@dataclass(frozen=True)
class LiveSimConfig(SimConfig):
    """The simulated run with the live llumlets' measured per-step overhead on top of the profile; ``jitter_seed``
    seeds the per-step draws (one simulation of the many the live cluster's jitter could have produced)."""

    step_overhead_ms: float = 0.0
    step_overhead_sd_ms: float = 0.0
    jitter_seed: int = 0
    # KV bytes per token the live data plane moves (serve's scaled payload; None: the profile's): only the modelled
    # copy time of a migration stage depends on it.
    kv_bytes_per_token: int | None = None

    def engine_profile(self) -> Profile:
        base = super().engine_profile()
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Profile)}
        if self.kv_bytes_per_token is not None:
            fields["bytes_per_token"] = self.kv_bytes_per_token
        return SteppedProfile(
            **fields,
            step_overhead_ms=self.step_overhead_ms,
            step_overhead_sd_ms=self.step_overhead_sd_ms,
            rng=np.random.default_rng([self.seed, self.jitter_seed]),
        )


def live_config(
    policy: str,
    instances: int,
    seed: int,
    overhead_ms: float = 0.0,
    overhead_sd_ms: float = 0.0,
    jitter_seed: int = 0,
    stage_ms: float | None = None,
) -> LiveSimConfig:
    """The simulated counterpart of one live run (see ``predict``)."""
    return LiveSimConfig(
        instances=instances,
        policy=policy,
        enable_migration=policy == "llumnix",
        split_steps=False,  # the live llumlet runs mixed (V1) steps
        report_interval_ms=50,  # the live llumlet's report period
        seed=seed,
        step_overhead_ms=overhead_ms,
        step_overhead_sd_ms=overhead_sd_ms,
        jitter_seed=jitter_seed,
        transfer=TransferModel() if stage_ms is None else TransferModel(stage_latency_ms=stage_ms),
        kv_bytes_per_token=None if stage_ms is None else LIVE_BYTES_PER_TOKEN,
    )


def predict(
    workload: str,
    seed: int,
    instances: int,
    steps: Steps | None = None,
    bar: Progress | None = None,
    overhead_ms: dict[str, float] | None = None,
    records: dict[str, list[Any]] | None = None,
    overhead_sd_ms: dict[str, float] | None = None,
    jitter_seed: int = 0,
    stage_ms: float | None = None,
) -> dict[str, dict[str, Any]]:
    """The simulator's overall latency figures for each policy on the live cluster's shape; ``steps`` advances once
    per policy, ``bar`` (the same Progress) follows each simulation's virtual clock. ``overhead_ms``: per policy, the
    live run's measured per-step overhead, added to every simulated step (None: the profile alone). ``records``
    receives each policy's simulated request records. ``stage_ms``: the live migration's measured per-stage latency
    (its mean downtime, the last stage being a handshake around at most 4 blocks), with the live scaled payload's
    bytes; None: the paper's transfer model."""
    steps = steps or Steps()
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        steps.describe(f"simulating {policy}")
        config = live_config(
            policy, instances, seed, (overhead_ms or {}).get(policy, 0.0), (overhead_sd_ms or {}).get(policy, 0.0),
            jitter_seed, stage_ms,
        )  # fmt: skip
        arrivals = load_workload(workload, seed, config.profile)
        sim = ClusterSimulator(config, arrivals)
        show = bar is not None and not bar.disable
        result = _run_with_progress(sim, bar, f"sim {policy}") if show and bar is not None else sim.run()
        summary = run_summary(result, {a.request_id: a.output_len for a in arrivals})
        out[policy] = {
            "overall": summary["overall"],
            "migrations": summary["migration"].get("committed", 0),
            "migration_attempts": summary["migration"].get("attempted", 0),
            "migration_duration_s": summary["migration"]["duration_s"],
            "migration_downtime_s": summary["migration"]["downtime_s"],
            "step_overhead_ms": config.step_overhead_ms,
            "step_overhead_sd_ms": config.step_overhead_sd_ms,
            "dispatched": sorted(Counter(_first_instance(t) for t in sim.tracker.tracks.values()).values()),
        }
        if records is not None:
            records[policy] = result.records
        steps.step()
    return out


def _first_instance(track: Track) -> str:
    """The instance a simulated request was dispatched to (a migrated one's first source)."""
    return track.migrations[0].source if track.migrations else track.instance


def run_live(
    workload: str, seed: int, instances: int, work: Path, steps: Steps | None = None, *, trace: bool = False
) -> dict[str, dict[str, Any]]:
    """Both policies on a fresh ``llumnix serve`` each, replayed by ``llumnix bench serving``; ``steps`` advances once
    per policy. Each run leaves under ``work``: the serve logs, the replay's report and per-request records
    (``records-<policy>.jsonl``) and, with ``trace``, the components' spans (``traces-<policy>/``: which instance
    each request was dispatched to). The engine-loop figures come from the llumlets' logs once they stopped."""
    steps = steps or Steps()
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        steps.describe(f"live {policy}")
        tag = policy.replace("+", "p")
        traces = work / f"traces-{tag}"
        saved = os.environ.get(TRACE_ENV)
        if trace:
            traces.mkdir(parents=True, exist_ok=True)
            os.environ[TRACE_ENV] = f"{traces}/"  # start_project hands this process's environment to serve
        try:
            system = start_project(policy, work, 0, instances)
        finally:
            if trace and saved is None:
                os.environ.pop(TRACE_ENV, None)
            elif trace and saved is not None:
                os.environ[TRACE_ENV] = saved
        try:
            context = work / f"serve-{tag}" / "context.yaml"
            report = work / f"bench-{tag}.json"
            # The replay's own bar would only fill the captured stderr: this command's bar shows the run instead.
            env = {**os.environ, "LLUMNIX_CONTEXT": str(context), "LLUMNIX_PROGRESS": "0"}
            env.pop(TRACE_ENV, None)
            cmd = [
                sys.executable, "-m", "pyllumnix.tools.cli", "bench", "serving", "--workload", workload,
                "--seed", str(seed), "--max-model-len", "12288", "--json", str(report),
                "--records", str(work / f"records-{tag}.jsonl"),
            ]  # fmt: skip
            t = time.monotonic()
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"bench serving ({policy}) exited {proc.returncode}: {proc.stderr[-2000:]}")
            summary = json.loads(report.read_text())
            dead = [p.name for p in system.procs if not _alive(p.pid)]
            out[policy] = {
                "overall": summary["overall"],
                "completed": summary.get("completed"),
                "failed": summary.get("failed"),
                "errors": summary.get("errors", []),
                # The client cannot see migrations; the llumlets log each committed one.
                "migrations": _committed_migrations(work / f"serve-{policy.replace('+', 'p')}"),
                "migration_downtime_ms": migration_downtime_ms(work / f"serve-{policy.replace('+', 'p')}"),
                "wall_s": round(time.monotonic() - t, 1),
                "dead_processes": dead,
                "serve": system.notes,
            }  # fmt: skip
        finally:
            system.stop()
        out[policy]["engine_loop"] = engine_loop(work / f"serve-{tag}")
        steps.step()
    (work / "live_runs.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


ENGINE_LOOP = re.compile(
    r"engine loop of (\S+): (\d+) steps, modelled ([\d.]+) s, stepped ([\d.]+) s, between steps ([\d.]+) s"
    r"(?:, overhead sq ([\d.]+) s2)?"
)


def engine_loop(log_dir: Path) -> dict[str, Any]:
    """Per llumlet and in total: its engine steps, their modelled durations, the wall time they took and the wall time
    between steps while work waited (each llumlet logs these when it stops), and the mean overhead per step:
    (stepped + between - modelled) / steps, the live cost the simulator's back-to-back steps lack."""
    per: dict[str, dict[str, float]] = {}
    for f in sorted(log_dir.glob("llumlet-*.log")):
        for m in ENGINE_LOOP.finditer(f.read_text(errors="replace")):
            per[m[1]] = {"steps": int(m[2]), "modelled_s": float(m[3]), "stepped_s": float(m[4]),
                         "between_s": float(m[5]), "overhead_sq_s2": float(m[6] or "nan")}  # fmt: skip
    keys = ("steps", "modelled_s", "stepped_s", "between_s", "overhead_sq_s2")
    total = {k: sum(v[k] for v in per.values()) for k in keys}
    n = total["steps"]
    overhead = (total["stepped_s"] + total["between_s"] - total["modelled_s"]) / n if n else None
    sd = None
    if overhead is not None and math.isfinite(total["overhead_sq_s2"]):
        sd = round(math.sqrt(max(0.0, total["overhead_sq_s2"] / n - overhead**2)) * 1000.0, 3)
    return {
        "instances": per,
        "total": total,
        "overhead_ms_per_step": None if overhead is None else round(overhead * 1000.0, 3),
        "overhead_sd_ms_per_step": sd,
        "stepping_overhead_ms_per_step": None if not n else round(
            (total["stepped_s"] - total["modelled_s"]) / n * 1000.0, 3),
        "between_ms_per_step": None if not n else round(total["between_s"] / n * 1000.0, 3),
    }  # fmt: skip


def _committed_migrations(log_dir: Path) -> int:
    """Committed migrations, counted from the llumlet logs (the coordinator logs one line per commit)."""
    return sum(
        1
        for f in sorted(log_dir.glob("llumlet-*.log"))
        for line in f.read_text(errors="replace").splitlines()
        if "coordinator: migration" in line and " committed: " in line
    )


DOWNTIME = re.compile(r"coordinator: migration .* committed: \d+ stages, downtime ([\d.]+) ms")


def migration_downtime_ms(log_dir: Path) -> float | None:
    """Mean downtime of the committed migrations, from the llumlet logs (None: no migration committed)."""
    values = [
        float(m[1])
        for f in sorted(log_dir.glob("llumlet-*.log"))
        for m in DOWNTIME.finditer(f.read_text(errors="replace"))
    ]
    return round(sum(values) / len(values), 3) if values else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def compare_table(live: dict[str, dict[str, Any]] | None, sim: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per figure: absolute values and the ratio INFaaS++ / Llumnix, live and simulated."""
    rows = []
    for name, path in FIGURES:
        row: dict[str, Any] = {"figure": name}
        for src, data in (("sim", sim), ("live", live)):
            if data is None:
                continue
            vals = {p: _get(data[p]["overall"], path) for p in POLICIES}
            row[src] = vals
            row[f"{src}_ratio"] = _ratio(vals["infaas++"], vals["llumnix"])
        if live is not None and row.get("sim_ratio") and row.get("live_ratio"):
            row["live_vs_sim"] = row["live_ratio"] / row["sim_ratio"]
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None, unit: str = "") -> str:
        return "-" if x is None else f"{x:.3g}{unit}"

    def ratio(r: dict[str, Any]) -> str:
        text = f(r.get("sim_ratio"), "x")
        if r.get("sim_ratio_min") is not None and r.get("sim_ratio_max") is not None:
            text += f" ({f(r['sim_ratio_min'])}-{f(r['sim_ratio_max'])})"
        return text

    lines = [
        f"# Live demonstration: Llumnix vs INFaaS++ on `llumnix serve`, {report['instances']} sim llumlets",
        "",
        f"Workload `{report['workload']}`, seed {report['seed']}; command: `{report['command']}`.",
    ]
    tables = [("Simulated with the profile alone", report["table"])]
    if report.get("table_calibrated"):
        oh = report.get("step_overhead_ms") or {}
        sd = report.get("step_overhead_sd_ms") or {}
        n = len(report.get("simulated_calibrated") or [])
        tables.append(
            (
                "Simulated with the live run's measured per-step overhead added to every step (mean, SD: "
                + ", ".join(f"{p} {oh.get(p, 0):.2f} ms, {sd.get(p, 0):.2f} ms" for p in POLICIES)
                + f"); migration stages cost the live mean downtime ({f(report.get('migration_stage_ms'))} ms) and "
                f"copy the live {LIVE_BYTES_PER_TOKEN // 1024} KiB/token payload; median of {n} draws of the overhead, "
                "the sim ratio's range in brackets",
                report["table_calibrated"],
            )
        )
    for title, table in tables:
        lines += [
            "",
            f"{title}:",
            "",
            "| figure | sim infaas++ (s) | sim llumnix (s) | sim ratio | live infaas++ (s) | live llumnix (s) "
            "| live ratio | live / sim |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in table:
            sim, live = r.get("sim", {}), r.get("live", {})
            lines.append(
                f"| {r['figure']} | {f(sim.get('infaas++'))} | {f(sim.get('llumnix'))} | {ratio(r)} "
                f"| {f(live.get('infaas++'))} | {f(live.get('llumnix'))} | {f(r.get('live_ratio'), 'x')} | "
                f"{f(r.get('live_vs_sim'))} |"
            )
    lines += ["", report["summary"], ""]
    return "\n".join(lines)


def per_request_comparison(
    work: Path, calibrated: dict[str, dict[str, Any]], sim_records: dict[str, list[Any]]
) -> dict[str, Any]:
    """Per policy: the kept live run's records beside the calibrated simulation's (``live_compare.compare``) and the
    requests dispatched per instance, live (its dispatch spans, when traced) and simulated."""
    out: dict[str, Any] = {}
    for policy in POLICIES:
        tag = policy.replace("+", "p")
        records = work / f"records-{tag}.jsonl"
        if not records.exists():
            continue
        row = live_compare.compare(live_compare.live_records(records), sim_records[policy])
        traces = work / f"traces-{tag}"
        row["dispatched"] = {
            "live": live_compare.live_dispatch(traces) if traces.is_dir() else None,
            "sim": calibrated[policy]["dispatched"],
        }
        sim_mig = calibrated[policy]
        row["migrations"] = {
            "live": live_compare.live_migrations(traces) if traces.is_dir() else None,
            "sim": {
                "attempted": sim_mig["migration_attempts"],
                "committed": sim_mig["migrations"],
                "duration_s": sim_mig["migration_duration_s"],
                "downtime_s": sim_mig["migration_downtime_s"],
            },
        }
        out[policy] = row
    return out


def ensemble_table(
    live: dict[str, dict[str, Any]] | None, members: list[dict[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``compare_table`` over several simulations of the same case: per figure the median of each policy's value,
    the median ratio (``sim_ratio``) and its range over the members; live/sim is set against the median ratio."""
    tables = [compare_table(live, m) for m in members]
    rows = []
    for i, (name, _) in enumerate(FIGURES):
        row: dict[str, Any] = {"figure": name}
        vals = {p: [t[i]["sim"][p] for t in tables if t[i]["sim"][p] is not None] for p in POLICIES}
        row["sim"] = {p: float(np.median(v)) if v else None for p, v in vals.items()}
        ratios = [t[i]["sim_ratio"] for t in tables if t[i].get("sim_ratio") is not None]
        row["sim_ratio"] = float(np.median(ratios)) if ratios else None
        row["sim_ratio_min"] = min(ratios) if ratios else None
        row["sim_ratio_max"] = max(ratios) if ratios else None
        row["sim_ratios"] = ratios
        if live is not None:
            row["live"] = tables[0][i]["live"]
            row["live_ratio"] = tables[0][i]["live_ratio"]
            if row["sim_ratio"] and row["live_ratio"]:
                row["live_vs_sim"] = row["live_ratio"] / row["sim_ratio"]
        rows.append(row)
    return rows


def _p99_summary(label: str, table: list[dict[str, Any]], live: bool) -> str:
    p99 = next(r for r in table if r["figure"] == "prefill P99")
    return f"{label} {p99.get('sim_ratio') or 0:.2f}x" + (
        f" (live/sim {p99.get('live_vs_sim') or 0:.2f})" if live else ""
    )


@click.command("live")
@click.option("--workload", default=DEFAULT_WORKLOAD, show_default=True, help="Workload SPEC (tools/workload).")
@click.option("--seed", default=0, show_default=True)
@click.option("--instances", default=4, show_default=True, help="Sim llumlets (and simulated instances).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--predict-only", is_flag=True, help="Only the simulator's prediction (no live cluster).")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the live runs' logs, reports and per-request records here (default: a temporary directory, removed).",
)
@click.option(
    "--ensemble",
    default=5,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Calibrated simulations per policy, each with its own draw of the per-step overhead (jitter seeds 0..N-1).",
)
@click.option("--trace", is_flag=True, help="Record the components' spans (which instance each request went to).")
@click.option(
    "--reuse-live",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Take the live results from an earlier run's --work-dir (its live_runs.json) instead of running them.",
)
def live(
    workload: str,
    seed: int,
    instances: int,
    out: Path,
    predict_only: bool,
    work_dir: Path | None,
    trace: bool,
    reuse_live: Path | None,
    ensemble: int,
) -> None:
    """Llumnix vs INFaaS++ on a live `llumnix serve` cluster, the simulator's prediction beside it.

    After the live runs the simulator runs again with each live run's measured per-step overhead (the llumlets'
    wall time per step beyond the modelled duration, between-step work included; its mean and spread) added to every
    step: the prediction for the cluster that actually ran, over --ensemble draws of that overhead (the median and
    range of each ratio)."""
    out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    live_res: dict[str, dict[str, Any]] | None = None
    calibrated: list[dict[str, dict[str, Any]]] | None = None
    overhead_sd: dict[str, float] = {}
    stage_ms: float | None = None
    per_request: dict[str, Any] | None = None
    overhead: dict[str, float] = {}
    with_live = not predict_only
    with progress_bar() as bar:  # closed before the JSON: while it draws, rich routes stdout to stderr
        steps = Steps(bar, "sim live", total=len(POLICIES) * (1 if predict_only else 2 + ensemble))
        sim = predict(workload, seed, instances, steps, bar)
        click.echo(f"simulated in {time.monotonic() - t:.0f} s", err=True)
        if reuse_live is not None and with_live:
            live_res = json.loads((reuse_live / "live_runs.json").read_text())
            steps.step()
            steps.step()
        elif with_live and work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
            live_res = run_live(workload, seed, instances, work_dir, steps, trace=trace)
        elif with_live:
            with tempfile.TemporaryDirectory(prefix="llumnix-live-") as tmp:
                live_res = run_live(workload, seed, instances, Path(tmp), steps, trace=trace)
        if live_res is not None:
            for policy in POLICIES:
                loop = live_res[policy].get("engine_loop", {})
                if loop.get("overhead_ms_per_step") is None:
                    raise click.ClickException(f"no engine-loop figures in the {policy} llumlet logs")
                overhead[policy] = float(loop["overhead_ms_per_step"])
                overhead_sd[policy] = float(loop.get("overhead_sd_ms_per_step") or 0.0)
            llumnix_run = live_res["llumnix"]
            stage_ms = llumnix_run.get("migration_downtime_ms")
            if stage_ms is None and reuse_live is not None:
                stage_ms = migration_downtime_ms(reuse_live / "serve-llumnix")
            sim_records: dict[str, list[Any]] = {}
            calibrated = [
                predict(
                    workload,
                    seed,
                    instances,
                    steps,
                    bar,
                    overhead_ms=overhead,
                    overhead_sd_ms=overhead_sd,
                    jitter_seed=k,
                    records=sim_records if k == 0 else None,
                    stage_ms=stage_ms,
                )
                for k in range(ensemble)
            ]
            kept = reuse_live or work_dir
            if kept is not None:
                per_request = per_request_comparison(kept, calibrated[0], sim_records)
    table = compare_table(live_res, sim)
    table_cal = ensemble_table(live_res, calibrated) if calibrated is not None else None
    summary = "prefill P99 INFaaS++/Llumnix: " + _p99_summary("simulated", table, live_res is not None)
    if table_cal is not None:
        summary += ", " + _p99_summary(
            f"simulated with the live step overhead (median of {ensemble} jitter seeds)", table_cal, True
        )
    if live_res is not None:
        p99 = next(r for r in table if r["figure"] == "prefill P99")
        summary += f", live {p99.get('live_ratio') or 0:.2f}x"
    report = {
        "workload": workload,
        "seed": seed,
        "instances": instances,
        "profile": "llama-7b-a10",
        "command": f"llumnix sim live --workload {workload} --seed {seed} --instances {instances}"
        + (" --predict-only" if predict_only else "")
        + (" --trace" if trace else "")
        + (f" --work-dir {work_dir}" if work_dir is not None else "")
        + (f" --reuse-live {reuse_live}" if reuse_live is not None else "")
        + f" --ensemble {ensemble}",
        "simulated": sim,
        "simulated_calibrated": calibrated,
        "step_overhead_ms": overhead or None,
        "step_overhead_sd_ms": overhead_sd or None,
        "migration_stage_ms": stage_ms,
        "live": live_res,
        "table": table,
        "table_calibrated": table_cal,
        "per_request": per_request,
        "summary": summary,
        "wall_s": round(time.monotonic() - t, 1),
    }
    (out / "live.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "LIVE.md").write_text(markdown(report))
    click.echo(json.dumps(report, indent=2))
    click.echo(summary, err=True)
