"""Session 19's selection experiment: Llumnix with another request selection against session 9's Fig. 11 (SR, same
code otherwise), both divided into session 9's INFaaS++ on the same seed (INFaaS++ does not migrate, so the selection
does not touch it). Medians [min-max] over seeds 0-4 of INFaaS++ / Llumnix.

    python docs/sim/full/s19/selection/table.py [VARIANT ...]     # default: sel-LCR
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
FIG11 = os.path.join(HERE, "..", "..", "fig11-10k-s9")
TRACES = {  # run key -> (Fig. 11 folder, compare point)
    "ss35": ("S-S", "S-S rate=35"),
    "mm77": ("M-M", "M-M rate=7.7"),
    "ll29": ("L-L", "L-L rate=2.9"),
    "sl425": ("S-L", "S-L rate=4.25"),
    "ls16": ("L-S", "L-S rate=16"),
}
METRICS: dict[str, Callable[[dict[str, Any]], float]] = {
    "prefill mean": lambda o: o["overall"]["prefill_s"]["mean"],
    "prefill P99": lambda o: o["overall"]["prefill_s"]["p99"],
    "decode P99": lambda o: o["overall"]["decode_s"]["p99"],
    "preemption loss": lambda o: o["overall"]["preemption_loss_s"],
}


def _load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return dict(json.load(f))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x [{min(xs):.2f}-{max(xs):.2f}]"


def main(variants: list[str]) -> None:
    print("| trace | Llumnix | " + " | ".join(METRICS) + " | prefill P99 per seed (s) |")
    print("|---|---|" + "---:|" * len(METRICS) + "---|")
    for key, (folder, point) in TRACES.items():
        path = os.path.join(FIG11, folder, "compare.json")
        if not os.path.exists(path):
            continue
        runs = _load(path)["runs"]
        infaas = [runs[str(s)][point]["infaas++"] for s in range(5)]
        rows = {"SR (session 9)": [runs[str(s)][point]["llumnix"] for s in range(5)]}
        for v in variants:
            paths = [os.path.join(HERE, v, f"{key}-s{s}", "summary.json") for s in range(5)]
            if all(os.path.exists(p) for p in paths):
                rows[v] = [_load(p) for p in paths]
        for name, runs_l in rows.items():
            cells = [_fmt([_ratio(m(i), m(x)) for i, x in zip(infaas, runs_l, strict=True)]) for m in METRICS.values()]
            p99 = " / ".join(f"{METRICS['prefill P99'](x):.1f}" for x in runs_l)
            print(f"| {folder} | {name} | " + " | ".join(cells) + f" | {p99} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["sel-LCR"])
