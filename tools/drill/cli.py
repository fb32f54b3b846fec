"""``llumnix drill``: start (or attach to) a cluster, inject faults under streaming load, judge the outcome.

Prints the report as JSON on stdout (and to ``--json FILE``) and a readable summary on stderr; exits 0 when every
check of every scenario passed, 1 otherwise (anything lost, hung, altered, leaked, an unexpected error, a bound
missed), 2 on bad usage. On a terminal (or with ``LLUMNIX_PROGRESS=1``) a progress bar on stderr counts the phases:
the cluster's start, the reference run, each scenario.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console

from pyllumnix.tools.drill.cluster import ClusterOptions, LocalCluster
from pyllumnix.tools.drill.credentials import PLAINTEXT, from_context
from pyllumnix.tools.drill.report import DrillReport, render
from pyllumnix.tools.drill.runner import Drill, DrillOptions
from pyllumnix.tools.drill.scenarios import (
    ALL,
    FAULTS,
    ScenarioError,
    check_attach_mode,
    etcd_members_needed,
    parse_scenarios,
)
from pyllumnix.tools.launch import LaunchError
from pyllumnix.tools.progress import Steps, progress_bar


def _scenario_help() -> str:
    metavar = {"seconds": " S", "requests": " N", None: ""}
    faults = "; ".join(f"{k.name}{metavar[k.param]}: {k.help}" for k in FAULTS.values())
    return f"Fault(s) to inject, repeatable or comma-separated. {faults}; all = {', '.join(ALL)}."


class _PhaseLines:
    """The drill's progress lines, printed above the bar, which advances once per finished phase (the reference run,
    each scenario: the lines that start and end them are the runner's own)."""

    def __init__(self, console: Console, steps: Steps, labels: list[str]) -> None:
        self.console = console
        self.steps = steps
        self.labels = labels
        self.in_reference = False

    def __call__(self, message: str) -> None:
        self.console.print(message)
        if message.startswith("reference run"):
            self.in_reference = True
            self.steps.describe("reference run")
            return
        for label in self.labels:
            if message == f"[bold]{label}[/bold]: running":
                if self.in_reference:  # the first scenario starts: the reference run is over
                    self.in_reference = False
                    self.steps.step()
                self.steps.describe(label)
                return
            if message.startswith(f"{label}: ") and message.endswith(("pass[/green]", "FAIL[/red]")):
                self.steps.step()
                return


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the drill like Ctrl-C, so the cleanup (every started process stopped) runs."""
    raise KeyboardInterrupt


@click.command("drill")
@click.option(
    "--scenario", "scenario_values", multiple=True, default=("all",), show_default=True, help=_scenario_help()
)
@click.option("--frontend", default="", help="Attach: the frontend's gRPC address (no cluster is started).")
@click.option("--scheduler", default="", help="Attach: comma-separated scheduler replica addresses.")
@click.option("--http", "http_base", default="", help="Attach: the frontend's HTTP base URL (for HTTP probes).")
@click.option(
    "--context",
    "context_path",
    default=None,
    help="Attach with a client context file (TLS + API key; endpoints unless given), e.g. what `llumnix serve` wrote.",
)
@click.option("--context-name", default=None, help="Attach: the context to use (default: the file's current one).")
@click.option("--schedulers", default=2, show_default=True, help="Scheduler replicas to start.")
@click.option("--llumlets", default=3, show_default=True, help="Llumlets (sim engine) to start.")
@click.option("--etcd-members", default=0, help="etcd members to start (default: 3 if a scenario needs it, else 1).")
@click.option("--profile", default="llama-7b-a10", show_default=True, help="Sim engine latency profile.")
@click.option("--bytes-per-token", default=64, show_default=True, help="Sim engine KV payload per token.")
@click.option(
    "--transport", type=click.Choice(["tcp", "ucx", "auto"]), default="tcp", show_default=True, help="Data plane."
)
@click.option("--rate", default=8.0, show_default=True, help="Streams started per second during each scenario.")
@click.option("--warmup", default=2.0, show_default=True, help="Seconds of load before the fault.")
@click.option("--tail", default=3.0, show_default=True, help="Seconds of load after the fault is over.")
@click.option(
    "--request-deadline",
    default=60.0,
    show_default=True,
    help="A stream with no final message this long after it was sent counts as hung.",
)
@click.option("--settle", default=15.0, show_default=True, help="Seconds to wait for KV blocks to be freed.")
@click.option("--seed", default=0, show_default=True, help="Seed of the request catalog (prompts, seeds, lengths).")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the JSON report here.",
)
@click.option("--log-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Component logs.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Local cluster: run every component --insecure (plaintext, no certificates, no API keys). Default: mutual "
    "TLS with a local PKI in the log dir and an admin API key, as `llumnix serve`.",
)
def drill_command(
    scenario_values: tuple[str, ...],
    frontend: str,
    scheduler: str,
    http_base: str,
    context_path: str | None,
    context_name: str | None,
    schedulers: int,
    llumlets: int,
    etcd_members: int,
    profile: str,
    bytes_per_token: int,
    transport: str,
    rate: float,
    warmup: float,
    tail: float,
    request_deadline: float,
    settle: float,
    seed: int,
    json_path: Path | None,
    log_dir: Path | None,
    insecure: bool,
) -> None:
    """Failover drill: streaming load with known seeds under injected faults, judged token for token.

    Starts a local cluster (etcd, schedulers, sim-engine llumlets, a frontend), or attaches to one with --frontend and
    --scheduler (then only faults that signal no process run). Every stream is compared with a fault-free reference
    run; per fault it reports the time to a new leader, the longest gap without a first token, streams lost / hung /
    altered / ended with a clear error, and KV blocks still held. JSON on stdout, a summary on stderr; exit 0 when
    every check passed, 1 otherwise.
    """
    try:
        scenarios = parse_scenarios(scenario_values)
    except ScenarioError as exc:
        raise click.BadParameter(str(exc), param_hint="--scenario") from exc
    attach = bool(frontend or scheduler or context_path or context_name)
    if attach and insecure:
        raise click.UsageError(
            "--insecure is for the local cluster; an attached cluster's context says how to reach it"
        )
    credentials = PLAINTEXT
    if attach:
        if context_path or context_name:
            try:
                credentials, ctx = from_context(context_path, context_name)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--context") from exc
            frontend = frontend or (ctx.frontend[0] if ctx.frontend else "")
            scheduler = scheduler or ",".join(ctx.scheduler)
            http_base = http_base or ctx.http
        if not (frontend and scheduler):
            raise click.UsageError("attach mode needs both --frontend and --scheduler (or a context naming them)")
        try:
            check_attach_mode(scenarios)
        except ScenarioError as exc:
            raise click.BadParameter(str(exc), param_hint="--scenario") from exc
    if rate <= 0 or request_deadline <= 0 or warmup < 0 or tail < 0 or settle < 0:
        raise click.UsageError("--rate and --request-deadline must be positive; --warmup/--tail/--settle >= 0")
    if schedulers < 2 and any(s.kind.replaces_leader and s.kind.needs_processes for s in scenarios):
        raise click.UsageError("leader faults need --schedulers 2 or more (a standby to take over)")
    if llumlets < 2:
        raise click.UsageError("--llumlets must be 2 or more (a killed llumlet's peers keep serving)")
    needed = etcd_members_needed(scenarios)
    members = etcd_members or needed
    if members < needed:
        raise click.UsageError(f"the scenarios need {needed} etcd members (--etcd-members {members} given)")

    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=160)
    opts = DrillOptions(rate, warmup, tail, request_deadline, settle, seed)
    config: dict[str, Any] = {
        "scenarios": [s.label for s in scenarios],
        "mode": "attach" if attach else "local",
        "security": credentials.description
        if attach
        else "plaintext (local cluster started --insecure)"
        if insecure
        else "mutual TLS + admin API key (local cluster secure, its PKI and context file in the log dir)",
        **asdict(opts),
    }
    signal.signal(signal.SIGTERM, _terminate)
    cluster: LocalCluster | None = None
    report = DrillReport(config=config, reference={}, results=[])
    started = time.monotonic()
    # closed before the JSON is printed: while the bar draws, rich routes stdout to stderr
    with progress_bar() as bar:
        steps = Steps(bar, "drill", total=(0 if attach else 1) + 1 + len(scenarios))
        say = _PhaseLines(console if bar.disable else bar.console, steps, [s.label for s in scenarios])
        try:
            if attach:
                drill = Drill(
                    opts,
                    frontend=frontend,
                    schedulers=[s.strip() for s in scheduler.split(",") if s.strip()],
                    http_base=http_base,
                    cluster=None,
                    progress=say,
                    credentials=credentials,
                )
            else:
                directory = log_dir or Path(tempfile.mkdtemp(prefix="llumnix-drill-"))
                cluster_opts = ClusterOptions(
                    log_dir=directory,
                    schedulers=schedulers,
                    llumlets=llumlets,
                    etcd_members=members,
                    profile=profile,
                    bytes_per_token=bytes_per_token,
                    transport=transport,
                    secure=not insecure,
                )
                config.update(
                    {
                        "schedulers": schedulers,
                        "llumlets": llumlets,
                        "etcd_members": members,
                        "profile": profile,
                        "bytes_per_token": bytes_per_token,
                        "transport": transport,
                        "log_dir": str(directory),
                    }
                )
                say(f"starting a local cluster (logs in {directory})")
                steps.describe("starting the cluster")
                cluster = LocalCluster(cluster_opts)
                cluster.start()
                config["etcd"] = cluster.etcd_endpoints
                steps.step()
                drill = Drill(
                    opts,
                    frontend=cluster.frontend_grpc,
                    schedulers=cluster.scheduler_addresses,
                    http_base=cluster.frontend_http,
                    cluster=cluster,
                    progress=say,
                    credentials=cluster.credentials(),
                )
            report = asyncio.run(drill.run(scenarios))
            report.config = config
        except LaunchError as exc:
            report.error = f"cluster did not start: {exc}"
        except KeyboardInterrupt:
            report.error = "interrupted"
        finally:
            if cluster is not None:
                say("stopping the cluster")
                cluster.stop()
                config["pids"] = cluster.started_pids()
    config["seconds"] = round(time.monotonic() - started, 1)
    out = json.dumps(report.to_json(), indent=2)
    click.echo(out)
    if json_path is not None:
        json_path.write_text(out + "\n")
    render(report, console)
    sys.exit(0 if report.passed else 1)
