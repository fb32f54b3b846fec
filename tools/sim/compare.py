"""Runs a scenario's cases side by side over several seeds (each seed's workload generated once and replayed for every
policy) and writes one comparison: COMPARE.md (headline ratios as the median and the min-max over seeds, the issue's
acceptance targets, a calibration table against the artifact's measured figures, absolute tails, then the first
seed's full per-group tables), compare.json (every run's summary, by seed), and plots."""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllumnix.tools.metrics.records import RequestRecord
from pyllumnix.tools.metrics.summary import markdown_table
from pyllumnix.tools.sim import plots
from pyllumnix.tools.sim.runner import load_workload, run_case
from pyllumnix.tools.sim.scenarios import (
    ARTIFACT_DECODE_S,
    ARTIFACT_INFAAS_PREEMPTION_LOSS_S,
    ARTIFACT_INFAAS_PREFILL_P99_S,
    Case,
    Scenario,
)

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
FRAGMENTATION = ("fragmentation", ("fragmentation",), "x")
SCALING_HEADLINE: list[tuple[str, tuple[str, ...], str]] = [
    ("prefill P99", ("overall", "prefill_s", "p99"), "x"),
    ("prefill mean", ("overall", "prefill_s", "mean"), "x"),
    ("e2e P99", ("overall", "e2e_s", "p99"), "x"),
    ("instance-hours", ("instance_hours",), "cost"),
]


# Per seed: group -> label -> summary.
Runs = dict[str, dict[str, dict[str, Any]]]


def _one_ratio(base: float | None, other: float | None, kind: str) -> float | None:
    """baseline / other ("x": >1 = better), or other / baseline - 1 ("cost"); None when undefined. A zero ``other``
    with a positive baseline is +inf (the policy removed it entirely); both zero is 1 (equal)."""
    if base is None or other is None:
        return None
    if kind == "cost":
        return other / base - 1.0 if base else None
    if other == 0.0:
        return math.inf if base > 0 else 1.0
    return base / other


def _fmt_x(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}x"


def _fmt_ratio(values: Sequence[float], kind: str) -> str:
    """``median [min-max]`` over seeds (just the value for one seed)."""
    if not values:
        return "-"
    fmt = (lambda v: f"{100 * v:+.1f} %") if kind == "cost" else _fmt_x
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} [{fmt(min(values))}-{fmt(max(values))}]"


def ratios(
    by_seed: Sequence[Runs], group: str, label: str, baseline: str, path: tuple[str, ...], kind: str
) -> list[float]:
    """The ratio of ``path`` between ``baseline`` and ``label`` in ``group``, one per seed where it is defined."""
    out = []
    for runs in by_seed:
        g = runs.get(group, {})
        if baseline in g and label in g:
            r = _one_ratio(_get(g[baseline], *path), _get(g[label], *path), kind)
            if r is not None:
                out.append(r)
    return out


def values(by_seed: Sequence[Runs], group: str, label: str, path: tuple[str, ...]) -> list[float]:
    out = []
    for runs in by_seed:
        run = runs.get(group, {}).get(label)
        v = _get(run, *path) if run is not None else None
        if v is not None:
            out.append(v)
    return out


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _columns(scenario: Scenario) -> list[tuple[str, tuple[str, ...], str]]:
    if scenario.name == "paper-fig13":
        return PRIORITY_HEADLINE
    if scenario.name == "paper-fig14":
        return SCALING_HEADLINE
    return [*HEADLINE, FRAGMENTATION]


def headline(scenario: Scenario, by_seed: Sequence[Runs]) -> str:
    """One row per (group, non-baseline policy): how many times better than the baseline (>1 = better), as the median
    and [min-max] over seeds; migrations: the median count."""
    cols = _columns(scenario)
    lines = [
        f"| workload | policy vs {scenario.baseline} | " + " | ".join(c for c, _, _ in cols) + " | migrations |",
        "|---|---|" + "---:|" * (len(cols) + 1),
    ]
    first = by_seed[0]
    for group, runs in first.items():
        for label in runs:
            if label == scenario.baseline:
                continue
            cells = [_fmt_ratio(ratios(by_seed, group, label, scenario.baseline, p, k), k) for _, p, k in cols]
            mig = _median(values(by_seed, group, label, ("migration", "committed")))
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + f" | {mig if mig is None else round(mig)} |")
    return "\n".join(lines) + "\n"


# Absolute figures per run (median over seeds): name, path, format.
ABSOLUTE: list[tuple[str, tuple[str, ...], str]] = [
    ("prefill mean (s)", ("overall", "prefill_s", "mean"), "{:.2f}"),
    ("prefill P50", ("tail", "prefill_s", "p50"), "{:.2f}"),
    ("prefill P99", ("tail", "prefill_s", "p99"), "{:.2f}"),
    ("prefill P99.9", ("tail", "prefill_s", "p999"), "{:.2f}"),
    ("prefill > 2 s", ("tail", "prefill_over_2s"), "pct"),
    ("prefill > 10 s", ("tail", "prefill_over_10s"), "pct"),
    ("decode mean (s/token)", ("overall", "decode_s", "mean"), "{:.4f}"),
    ("decode P99", ("overall", "decode_s", "p99"), "{:.4f}"),
    ("e2e mean (s)", ("overall", "e2e_s", "mean"), "{:.1f}"),
    ("e2e P99.9", ("tail", "e2e_s", "p999"), "{:.1f}"),
    ("preempt. loss (s)", ("overall", "preemption_loss_s"), "{:.3f}"),
    ("fragmentation", ("fragmentation",), "pct"),
]


def _fmt_abs(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f} %" if fmt == "pct" else fmt.format(v)


def absolute_table(by_seed: Sequence[Runs]) -> str:
    """Median over seeds of each absolute figure, per group and policy."""
    lines = [
        "| workload | policy | " + " | ".join(n for n, _, _ in ABSOLUTE) + " |",
        "|---|---|" + "---:|" * len(ABSOLUTE),
    ]
    for group, runs in by_seed[0].items():
        for label in runs:
            cells = [_fmt_abs(_median(values(by_seed, group, label, p)), f) for _, p, f in ABSOLUTE]
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _range(lo_hi: tuple[float, float] | None, fmt: str = "{:g}") -> str:
    if lo_hi is None:
        return "(not read off)"
    lo, hi = lo_hi
    return f"up to {fmt.format(hi)}" if lo == 0.0 else f"{fmt.format(lo)}-{fmt.format(hi)}"


def calibration_table(scenario: Scenario, by_seed: Sequence[Runs]) -> str:
    """Our absolute figures (median [min-max] over seeds) beside the artifact's GPU re-run, per trace: is the
    simulated testbed as loaded as the paper's?"""
    base = scenario.baseline
    lines = [
        f"| workload | decode mean per token, {base} (s) | artifact | {base} prefill P99 (s) | artifact | "
        f"{base} preemption loss (s) | artifact |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(xs: list[float], fmt: str) -> str:
        if not xs:
            return "-"
        med = fmt.format(statistics.median(xs))
        return med if len(xs) == 1 else f"{med} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"

    for group in by_seed[0]:
        trace = group.split(" ", 1)[0]
        decode = values(by_seed, group, base, ("overall", "decode_s", "mean"))
        p99 = values(by_seed, group, base, ("overall", "prefill_s", "p99"))
        loss = values(by_seed, group, base, ("overall", "preemption_loss_s"))
        lines.append(
            f"| {group} | {cell(decode, '{:.4f}')} | {_range(ARTIFACT_DECODE_S)} | {cell(p99, '{:.2f}')} | "
            f"{_range(ARTIFACT_INFAAS_PREFILL_P99_S.get(trace))} | {cell(loss, '{:.3f}')} | "
            f"{_range(ARTIFACT_INFAAS_PREEMPTION_LOSS_S)} |"
        )
    return "\n".join(lines) + "\n"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def targets(scenario: Scenario, by_seed: Sequence[Runs]) -> str:
    """The issue's acceptance targets, judged on the median over seeds, for the scenario's main policy."""
    base = scenario.baseline
    rows: list[tuple[str, str, bool | None]] = []
    first = by_seed[0]
    if scenario.name in ("paper-fig11", "paper-fig11-sweep"):
        pol = "llumnix"
        groups = [g for g in first if pol in first[g]]

        def med(group: str, path: tuple[str, ...], kind: str = "x") -> float | None:
            return _median(ratios(by_seed, group, pol, base, path, kind))

        both = [
            g
            for g in groups
            if (med(g, ("overall", "prefill_s", "mean")) or 0) >= 2.0
            and (med(g, ("overall", "prefill_s", "p99")) or 0) >= 5.0
        ]
        rows.append(("prefill mean >= 2x and P99 >= 5x on at least two traces", ", ".join(both) or "none",
                     len(both) >= 2))  # fmt: skip
        for g in groups:
            d = med(g, ("overall", "decode_s", "p99"))
            rows.append((f"decode P99 >= 1.3x ({g})", "-" if d is None else _fmt_x(d), None if d is None else d >= 1.3))
        reductions = []
        for g in groups:
            b = _median(values(by_seed, g, base, ("overall", "preemption_loss_s")))
            o = _median(values(by_seed, g, pol, ("overall", "preemption_loss_s")))
            if b:
                reductions.append(1.0 - (o or 0.0) / b)
        avg = sum(reductions) / len(reductions) if reductions else None
        shown = "-" if avg is None else f"{100 * avg:.0f} % lower"
        rows.append(("preemption loss >= 70 % lower (mean over traces)", shown, None if avg is None else avg >= 0.7))
        for g in groups:
            f = med(g, ("fragmentation",))
            rows.append((f"fragmentation {base} >= 5x {pol} ({g})", "-" if f is None else _fmt_x(f),
                         None if f is None else f >= 5.0))  # fmt: skip
    elif scenario.name == "paper-fig13":
        for g in first:
            hp = _median(ratios(by_seed, g, "priority", base, ("by_priority", "high", "prefill_s", "mean"), "x"))
            nm = _median(ratios(by_seed, g, "priority", base, ("by_priority", "normal", "prefill_s", "mean"), "x"))
            ok = None if hp is None or nm is None else hp >= 2.9 and nm >= 1 / 1.13
            shown = "-" if hp is None or nm is None else f"high {_fmt_x(hp)}, normal {100 * (1 / nm - 1):+.0f} %"
            rows.append((f"high prefill mean >= 2.9x, normal <= 13 % worse ({g})", shown, ok))
    elif scenario.name == "paper-fig14":
        for g in first:
            cost = _median(ratios(by_seed, g, "llumnix", base, ("instance_hours",), "cost"))
            p99 = _median(ratios(by_seed, g, "llumnix", base, ("overall", "prefill_s", "p99"), "x"))
            ok = None if cost is None or p99 is None else cost <= -0.15 and p99 >= 1.0
            shown = "-" if cost is None or p99 is None else f"{100 * cost:+.1f} % cost, P99 prefill {_fmt_x(p99)}"
            rows.append((f">= 15 % fewer instance-hours, P99 prefill no worse ({g})", shown, ok))
    if not rows:
        return ""
    lines = ["| target | measured (median over seeds) | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {_met(ok)} |" for t, m, ok in rows]
    return "\n".join(lines) + "\n"


RunOutput = tuple[dict[str, Any], list[RequestRecord] | None, list[tuple[float, int]] | None, float]


def _run_one(case: Case, seed: int, keep_records: bool, bar: ProgressBar | None = None) -> RunOutput:
    """One case on one seed's arrivals: its summary, its records and instance series when kept, its wall time. A
    module-level function so a worker process can run it."""
    arrivals = load_workload(case.spec, seed, case.config.profile)
    result, summary = run_case(case.config, arrivals, bar=bar, description=f"seed {seed} {case.group} {case.label}")
    summary["spec"] = case.spec
    summary["x"] = case.x
    summary["seed"] = seed
    if keep_records:
        return summary, result.records, result.instance_series, result.wall_s
    return summary, None, None, result.wall_s


def run_scenario(
    scenario: Scenario,
    out: Path,
    progress: Progress = lambda s: None,
    bar: ProgressBar | None = None,
    jobs: int = 1,
) -> list[Runs]:
    """Runs every case once per seed; ``progress`` gets one line per finished run, ``bar`` (optional) shows the runs
    done (and, with one job, the running one's virtual clock). ``jobs`` > 1 runs that many simulations at once in
    worker processes (each run is independent and deterministic, so the results are the same). Returns the
    summaries per seed (in ``scenario.seeds`` order)."""
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    total = len(scenario.cases) * len(scenario.seeds)
    overall = bar.add_task(f"{scenario.name} runs", total=total) if bar is not None else None
    # Placeholders in case order, so the tables keep the scenario's order whatever finishes first.
    by_seed: list[Runs] = [{} for _ in scenario.seeds]
    work: list[tuple[int, Case]] = []
    for k, seed in enumerate(scenario.seeds):
        for case in scenario.cases_for(seed):
            by_seed[k].setdefault(case.group, {})[case.label] = {}
            work.append((k, case))
    # The first seed's records and instance series, for the plots (every seed's would hold ~all requests in memory).
    records: dict[str, dict[str, list[RequestRecord]]] = {}
    series: dict[str, dict[str, list[tuple[float, int]]]] = {}

    def done(k: int, case: Case, output: RunOutput) -> None:
        summary, recs, ser, wall = output
        by_seed[k][case.group][case.label] = summary
        if recs is not None and ser is not None:
            records.setdefault(case.group, {})[case.label] = recs
            series.setdefault(case.group, {})[case.label] = ser
        progress(
            f"seed {scenario.seeds[k]} {case.group:28s} {case.label:12s} prefill P99 "
            f"{_get(summary, 'overall', 'prefill_s', 'p99') or 0:8.3f} s"
            f"  migrations {summary['migration']['committed']:5d}  wall {wall:5.1f} s"
        )
        if bar is not None and overall is not None:
            bar.advance(overall)

    if jobs == 1:
        for k, case in work:
            done(k, case, _run_one(case, scenario.seeds[k], k == 0, bar))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, case, scenario.seeds[k], k == 0): (k, case) for k, case in work}
            for fut in as_completed(futures):
                k, case = futures[fut]
                done(k, case, fut.result())
    doc = {
        "scenario": scenario.name,
        "seeds": list(scenario.seeds),
        "runs": dict(zip(map(str, scenario.seeds), by_seed, strict=True)),
    }
    (out / "compare.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    plot_paths = _plots(scenario, by_seed, records, series, out)
    (out / "COMPARE.md").write_text(_markdown(scenario, by_seed, plot_paths))
    return by_seed


def _markdown(scenario: Scenario, by_seed: Sequence[Runs], plot_paths: list[Path]) -> str:
    first = scenario.cases[0].config
    requests = next(iter(next(iter(by_seed[0].values())).values()))["overall"]["num_requests"]
    seeds = ", ".join(map(str, scenario.seeds))
    parts = [
        f"# {scenario.name}: {scenario.title}\n",
        f"Simulated with `{first.profile}` ({'prefill-only / decode-only' if first.split_steps else 'mixed'} steps), "
        f"{requests} requests per run, seeds {seeds}, load scale {scenario.load_scale:g} "
        f"(rates = paper rate x instances/16 x load scale), migration bandwidth {first.transfer.bandwidth_gbps:g} "
        f"Gbit/s + {first.transfer.stage_latency_ms:g} ms per stage.\n",
        "## Headline (ratios: baseline / policy, >1 = policy better; cost: change vs baseline; "
        "median [min-max] over seeds)\n",
        headline(scenario, by_seed),
    ]
    tgt = targets(scenario, by_seed)
    if tgt:
        parts += ["\n## Acceptance targets (issue #15)\n", tgt]
    if scenario.name in ("paper-fig11", "paper-fig11-sweep"):
        parts += [
            "\n## Calibration: our absolute figures vs the artifact's GPU re-run\n",
            calibration_table(scenario, by_seed),
        ]
    parts += [
        "\n## Absolute figures (median over seeds)\n",
        absolute_table(by_seed),
        "\n## The paper\n",
        "| figure | paper |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in scenario.paper),
        f"\n## Per workload, seed {scenario.seeds[0]}\n",
    ]
    for group, runs in by_seed[0].items():
        spec = next(iter(runs.values()))["spec"]
        parts.append(f"\n### {group} (`{spec}`)\n")
        parts.append(markdown_table(runs, baseline=scenario.baseline))
    if plot_paths:
        parts.append("\n## Plots\n")
        parts += [f"![{p.stem}]({p.name})\n" for p in plot_paths]
    return "\n".join(parts)


def _plots(
    scenario: Scenario,
    by_seed: Sequence[Runs],
    records: dict[str, dict[str, list[RequestRecord]]],
    series: dict[str, dict[str, list[tuple[float, int]]]],
    out: Path,
) -> list[Path]:
    paths: list[Path] = []
    first = by_seed[0]
    groups = list(first)
    if scenario.name == "paper-fig11":
        for i, g in enumerate(groups):
            name = f"latency_cdf_{g.split(' ', 1)[0].lower().replace('-', '')}.png" if i else "latency_cdf.png"
            paths.append(
                plots.latency_cdfs(records[g], out / name, title=f"{scenario.name}: {g} (seed {scenario.seeds[0]})")
            )
    else:
        paths.append(
            plots.latency_cdfs(records[groups[0]], out / "latency_cdf.png", title=f"{scenario.name}: {groups[0]}")
        )

    def med(group: str, label: str, *path: str) -> float | None:
        return _median(values(by_seed, group, label, tuple(path)))

    if scenario.name == "paper-fig11-sweep":
        traces = list(dict.fromkeys(g.split(" ", 1)[0] for g in groups))
        for trace in traces:
            sweep = [g for g in groups if g.split(" ", 1)[0] == trace]
            sweep.sort(key=lambda g: first[g][next(iter(first[g]))]["x"])
            xs = [first[g][next(iter(first[g]))]["x"] for g in sweep]
            labels = list(first[sweep[0]])
            for metric, stat in (("prefill_s", "p99"), ("prefill_s", "mean")):
                lines = {lb: [med(g, lb, "overall", metric, stat) for g in sweep] for lb in labels}
                name = f"{trace.lower().replace('-', '')}_{metric.removesuffix('_s')}_{stat}_vs_rate.png"
                ylabel = f"{metric} {stat} (median over seeds)"
                paths.append(
                    plots.metric_lines(
                        xs, lines, out / name, xlabel="rate (req/s)", ylabel=ylabel, title=trace, logy=True
                    )
                )
    if scenario.name == "paper-fig13":
        xs = [first[g][next(iter(first[g]))]["x"] for g in groups]
        lines = {
            f"{lb} {prio}": [med(g, lb, "by_priority", prio, "prefill_s", "p99") for g in groups]
            for lb in first[groups[0]]
            for prio in ("high", "normal")
        }
        paths.append(
            plots.metric_lines(xs, lines, out / "prefill_p99_vs_cv.png", xlabel="Gamma CV", ylabel="prefill P99 (s)")
        )
    if scenario.name == "paper-fig14":
        paths.append(plots.instances_over_time(series[groups[0]], out / "instances.png", title=groups[0]))
        sweep = [g for g in groups if g.startswith("threshold")]
        if sweep:
            labels = list(first[sweep[0]])
            xs = [first[g][labels[0]]["x"] for g in sweep]
            for mpath, ylabel in ((("instance_hours",), "instance-hours"), (("overall", "prefill_s", "p99"), "P99")):
                lines = {lb: [med(g, lb, *mpath) for g in sweep] for lb in labels}
                name = f"threshold_{mpath[-1]}.png"
                paths.append(plots.metric_lines(xs, lines, out / name, xlabel="scale-up threshold", ylabel=ylabel))
    return paths
