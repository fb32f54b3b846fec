"""``llumnix bench sim``: wall seconds of the simulator at 64 and 1,024 instances (M-M, Poisson, the 16-instance
paper rate scaled to the cluster size), with the split between engine steps, load() calls and the rest."""

from __future__ import annotations

import json

import click

from pyllumnix.tools.progress import Steps, progress_bar
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import load_workload, run_case

MM_RATE_16 = 7.5


def bench_one(instances: int, requests: int, policy: str, seed: int) -> dict[str, object]:
    rate = MM_RATE_16 * instances / 16
    spec = f"M-M:poisson:rate={rate:g}:n={requests}"
    config = SimConfig(instances=instances, policy=policy, seed=seed)
    arrivals = load_workload(spec, seed, config.profile)
    result, summary = run_case(config, arrivals)
    return {
        "instances": instances,
        "requests": requests,
        "spec": spec,
        "policy": policy,
        "wall_s": round(result.wall_s, 2),
        "virtual_s": round(result.end_time_s, 1),
        "engine_steps": result.steps,
        "load_calls": result.load_calls,
        "events": result.events,
        "migrations": summary["migration"]["committed"],
        "conservation_ok": summary["conservation"]["ok"],
        "us_per_event": round(1e6 * result.wall_s / max(1, result.events), 1),
    }


@click.command("sim")
@click.option("--instances", "sizes", multiple=True, type=int, default=(64, 1024), show_default=True)
@click.option("--requests", default=10_000, show_default=True)
@click.option("--policy", default="llumnix", show_default=True)
@click.option("--seed", default=0, show_default=True)
def bench_sim(sizes: tuple[int, ...], requests: int, policy: str, seed: int) -> None:
    """Simulator speed (target: 64 instances x 10,000 requests in <= 60 s wall)."""
    results: list[dict[str, object]] = []
    # One step per cluster size (no virtual-clock poller: it would share the GIL with the run being timed).
    with progress_bar() as bar:  # stderr, a terminal only: stdout is the JSON report alone
        steps = Steps(bar, "bench sim", total=len(sizes))
        for n in sizes:
            steps.describe(f"{n} instances")
            results.append(bench_one(n, requests, policy, seed))
            steps.step()
    click.echo(json.dumps({"bench": "sim", "results": results}, indent=2))
    summary = ", ".join(f"{r['instances']} instances x {r['requests']} requests {r['wall_s']} s wall" for r in results)
    click.echo(f"sim: {summary}", err=True)
