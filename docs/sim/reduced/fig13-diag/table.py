"""Fig. 13 tables from ``llumnix sim --out`` directories: per seed, and ratios (ignored / aware, > 1 = aware better)
as median [min-max] over the seeds. Directory names: ``seed<S>-priorities-ignored``, ``seed<S>-priority-aware[-X]``.

    .venv/bin/python docs/sim/reduced/fig13-diag/table.py DIR [DIR ...]
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

METRICS = (
    ("high", "prefill_s", "mean"),
    ("high", "prefill_s", "p99"),
    ("high", "decode_s", "mean"),
    ("high", "e2e_s", "mean"),
    ("normal", "prefill_s", "mean"),
    ("normal", "prefill_s", "p99"),
    ("normal", "decode_s", "mean"),
    ("normal", "e2e_s", "mean"),
)


def load(dirs: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """mode -> seed -> summary."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for d in dirs:
        for p in sorted(Path(d).glob("seed*/summary.json")):
            m = re.fullmatch(r"seed(\d+)-(.+)", p.parent.name)
            if m:
                runs.setdefault(m.group(2), {})[int(m.group(1))] = json.loads(p.read_text())
    return runs


def value(s: dict[str, Any], cls: str, metric: str, stat: str) -> float:
    return float(s["by_priority"][cls][metric][stat])


def main(dirs: list[str]) -> None:
    runs = load(dirs)
    base = runs.get("priorities-ignored", {})
    print("Baseline (priorities ignored):")
    print("| seed | prefill mean | P99 | P99.9 | > 2 s | > 10 s | decode mean |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed, s in sorted(base.items()):
        t = s["tail"]
        print(
            f"| {seed} | {s['overall']['prefill_s']['mean']:.3g} | {t['prefill_s']['p99']:.3g} | "
            f"{t['prefill_s']['p999']:.3g} | {100 * t['prefill_over_2s']:.1f} % | "
            f"{100 * t['prefill_over_10s']:.1f} % | "
            f"{s['overall']['decode_s']['mean']:.3g} |"
        )
    head = " | ".join(f"{c} {m.split('_')[0]} {st}" for c, m, st in METRICS)
    print(f"\n| seed | mode | {head} | normal preemptions | normal preemption loss |")
    print("|---|---|" + "---:|" * (len(METRICS) + 2))
    for seed in sorted({s for r in runs.values() for s in r}):
        for mode in sorted(runs, key=lambda m: (m != "priorities-ignored", m)):
            s = runs[mode].get(seed)
            if s is None:
                continue
            vals = " | ".join(f"{value(s, *k):.3g}" for k in METRICS)
            n = s["by_priority"]["normal"]
            print(f"| {seed} | {mode} | {vals} | {n['num_preemptions']} | {n['preemption_loss_s']:.3g} |")
    print(f"\n| point | seeds | {head} |")
    print("|---|---:|" + "---:|" * len(METRICS))
    for mode, per_seed in sorted(runs.items()):
        if mode == "priorities-ignored":
            continue
        seeds = sorted(s for s in per_seed if s in base)
        cells = []
        for k in METRICS:
            r = [value(base[s], *k) / value(per_seed[s], *k) for s in seeds]
            cells.append(f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]" if r else "-")
        print(f"| {mode} | {len(seeds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
