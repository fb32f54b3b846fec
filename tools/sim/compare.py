"""Runs a scenario's cases side by side (each workload generated once and replayed for every policy) and writes one
comparison: COMPARE.md (headline ratios with the paper's figures beside them, then full per-group tables),
compare.json, and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllumnix.tools.metrics.records import RequestRecord
from pyllumnix.tools.metrics.summary import markdown_table
from pyllumnix.tools.sim import plots
from pyllumnix.tools.sim.runner import load_workload, run_case
from pyllumnix.tools.sim.scenarios import Scenario
from pyllumnix.tools.workload.request import RequestArrival

if TYPE_CHECKING:
    from rich.progress import Progress as ProgressBar

Progress = Callable[[str], None]


def _get(summary: dict[str, Any], *path: str) -> float | None:
    node: Any = summary
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


# (column, path, kind): "x" = baseline / other (how many times better), "cost" = other / baseline - 1.
HEADLINE: list[tuple[str, tuple[str, ...], str]] = [
    ("prefill mean", ("overall", "prefill_s", "mean"), "x"),
    ("prefill P99", ("overall", "prefill_s", "p99"), "x"),
    ("decode P99", ("overall", "decode_s", "p99"), "x"),
    ("e2e mean", ("overall", "e2e_s", "mean"), "x"),
    ("e2e P99", ("overall", "e2e_s", "p99"), "x"),
    ("preempt. loss", ("overall", "preemption_loss_s"), "x"),
]
PRIORITY_HEADLINE: list[tuple[str, tuple[str, ...], str]] = [
    ("high e2e mean", ("by_priority", "high", "e2e_s", "mean"), "x"),
    ("high prefill mean", ("by_priority", "high", "prefill_s", "mean"), "x"),
    ("high prefill P99", ("by_priority", "high", "prefill_s", "p99"), "x"),
    ("high decode mean", ("by_priority", "high", "decode_s", "mean"), "x"),
    ("high decode P99", ("by_priority", "high", "decode_s", "p99"), "x"),
    ("normal e2e mean", ("by_priority", "normal", "e2e_s", "mean"), "x"),
    ("normal prefill mean", ("by_priority", "normal", "prefill_s", "mean"), "x"),
    ("normal decode mean", ("by_priority", "normal", "decode_s", "mean"), "x"),
]
SCALING_HEADLINE: list[tuple[str, tuple[str, ...], str]] = [
    ("prefill P99", ("overall", "prefill_s", "p99"), "x"),
    ("prefill mean", ("overall", "prefill_s", "mean"), "x"),
    ("e2e P99", ("overall", "e2e_s", "p99"), "x"),
    ("instance-hours", ("instance_hours",), "cost"),
]


def _ratio(base: float | None, other: float | None, kind: str) -> str:
    if base is None or other is None:
        return "-"
    if kind == "cost":
        return f"{100 * (other / base - 1):+.1f} %" if base else "-"
    if other == 0.0:
        return "inf" if base > 0 else "="
    return f"{base / other:.2f}x"


def headline(scenario: Scenario, summaries: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per (group, non-baseline policy): how many times better than the baseline (>1 = better)."""
    cols = {"paper-fig13": PRIORITY_HEADLINE, "paper-fig14": SCALING_HEADLINE}.get(scenario.name, HEADLINE)
    lines = [
        f"| workload | policy vs {scenario.baseline} | " + " | ".join(c for c, _, _ in cols) + " | migrations |",
        "|---|---|" + "---:|" * (len(cols) + 1),
    ]
    for group, runs in summaries.items():
        base = runs[scenario.baseline]
        for label, summ in runs.items():
            if label == scenario.baseline:
                continue
            cells = [_ratio(_get(base, *p), _get(summ, *p), k) for _, p, k in cols]
            mig = summ["migration"]["committed"]
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + f" | {mig} |")
    return "\n".join(lines) + "\n"


def run_scenario(
    scenario: Scenario, out: Path, progress: Progress = lambda s: None, bar: ProgressBar | None = None
) -> dict[str, Any]:
    """Runs every case; ``progress`` gets one line per finished case, ``bar`` (optional) shows the cases done and the
    running case's virtual clock."""
    out.mkdir(parents=True, exist_ok=True)
    overall = bar.add_task(f"{scenario.name} runs", total=len(scenario.cases)) if bar is not None else None
    workloads: dict[str, list[RequestArrival]] = {}
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    records: dict[str, dict[str, list[RequestRecord]]] = {}
    series: dict[str, dict[str, list[tuple[float, int]]]] = {}
    for case in scenario.cases:
        arrivals = workloads.get(case.spec)
        if arrivals is None:
            arrivals = workloads[case.spec] = load_workload(case.spec, scenario.seed, case.config.profile)
        result, summary = run_case(case.config, arrivals, bar=bar, description=f"{case.group} {case.label}")
        summary["spec"] = case.spec
        summary["x"] = case.x
        summaries.setdefault(case.group, {})[case.label] = summary
        records.setdefault(case.group, {})[case.label] = result.records
        series.setdefault(case.group, {})[case.label] = result.instance_series
        progress(
            f"{case.group:32s} {case.label:12s} prefill P99 {_get(summary, 'overall', 'prefill_s', 'p99') or 0:8.3f} s"
            f"  migrations {summary['migration']['committed']:5d}  wall {result.wall_s:5.1f} s"
        )
        if bar is not None and overall is not None:
            bar.advance(overall)
    (out / "compare.json").write_text(json.dumps(summaries, indent=2, sort_keys=True) + "\n")
    plot_paths = _plots(scenario, summaries, records, series, out)
    md = _markdown(scenario, summaries, plot_paths)
    (out / "COMPARE.md").write_text(md)
    return summaries


def _markdown(scenario: Scenario, summaries: dict[str, dict[str, dict[str, Any]]], plot_paths: list[Path]) -> str:
    first = scenario.cases[0].config
    parts = [
        f"# {scenario.name}: {scenario.title}\n",
        f"Simulated with `{first.profile}`, seed {scenario.seed}, load scale {scenario.load_scale:g} "
        f"(rates = paper rate x instances/16 x load scale), migration bandwidth {first.transfer.bandwidth_gbps:g} "
        f"Gbit/s + {first.transfer.stage_latency_ms:g} ms per stage.\n",
        "## Headline (ratios: baseline / policy, >1 = policy better; cost: change vs baseline)\n",
        headline(scenario, summaries),
        "\n## The paper\n",
        "| figure | paper |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in scenario.paper),
    ]
    for group, runs in summaries.items():
        spec = next(iter(runs.values()))["spec"]
        parts.append(f"\n## {group} (`{spec}`)\n")
        parts.append(markdown_table(runs, baseline=scenario.baseline))
    if plot_paths:
        parts.append("\n## Plots\n")
        parts += [f"![{p.stem}]({p.name})\n" for p in plot_paths]
    return "\n".join(parts)


def _plots(
    scenario: Scenario,
    summaries: dict[str, dict[str, dict[str, Any]]],
    records: dict[str, dict[str, list[RequestRecord]]],
    series: dict[str, dict[str, list[tuple[float, int]]]],
    out: Path,
) -> list[Path]:
    paths: list[Path] = []
    groups = list(summaries)
    main = groups[min(1, len(groups) - 1)] if scenario.name == "paper-fig11" else groups[0]
    paths.append(plots.latency_cdfs(records[main], out / "latency_cdf.png", title=f"{scenario.name}: {main}"))
    if scenario.name == "paper-fig11":
        sweep = [g for g in groups if g.startswith("M-M")]
        sweep.sort(key=lambda g: next(iter(summaries[g].values()))["x"])
        xs = [next(iter(summaries[g].values()))["x"] for g in sweep]
        labels = list(summaries[sweep[0]]) if sweep else []
        for metric, path in (("prefill_s", "p99"), ("e2e_s", "mean")):
            lines = {lb: [_get(summaries[g][lb], "overall", metric, path) for g in sweep] for lb in labels}
            name = f"mm_{metric.removesuffix('_s')}_{path}_vs_rate.png"
            paths.append(
                plots.metric_lines(xs, lines, out / name, xlabel="rate (req/s)", ylabel=f"{metric} {path}", logy=True)
            )
    if scenario.name == "paper-fig13":
        xs = [next(iter(summaries[g].values()))["x"] for g in groups]
        lines = {
            f"{lb} {prio}": [_get(summaries[g][lb], "by_priority", prio, "prefill_s", "p99") for g in groups]
            for lb in summaries[groups[0]]
            for prio in ("high", "normal")
        }
        paths.append(
            plots.metric_lines(xs, lines, out / "prefill_p99_vs_cv.png", xlabel="Gamma CV", ylabel="prefill P99 (s)")
        )
    if scenario.name == "paper-fig14":
        paths.append(plots.instances_over_time(series[groups[0]], out / "instances.png", title=groups[0]))
        sweep = [g for g in groups if g.startswith("threshold")]
        if sweep:
            labels = list(summaries[sweep[0]])
            xs = [summaries[g][labels[0]]["x"] for g in sweep]
            for mpath, ylabel in ((("instance_hours",), "instance-hours"), (("overall", "prefill_s", "p99"), "P99")):
                lines = {lb: [_get(summaries[g][lb], *mpath) for g in sweep] for lb in labels}
                name = f"threshold_{mpath[-1]}.png"
                paths.append(plots.metric_lines(xs, lines, out / name, xlabel="scale-up threshold", ylabel=ylabel))
    return paths
