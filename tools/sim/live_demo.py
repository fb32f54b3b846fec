"""``llumnix sim live``: the simulator's comparison on a live cluster, with the simulator's prediction beside it.

One workload is replayed twice against ``llumnix serve`` (4 sim llumlets on the calibrated ``llama-7b-a10`` profile,
scaled KV payload, default security: mutual TLS inside, the client context file it writes), once with the dispatch
policy ``llumnix`` and once with ``infaas++`` -- switched through the cluster config (``llmctl config set
dispatch.policy``), as an operator would -- each time by ``llumnix bench serving`` (gRPC, the context's credentials).
The simulator runs the same arrivals on a cluster of the same shape (same profile, mixed engine steps as the live
llumlet runs them, 50 ms load reports as the live llumlets send) under both policies. The report puts the live
ratio INFaaS++ / Llumnix of every latency figure next to the simulated one.

Every process is started by this command (``llumnix serve`` in its own process group) and stopped by it, also on
failure. Sized by the workload: the default took 24 minutes here (two replays of 10-13 minutes: the arrivals span
207 s, M-M's longest requests then decode ~6k tokens); smaller M-M runs did not queue enough on 4 instances for the
policies to part (docs/sim/REPORT.md).

stdout is the JSON report alone (also written to ``--out``); the summary line and the progress bar (one step per
simulated or live policy run, the simulator's virtual clock beneath; a terminal only, ``LLUMNIX_PROGRESS`` forces) go
to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress

from pyllumnix.tools.bench_peers import start_project
from pyllumnix.tools.progress import Steps, progress_bar
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import load_workload, run_case

POLICIES = ("llumnix", "infaas++")
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


def predict(
    workload: str, seed: int, instances: int, steps: Steps | None = None, bar: Progress | None = None
) -> dict[str, dict[str, Any]]:
    """The simulator's overall latency figures for each policy on the live cluster's shape; ``steps`` advances once
    per policy, ``bar`` (the same Progress) follows each simulation's virtual clock."""
    steps = steps or Steps()
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        steps.describe(f"simulating {policy}")
        config = SimConfig(
            instances=instances,
            policy=policy,
            enable_migration=policy == "llumnix",
            split_steps=False,  # the live llumlet runs mixed (V1) steps
            report_interval_ms=50,  # the live llumlet's report period
            seed=seed,
        )
        arrivals = load_workload(workload, seed, config.profile)
        _, summary = run_case(config, arrivals, bar=bar, description=f"sim {policy}")
        out[policy] = {"overall": summary["overall"], "migrations": summary["migration"].get("committed", 0)}
        steps.step()
    return out


def run_live(
    workload: str, seed: int, instances: int, work: Path, steps: Steps | None = None
) -> dict[str, dict[str, Any]]:
    """Both policies on a fresh ``llumnix serve`` each, replayed by ``llumnix bench serving``; ``steps`` advances once
    per policy."""
    steps = steps or Steps()
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        steps.describe(f"live {policy}")
        system = start_project(policy, work, 0, instances)
        try:
            context = work / f"serve-{policy.replace('+', 'p')}" / "context.yaml"
            report = work / f"bench-{policy.replace('+', 'p')}.json"
            # The replay's own bar would only fill the captured stderr: this command's bar shows the run instead.
            env = {**os.environ, "LLUMNIX_CONTEXT": str(context), "LLUMNIX_PROGRESS": "0"}
            cmd = [
                sys.executable, "-m", "pyllumnix.tools.cli", "bench", "serving", "--workload", workload,
                "--seed", str(seed), "--max-model-len", "12288", "--json", str(report),
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
                "wall_s": round(time.monotonic() - t, 1),
                "dead_processes": dead,
                "serve": system.notes,
            }  # fmt: skip
        finally:
            system.stop()
        steps.step()
    return out


def _committed_migrations(log_dir: Path) -> int:
    """Committed migrations, counted from the llumlet logs (the coordinator logs one line per commit)."""
    return sum(
        1
        for f in sorted(log_dir.glob("llumlet-*.log"))
        for line in f.read_text(errors="replace").splitlines()
        if "coordinator: migration" in line and " committed: " in line
    )


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

    lines = [
        f"# Live demonstration: Llumnix vs INFaaS++ on `llumnix serve`, {report['instances']} sim llumlets",
        "",
        f"Workload `{report['workload']}`, seed {report['seed']}; command: `{report['command']}`.",
        "",
        "| figure | sim infaas++ (s) | sim llumnix (s) | sim ratio | live infaas++ (s) | live llumnix (s) "
        "| live ratio | live / sim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["table"]:
        sim, live = r.get("sim", {}), r.get("live", {})
        lines.append(
            f"| {r['figure']} | {f(sim.get('infaas++'))} | {f(sim.get('llumnix'))} | {f(r.get('sim_ratio'), 'x')} | "
            f"{f(live.get('infaas++'))} | {f(live.get('llumnix'))} | {f(r.get('live_ratio'), 'x')} | "
            f"{f(r.get('live_vs_sim'))} |"
        )
    lines += ["", report["summary"], ""]
    return "\n".join(lines)


@click.command("live")
@click.option("--workload", default=DEFAULT_WORKLOAD, show_default=True, help="Workload SPEC (tools/workload).")
@click.option("--seed", default=0, show_default=True)
@click.option("--instances", default=4, show_default=True, help="Sim llumlets (and simulated instances).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--predict-only", is_flag=True, help="Only the simulator's prediction (no live cluster).")
def live(workload: str, seed: int, instances: int, out: Path, predict_only: bool) -> None:
    """Llumnix vs INFaaS++ on a live `llumnix serve` cluster, the simulator's prediction beside it."""
    out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    live_res: dict[str, dict[str, Any]] | None = None
    with progress_bar() as bar:  # closed before the JSON: while it draws, rich routes stdout to stderr
        steps = Steps(bar, "sim live", total=len(POLICIES) * (1 if predict_only else 2))
        sim = predict(workload, seed, instances, steps, bar)
        click.echo(f"simulated in {time.monotonic() - t:.0f} s", err=True)
        if not predict_only:
            with tempfile.TemporaryDirectory(prefix="llumnix-live-") as tmp:
                live_res = run_live(workload, seed, instances, Path(tmp), steps)
    table = compare_table(live_res, sim)
    p99 = next(r for r in table if r["figure"] == "prefill P99")
    summary = f"prefill P99 INFaaS++/Llumnix: simulated {p99.get('sim_ratio') or 0:.2f}x" + (
        f", live {p99.get('live_ratio') or 0:.2f}x (live/sim {p99.get('live_vs_sim') or 0:.2f})"
        if live_res is not None
        else ""
    )
    report = {
        "workload": workload,
        "seed": seed,
        "instances": instances,
        "profile": "llama-7b-a10",
        "command": f"llumnix sim live --workload {workload} --seed {seed} --instances {instances}"
        + (" --predict-only" if predict_only else ""),
        "simulated": sim,
        "live": live_res,
        "table": table,
        "summary": summary,
        "wall_s": round(time.monotonic() - t, 1),
    }
    (out / "live.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "LIVE.md").write_text(markdown(report))
    click.echo(json.dumps(report, indent=2))
    click.echo(summary, err=True)
