"""One JSON-able summary per run, and a markdown table comparing runs (policies) side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyllumnix.tools.metrics.cluster import ClusterSample, fragmentation, instance_hours
from pyllumnix.tools.metrics.latency import latency_stats
from pyllumnix.tools.metrics.records import RequestRecord
from pyllumnix.tools.workload.request import PRIORITY_HIGH, PRIORITY_NORMAL

PRIORITY_NAMES: dict[int, str] = {PRIORITY_NORMAL: "normal", PRIORITY_HIGH: "high"}


def summarize(
    records: Sequence[RequestRecord],
    *,
    cluster_samples: Sequence[ClusterSample] | None = None,
    instance_series: Sequence[tuple[float, int]] | None = None,
    end_time_s: float | None = None,
) -> dict[str, Any]:
    """A JSON-able summary of one run: latency statistics overall and per priority, preemption loss, migrations,
    throughput, and, when the series are given, fragmentation and instance-hours.

    ``end_time_s`` closes the time series (default: the later of the last finish and the last sample). Statistics
    with no data are None, never NaN, so the result dumps as strict JSON.
    """
    finish_times = [r.finish_time for r in records if r.finish_time is not None]
    first_arrival = min((r.arrival for r in records), default=None)
    last_finish = max(finish_times, default=None)
    duration = last_finish - first_arrival if last_finish is not None and first_arrival is not None else None
    out_tokens = sum(r.num_output_tokens for r in records if r.finished)
    summary: dict[str, Any] = {
        "overall": latency_stats(records),
        "by_priority": {
            PRIORITY_NAMES[p]: latency_stats([r for r in records if r.priority == p])
            for p in sorted({r.priority for r in records})
        },
        "duration_s": duration,
        "throughput_rps": len(finish_times) / duration if duration else None,
        "output_tokens_per_s": out_tokens / duration if duration else None,
        "fragmentation": None,
        "instance_hours": None,
    }
    candidates = [t for t in (last_finish,) if t is not None]
    if cluster_samples:
        candidates.append(cluster_samples[-1].time_s)
    if instance_series:
        candidates.append(instance_series[-1][0])
    end = end_time_s if end_time_s is not None else max(candidates, default=0.0)
    if cluster_samples:
        summary["fragmentation"] = fragmentation(cluster_samples, end_time_s=end)
    if instance_series:
        summary["instance_hours"] = instance_hours(instance_series, end_time_s=end)
    return summary


# (label, path into a summary, kind); kind "s" = seconds, "pct" = fraction shown as %, "n" = count / plain number.
Row = tuple[str, tuple[str, ...], str]

_LATENCY_ROWS: list[tuple[str, str, str]] = [
    ("prefill mean", "prefill_s", "mean"),
    ("prefill P99", "prefill_s", "p99"),
    ("decode mean", "decode_s", "mean"),
    ("decode P99", "decode_s", "p99"),
    ("e2e mean", "e2e_s", "mean"),
    ("e2e P99", "e2e_s", "p99"),
]


def default_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """Overall latencies, preemption loss, fragmentation, cost, then per-priority latencies when a run has both."""
    rows: list[Row] = [(f"{label} (s)", ("overall", key, stat), "s") for label, key, stat in _LATENCY_ROWS]
    rows += [
        ("preemption loss mean (s)", ("overall", "preemption_loss_s"), "s"),
        ("fragmentation", ("fragmentation",), "pct"),
        ("instance-hours", ("instance_hours",), "n"),
        ("migrations", ("overall", "num_migrations"), "n"),
        ("preemptions", ("overall", "num_preemptions"), "n"),
    ]
    if any(len(s.get("by_priority", {})) > 1 for s in summaries.values()):
        for group in ("high", "normal"):
            rows += [
                (f"{group}: {label} (s)", ("by_priority", group, key, stat), "s") for label, key, stat in _LATENCY_ROWS
            ]
    return rows


def _lookup(summary: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = summary
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def _fmt(value: float, kind: str) -> str:
    if kind == "pct":
        return f"{100.0 * value:.2f}%"
    if kind == "n" and float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def markdown_table(
    summaries: Mapping[str, Mapping[str, Any]],
    baseline: str | None = None,
    rows: Sequence[Row] | None = None,
) -> str:
    """Side-by-side markdown table of run summaries (one column per run, e.g. per policy).

    Each non-baseline cell also shows ``value / baseline`` as ``(0.13x)``: below 1 means smaller than the baseline,
    so for latencies the paper's "Nx better" is 1 / ratio. ``baseline`` defaults to the first run. Rows with no
    value in any run are left out; a missing value shows as ``-``.
    """
    if not summaries:
        raise ValueError("no summaries to compare")
    names = list(summaries)
    base = names[0] if baseline is None else baseline
    if base not in summaries:
        raise ValueError(f"baseline {base!r} is not among the runs ({', '.join(names)})")
    names = [base, *(n for n in names if n != base)]
    lines = [
        "| metric | " + " | ".join(f"{n} (baseline)" if n == base else n for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, path, kind in rows if rows is not None else default_rows(summaries):
        values = [_lookup(summaries[n], path) for n in names]
        if all(v is None for v in values):
            continue
        base_value = values[0]
        cells = []
        for i, value in enumerate(values):
            if value is None:
                cells.append("-")
                continue
            cell = _fmt(value, kind)
            if i > 0 and base_value is not None and base_value != 0.0:
                cell += f" ({value / base_value:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
