"""``llumnix sim``: one simulated run (``llumnix sim --instances N --workload SPEC ...``) or a paper comparison
(``llumnix sim compare --scenario paper-fig11``). The group runs a simulation itself when no sub-command is given."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pyllumnix.control_plane.policy import DISPATCH_POLICIES, DRAIN_VICTIMS
from pyllumnix.data_plane.engine.profile import PROFILES
from pyllumnix.tools.progress import progress_bar
from pyllumnix.tools.sim.compare import run_scenario
from pyllumnix.tools.sim.config import DEFAULT_BANDWIDTH_GBPS, DEFAULT_STAGE_LATENCY_MS, SimConfig, TransferModel
from pyllumnix.tools.sim.live_demo import live
from pyllumnix.tools.sim.runner import load_workload, run_case, write_run
from pyllumnix.tools.sim.scenarios import BUILDERS, DEFAULT_SEEDS, build


@click.group(invoke_without_command=True)
@click.option("--instances", default=16, show_default=True, help="Instances at start.")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="llama-7b-a10", show_default=True)
@click.option("--workload", "spec", help="Workload SPEC, e.g. M-M:poisson:rate=7.5:n=10000 (see tools/workload).")
@click.option("--policy", type=click.Choice(DISPATCH_POLICIES), default="llumnix", show_default=True)
@click.option("--priority-share", type=float, default=None, help="Fraction of high-priority requests (overrides SPEC).")
@click.option("--priorities/--no-priorities", default=True, show_default=True, help="Off: treat all as normal.")
@click.option("--migration/--no-migration", default=True, show_default=True)
@click.option("--autoscale", is_flag=True, help="Run the scaling loop (PolicyCore.scale).")
@click.option("--min", "min_instances", default=1, show_default=True)
@click.option("--max", "max_instances", default=16, show_default=True)
@click.option("--scale-up", default=10.0, show_default=True, help="Scale-up freeness threshold.")
@click.option("--scale-down", default=60.0, show_default=True, help="Scale-down freeness threshold.")
@click.option("--scaling-interval-s", default=10.0, show_default=True)
@click.option("--startup-s", default=5.0, show_default=True, help="Modelled instance start-up delay.")
@click.option("--scaling-warmup-s", default=100.0, show_default=True, help="No scaling decision before this time.")
@click.option("--drain-victim", type=click.Choice(DRAIN_VICTIMS), default="last", show_default=True)
@click.option("--split-steps/--mixed-steps", default=False, show_default=True, help="Prefill-only/decode-only steps.")
@click.option("--migrate-out-threshold", default=3.0, show_default=True, help="Pairing's freeness threshold.")
@click.option("--bandwidth-gbps", default=DEFAULT_BANDWIDTH_GBPS, show_default=True, help="Migration copy rate.")
@click.option("--stage-latency-ms", default=DEFAULT_STAGE_LATENCY_MS, show_default=True, help="Per migration stage.")
@click.option("--pairing-interval-ms", default=100, show_default=True)
@click.option("--report-interval-ms", default=100, show_default=True, help="Load report period into the snapshot.")
@click.option(
    "--high-headroom-reserve",
    type=click.IntRange(0, 1_000_000),
    default=None,
    help="High-priority headroom = total blocks - this (ClusterConfig priority.high_headroom_reserve_blocks; "
    "default 100, the artifact's).",
)
@click.option("--max-virtual-s", type=float, default=None, help="Stop the virtual clock here.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.pass_context
def sim(
    ctx: click.Context,
    instances: int,
    profile: str,
    spec: str | None,
    policy: str,
    priority_share: float | None,
    priorities: bool,
    migration: bool,
    autoscale: bool,
    min_instances: int,
    max_instances: int,
    scale_up: float,
    scale_down: float,
    scaling_interval_s: float,
    startup_s: float,
    scaling_warmup_s: float,
    drain_victim: str,
    split_steps: bool,
    migrate_out_threshold: float,
    bandwidth_gbps: float,
    stage_latency_ms: float,
    pairing_interval_ms: int,
    report_interval_ms: int,
    high_headroom_reserve: int | None,
    max_virtual_s: float | None,
    seed: int,
    out: Path | None,
) -> None:
    """Discrete-event cluster simulator: the real policy core and sim engines on a virtual clock."""
    if ctx.invoked_subcommand is not None:
        return
    if not spec or out is None:
        raise click.UsageError("a run needs --workload SPEC and --out DIR (or use: llumnix sim compare ...)")
    try:
        config = SimConfig(
            instances=instances,
            profile=profile,
            policy=policy,
            priorities=priorities,
            enable_migration=migration,
            autoscale=autoscale,
            min_instances=min_instances,
            max_instances=max_instances,
            scale_up_threshold=scale_up,
            scale_down_threshold=scale_down,
            scaling_interval_s=scaling_interval_s,
            startup_s=startup_s,
            scaling_warmup_s=scaling_warmup_s,
            drain_victim=drain_victim,
            split_steps=split_steps,
            migrate_out_threshold=migrate_out_threshold,
            pairing_interval_ms=pairing_interval_ms,
            report_interval_ms=report_interval_ms,
            high_headroom_reserve_blocks=high_headroom_reserve,
            transfer=TransferModel(bandwidth_gbps, stage_latency_ms),
            seed=seed,
            max_virtual_s=max_virtual_s,
        )
        arrivals = load_workload(spec, config.seed, config.profile, priority_share)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    with progress_bar() as bar:  # stderr, a terminal only: stdout keeps its one JSON line
        result, summary = run_case(config, arrivals, bar=bar, description=f"sim {config.policy}")
    summary["spec"] = spec
    paths = write_run(out, result, summary, config.policy)
    o = summary["overall"]
    click.echo(
        json.dumps(
            {
                "policy": config.policy,
                "requests": len(arrivals),
                "prefill_p99_s": o["prefill_s"]["p99"],
                "e2e_mean_s": o["e2e_s"]["mean"],
                "migrations": summary["migration"]["committed"],
                "instance_hours": summary["instance_hours"],
                "conservation_ok": summary["conservation"]["ok"],
                "wall_s": round(result.wall_s, 2),
                "files": [str(p) for p in paths],
            }
        )
    )


@sim.command()
@click.option("--scenario", type=click.Choice(sorted(BUILDERS)), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--requests", type=int, default=None, help="Requests per run (default per scenario; paper: 10000).")
@click.option("--instances", type=int, default=None, help="Cluster size (fig14: the maximum). Default 16.")
@click.option("--load-scale", type=float, default=None, help="Multiply the paper's rates (default per scenario).")
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--seeds", default=DEFAULT_SEEDS, show_default=True, help="Seeds per case (seed, seed+1, ...).")
@click.option("--traces", default=None, help="Comma-separated traces (paper-fig11*: S-S,M-M,L-L,S-L,L-S).")
@click.option("--policies", default=None, help="Comma-separated policies to keep beside the baseline.")
@click.option("--jobs", default=1, show_default=True, help="Simulations run at once (worker processes).")
def compare(
    scenario: str,
    out: Path,
    requests: int | None,
    instances: int | None,
    load_scale: float | None,
    seed: int,
    seeds: int,
    traces: str | None,
    policies: str | None,
    jobs: int,
) -> None:
    """Runs the policies of a paper experiment side by side on the same arrivals, once per seed; writes COMPARE.md
    (median and min-max of every ratio over the seeds), compare.json and plots."""
    try:
        sc = build(
            scenario,
            requests,
            instances,
            load_scale,
            seed,
            seeds=seeds,
            traces=tuple(traces.split(",")) if traces else None,
            policies=tuple(policies.split(",")) if policies else None,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if jobs < 1:
        raise click.UsageError("--jobs must be >= 1")
    click.echo(f"{sc.name}: {len(sc.cases)} runs x {len(sc.seeds)} seeds, load scale {sc.load_scale:g}", err=True)
    with progress_bar() as bar:  # stderr, a terminal only; the per-run lines print above it
        run_scenario(sc, out, progress=lambda line: click.echo(line, err=True), bar=bar, jobs=jobs)
    runs = len(sc.cases) * len(sc.seeds)
    click.echo(
        json.dumps({"scenario": sc.name, "runs": runs, "seeds": list(sc.seeds), "report": str(out / "COMPARE.md")})
    )


sim.add_command(live)
