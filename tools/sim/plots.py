"""PNG plots of simulated runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pyllumnix.tools.metrics.latency import e2e_latency, prefill_latency
from pyllumnix.tools.metrics.records import RequestRecord
from pyllumnix.tools.workload.request import PRIORITY_HIGH

_METRICS = (("prefill", prefill_latency), ("end-to-end", e2e_latency))


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values))
    ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(runs: Mapping[str, Sequence[RequestRecord]], path: Path, title: str = "") -> Path:
    """Prefill and end-to-end latency CDFs (log x), one line per run (and per priority when a run has both)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, fn) in zip(axes, _METRICS, strict=True):
        for label, records in runs.items():
            groups = {label: list(records)}
            if any(r.priority == PRIORITY_HIGH for r in records):
                groups = {
                    f"{label} high": [r for r in records if r.priority == PRIORITY_HIGH],
                    f"{label} normal": [r for r in records if r.priority != PRIORITY_HIGH],
                }
            for glabel, group in groups.items():
                _cdf(ax, [v for r in group if (v := fn(r)) is not None and v > 0], glabel)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} latency (s)")
        ax.set_ylabel("CDF")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def instances_over_time(
    series: Mapping[str, Sequence[tuple[float, int]]], path: Path, title: str = "", end_s: float | None = None
) -> Path:
    """Instance count over time, one step line per run. A series holds only the changes, so ``end_s`` (the run's
    end) closes each line there: without it a run that never scaled was drawn as a single point at t = 0."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, changes in series.items():
        if changes:
            points = list(changes)
            if end_s is not None and points[-1][0] < end_s:
                points.append((end_s, points[-1][1]))
            ts, ns = zip(*points, strict=True)
            ax.step(ts, ns, where="post", label=label)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("instances")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def metric_lines(
    xs: Sequence[float],
    lines: Mapping[str, Sequence[float | None]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
) -> Path:
    """One metric against a swept parameter (rate, CV, threshold), one line per policy."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, ys in lines.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
