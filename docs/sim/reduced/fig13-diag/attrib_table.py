"""Per-seed normal / high prefill-mean ratios (ignored / aware) from ``attrib.py`` outputs, with the "reorder floor":
the normal ratio if the waiting that high-priority requests no longer do (1,000 requests) landed on the 9,000 normal
ones and nothing else changed (a work-conserving cluster serving high-priority first).

    python3 docs/sim/reduced/fig13-diag/attrib_table.py AWARE_DIR [BASELINE_DIR]
"""

from __future__ import annotations

import json
import statistics
import sys

HIGH, NORMAL = 1000, 9000


def main(argv: list[str]) -> None:
    aware_dir = argv[1]
    base_dir = argv[2] if len(argv) > 2 else aware_dir
    rn: list[float] = []
    rh: list[float] = []
    for s in range(10):
        try:
            with open(f"{aware_dir}/s{s}-aware--.json") as f:
                a = json.load(f)
            with open(f"{base_dir}/s{s}-ignored--.json") as f:
                i = json.load(f)
        except FileNotFoundError:
            continue
        an, ah = a["prefill_mean"]["normal"], a["prefill_mean"]["high"]
        i_n, ih = i["prefill_mean"]["normal"], i["prefill_mean"]["high"]
        saved = (ih - ah) * HIGH
        rn.append(i_n / an)
        rh.append(ih / ah)
        print(
            f"seed {s}: normal {i_n:.3f} / {an:.3f} s = {rn[-1]:.2f}x, high {rh[-1]:.1f}x; normal extra wait "
            f"{(an - i_n) * NORMAL:.0f} req-s, high saved {saved:.0f} req-s; reorder floor "
            f"{i_n / (i_n + saved / NORMAL):.3f}x"
        )
    if rn:
        print(
            f"median normal {statistics.median(rn):.2f}x [{min(rn):.2f}-{max(rn):.2f}], "
            f"high {statistics.median(rh):.1f}x [{min(rh):.1f}-{max(rh):.1f}], {len(rn)} seeds"
        )


if __name__ == "__main__":
    main(sys.argv)
