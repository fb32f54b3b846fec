"""Session 19's veto experiment: Llumnix's prefill P99 per seed on the patched simulators (v2, v2b, v3) against HEAD's
(session 9's Fig. 11, same code for both policies) and the ratio to session 9's INFaaS++ on the same seed.

    python docs/sim/full/s19/veto/table.py
"""

from __future__ import annotations

import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
FIG11 = os.path.join(HERE, "..", "..", "fig11-10k-s9")
TRACES = {
    "mm77": ("M-M", "M-M rate=7.7"),
    "ll29": ("L-L", "L-L rate=2.9"),
    "sl425": ("S-L", "S-L rate=4.25"),
    "ss35": ("S-S", "S-S rate=35"),
}


def p99(o: dict) -> float:
    return float(o["overall"]["prefill_s"]["p99"] if "overall" in o else o["prefill_s"]["p99"])


def _load(path: str) -> dict:
    with open(path) as f:
        return dict(json.load(f))


def main() -> None:
    print("| trace | variant | Llumnix prefill P99 per seed 0-4 (s) | INFaaS++ / Llumnix per seed | median ratio |")
    print("|---|---|---|---|---:|")
    for key, (folder, point) in TRACES.items():
        with open(os.path.join(FIG11, folder, "compare.json")) as f:
            runs = json.load(f)["runs"]
        infaas = [p99(runs[str(s)][point]["infaas++"]) for s in range(5)]
        variants = {"HEAD (session 9)": [p99(runs[str(s)][point]["llumnix"]) for s in range(5)]}
        for v in ("v2", "v2b", "v3"):
            paths = [os.path.join(HERE, f"{v}-llumnix", f"{key}-s{s}", "summary.json") for s in range(5)]
            if all(os.path.exists(p) for p in paths):
                variants[v] = [p99(_load(p)) for p in paths]
        for name, ll in variants.items():
            ratios = [i / x for i, x in zip(infaas, ll, strict=True)]
            print(
                f"| {folder} | {name} | {' / '.join(f'{x:.1f}' for x in ll)} | "
                f"{' / '.join(f'{r:.2f}x' for r in ratios)} | {statistics.median(ratios):.2f}x |"
            )


if __name__ == "__main__":
    main()
