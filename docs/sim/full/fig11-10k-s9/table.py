"""Session 9's Fig. 11 tables from ``llumnix sim compare`` outputs: ratios INFaaS++ / Llumnix (median [min-max] over
the seeds), the prefill P99 per seed, and the calibration figures (INFaaS++'s absolute ones beside Llumnix's).

    .venv/bin/python docs/sim/full/fig11-10k-s9/table.py docs/sim/full/fig11-10k-s9/{S-S,M-M,L-L,S-L,L-S}/compare.json
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def figures(run: dict[str, Any]) -> dict[str, float]:
    o = run["overall"]
    return {
        "pm": o["prefill_s"]["mean"],
        "p99": o["prefill_s"]["p99"],
        "dm": o["decode_s"]["mean"],
        "d99": o["decode_s"]["p99"],
        "em": o["e2e_s"]["mean"],
        "pl": o["preemption_loss_s"],
        "fr": run["fragmentation"],
        "mig": run["migration"]["committed"],
    }


def spread(values: list[float], fmt: str = "{:.2f}", unit: str = "x") -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)}{unit} [{fmt.format(lo)}-{fmt.format(hi)}]"


def main(paths: list[str]) -> None:
    ratio_rows: list[str] = []
    seed_rows: list[str] = []
    cal_rows: list[str] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs: list[tuple[str, dict[str, float], dict[str, float]]] = []
        for _, workloads in sorted(data["runs"].items(), key=lambda kv: int(kv[0])):
            for workload, policies in workloads.items():
                runs.append((workload, figures(policies["infaas++"]), figures(policies["llumnix"])))
        name = runs[0][0].replace(" rate=", " ")
        base = [b for _, b, _ in runs]
        llx = [x for _, _, x in runs]

        def ratio(key: str, base: list[dict[str, float]] = base, llx: list[dict[str, float]] = llx) -> list[float]:
            return [b[key] / x[key] if x[key] > 0 else float("inf") for b, x in zip(base, llx, strict=True)]

        lower = [100 * (1 - x["pl"] / b["pl"]) for b, x in zip(base, llx, strict=True)]
        migrations = statistics.median([x["mig"] for x in llx])

        def cells(values: list[float], fmt: str) -> str:
            return " / ".join(fmt.format(v) for v in values)

        pl_cell = f"{statistics.median(lower):.0f} % [{min(lower):.0f}-{max(lower):.0f} %]"
        ratio_rows.append(
            f"| {name} | {spread(ratio('pm'))} | {spread(ratio('p99'))} | {spread(ratio('d99'))}"
            f" | {spread(ratio('em'))} | {pl_cell} | {spread(ratio('fr'), '{:.1f}')} | {migrations:.0f} |"
        )
        base_p99 = cells([b["p99"] for b in base], "{:.1f}")
        llx_p99 = cells([x["p99"] for x in llx], "{:.1f}")
        seed_rows.append(f"| {name} | {base_p99} | {llx_p99} | {cells(ratio('p99'), '{:.2f}x')} |")
        frag_base = 100 * statistics.median([b["fr"] for b in base])
        frag = f"{frag_base:.2f} % vs {100 * statistics.median([x['fr'] for x in llx]):.2f} %"
        cal_rows.append(
            f"| {name} | {spread([b['dm'] for b in base], '{:.4f}', '')}"
            f" | {spread([b['p99'] for b in base], '{:.1f}', '')} | {spread([b['pl'] for b in base], '{:.2f}', '')}"
            f" | {frag} | {spread([x['dm'] for x in llx], '{:.4f}', '')} |"
        )
    print(
        "| trace / rate | prefill mean | prefill P99 | decode P99 | e2e mean | preemption loss lower | fragmentation |"
        " migrations (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(ratio_rows) + "\n")
    print("| trace / rate | INFaaS++ prefill P99, seeds 0-4 (s) | Llumnix | ratio |")
    print("|---|---|---|---|")
    print("\n".join(seed_rows) + "\n")
    print(
        "| trace / rate | decode mean per token (s) | prefill P99 (s) | preemption loss (s) |"
        " fragmentation, INFaaS++ vs Llumnix | Llumnix decode mean |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(cal_rows))


if __name__ == "__main__":
    main(sys.argv[1:])
