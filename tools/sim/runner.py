"""Workload in, summary and files out: one run (``run_case``) and its output directory (``write_run``)."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllumnix.data_plane.engine.profile import get_profile
from pyllumnix.tools.metrics.latency import decode_latency, e2e_latency, preemption_loss, prefill_latency
from pyllumnix.tools.metrics.summary import markdown_table
from pyllumnix.tools.sim import plots
from pyllumnix.tools.sim.cluster import ClusterSimulator, SimResult
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.summary import run_summary
from pyllumnix.tools.workload.request import RequestArrival
from pyllumnix.tools.workload.spec import SyntheticSpec, generate, parse_spec

if TYPE_CHECKING:
    from rich.progress import Progress

PROGRESS_POLL_S = 0.25


def load_workload(spec: str, seed: int, profile: str, priority_share: float | None = None) -> list[RequestArrival]:
    """The spec's requests, clipped to the profile's context length; ``priority_share`` overrides the spec's."""
    parsed = parse_spec(spec)
    if priority_share is not None:
        if not isinstance(parsed, SyntheticSpec):
            raise ValueError("--priority-share needs a synthetic workload spec (a trace carries its own priorities)")
        parsed = replace(parsed, priority_share=priority_share)
    return generate(parsed, seed, max_model_len=get_profile(profile).max_model_len)


def run_case(
    config: SimConfig, arrivals: Sequence[RequestArrival], *, bar: Progress | None = None, description: str = ""
) -> tuple[SimResult, dict[str, Any]]:
    """Simulates one case and summarizes it. With ``bar`` (an enabled rich Progress), a task follows the virtual
    clock up to the last arrival (then the drain), polled from a side thread: the event loop itself stays untouched.
    """
    sim = ClusterSimulator(config, arrivals)
    show = bar is not None and not bar.disable
    result = _run_with_progress(sim, bar, description or config.policy) if show and bar else sim.run()
    return result, run_summary(result, {a.request_id: a.output_len for a in arrivals})


def _run_with_progress(sim: ClusterSimulator, bar: Progress, description: str) -> SimResult:
    horizon = max((a.arrival_time_s for a in sim.arrivals), default=0.0)
    if sim.config.max_virtual_s is not None:
        horizon = min(horizon, sim.config.max_virtual_s)
    task = bar.add_task(f"{description} (virtual s)", total=max(horizon, 1e-9))
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            now = sim.now  # a float read (atomic); the simulator runs in the calling thread
            label = f"{description} (virtual s)" if now <= horizon else f"{description} (draining)"
            bar.update(task, completed=min(now, horizon), description=label)

    poller = threading.Thread(target=poll, name="sim-progress", daemon=True)
    poller.start()
    try:
        return sim.run()
    finally:
        stop.set()
        poller.join()
        bar.remove_task(task)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_requests_csv(result: SimResult, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "request_id",
                "priority",
                "arrival_s",
                "input_len",
                "output_tokens",
                "prefill_s",
                "decode_s",
                "e2e_s",
                "preemptions",
                "preemption_loss_s",
                "migrations",
            ]
        )
        for r in result.records:
            w.writerow(
                [
                    r.request_id,
                    r.priority,
                    f"{r.arrival:.6f}",
                    r.input_len,
                    r.num_output_tokens,
                    _fmt(prefill_latency(r)),
                    _fmt(decode_latency(r)),
                    _fmt(e2e_latency(r)),
                    len(r.preemptions),
                    f"{preemption_loss(r):.6f}",
                    len(r.migrations),
                ]
            )


def write_run(out: Path, result: SimResult, summary: dict[str, Any], label: str) -> list[Path]:
    """summary.json, summary.md, requests.csv, latency_cdf.png, instances.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.json", out / "summary.md", out / "requests.csv"]
    paths[0].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    paths[1].write_text(f"# Simulated run: {label}\n\n" + markdown_table({label: summary}) + _sim_line(summary))
    write_requests_csv(result, paths[2])
    paths.append(plots.latency_cdfs({label: result.records}, out / "latency_cdf.png", title=label))
    paths.append(
        plots.instances_over_time(
            {label: result.instance_series}, out / "instances.png", title=label, end_s=result.end_time_s
        )
    )
    return paths


def _sim_line(summary: dict[str, Any]) -> str:
    sim, mig, cons = summary["sim"], summary["migration"], summary["conservation"]
    down = mig["downtime_s"]
    return (
        f"\nmigrations: {mig['attempted']} attempted, {mig['committed']} committed, "
        f"{mig['aborted_by_source']} aborted by source, {mig['aborted_by_destination']} by destination"
        + (f"; downtime mean {1000 * down['mean']:.1f} ms, P99 {1000 * down['p99']:.1f} ms" if down["count"] else "")
        + f"\n\nsimulated {sim['virtual_s']:.1f} s in {sim['wall_s']:.1f} s wall ({sim['steps']} engine steps, "
        f"{sim['load_calls']} load() calls); conservation {'ok' if cons['ok'] else 'FAILED: ' + json.dumps(cons)}\n"
    )
