"""Fig. 14 tables (per seed, then medians over seeds) from the runs of run.sh / run2.sh: summarise.py [OUT_DIR]."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _spread(xs: list[float], unit: str = "x", digits: int = 2) -> str:
    return f"{statistics.median(xs):.{digits}f}{unit} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


def main(root: Path) -> None:
    rows: list[str] = []
    agg: dict[str, dict[str, list[float]]] = {}
    for point in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for seed in range(10):
            a = root / point / f"seed{seed}-infaas++" / "summary.json"
            b = root / point / f"seed{seed}-llumnix" / "summary.json"
            if not (a.exists() and b.exists()):
                continue
            i, llx = json.loads(a.read_text()), json.loads(b.read_text())
            ih = (i["instance_hours"], llx["instance_hours"])
            p99 = (i["tail"]["prefill_s"]["p99"], llx["tail"]["prefill_s"]["p99"])
            p999 = (i["tail"]["prefill_s"]["p999"], llx["tail"]["prefill_s"]["p999"])
            mean = (i["overall"]["prefill_s"]["mean"], llx["overall"]["prefill_s"]["mean"])
            over10 = (i["tail"]["prefill_over_10s"] * 100, llx["tail"]["prefill_over_10s"] * 100)
            loss = (i["overall"]["preemption_loss_s"], llx["overall"]["preemption_loss_s"])
            saved = (1 - ih[1] / ih[0]) * 100
            rows.append(
                f"| {point} | {seed} | {ih[0]:.3f} / {ih[1]:.3f} | {saved:.1f} % | {p99[0]:.1f} / {p99[1]:.1f} | "
                f"{p999[0]:.0f} / {p999[1]:.0f} | {over10[0]:.2f} / {over10[1]:.2f} % | "
                f"{loss[0]:.2f} / {loss[1]:.2f} | "
                f"{llx['migration']['committed']} |"
            )
            g = agg.setdefault(point, {"saved": [], "p99": [], "mean": []})
            g["saved"].append(saved)
            g["p99"].append(p99[0] / p99[1])
            g["mean"].append(mean[0] / mean[1])
    print(
        "| point | seed | instance-hours INFaaS++ / Llumnix | saved | prefill P99 (s) | prefill P99.9 (s) | > 10 s | "
        "preempt. loss (s) | migrations |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print("| point | seeds | instance-hours saved | prefill P99 ratio | prefill mean ratio |")
    print("|---|---:|---:|---:|---:|")
    for point, g in agg.items():
        saved = _spread(g["saved"], " %", 1)
        print(f"| {point} | {len(g['saved'])} | {saved} | {_spread(g['p99'])} | {_spread(g['mean'])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/f14/out"))
