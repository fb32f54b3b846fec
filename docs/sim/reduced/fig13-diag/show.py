"""One line per 10 s sample of a ``diag.py`` output: instances holding high-priority work (H) against the others (N).

Per group: free blocks, running (of which high priority), waiting, the dispatch freeness a normal request sees (fd,
per H instance; min/max over N) and the migration freeness (fm); then dispatches and migrations since the last sample.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def line(r: dict[str, Any]) -> str:
    hi = [i for i in r["insts"] if i["H"]]
    lo = [i for i in r["insts"] if not i["H"]]

    def total(group: list[dict[str, Any]], key: str) -> int:
        return sum(int(i[key]) for i in group)

    fd_lo = [i["fd"] for i in lo] or [0.0]
    return (
        f"t={r['t']:4d} H:{len(hi):2d} free={total(hi, 'free'):5d} run={total(hi, 'run'):3d}"
        f"(hi {total(hi, 'runH'):2d}) "
        f"wait={total(hi, 'wait'):3d} fd={[i['fd'] for i in hi]} fm={[i['fm'] for i in hi]} | N:{len(lo)} "
        f"free={total(lo, 'free'):5d} run={total(lo, 'run'):4d} wait={total(lo, 'wait'):4d} "
        f"fd[min,max]={min(fd_lo):.2f},{max(fd_lo):.2f} | disp={r['disp']} migs={r['migs']}"
    )


def main(argv: list[str]) -> None:
    with open(argv[1]) as f:
        data = json.load(f)
    t0, t1 = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (0, 10**9)
    for r in data["rows"]:
        if t0 <= r["t"] <= t1:
            print(line(r))


if __name__ == "__main__":
    main(sys.argv)
