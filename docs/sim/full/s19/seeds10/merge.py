"""Session 19: Fig. 11 over ten seeds. Merges session 9's runs (seeds 0-4) with this session's (seeds 5-9, the same
command with ``--seed 5 --seeds 5``; same code for both policies) into one compare.json per trace, which session 9's
table.py then summarises:

    python docs/sim/full/s19/seeds10/merge.py
    python docs/sim/full/fig11-10k-s9/table.py docs/sim/full/s19/seeds10/{S-S,M-M,L-L,S-L,L-S}/compare.json
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIG11 = os.path.join(HERE, "..", "..", "fig11-10k-s9")


def main() -> None:
    for trace in ("S-S", "M-M", "L-L", "S-L", "L-S"):
        parts = [os.path.join(FIG11, trace, "compare.json"), os.path.join(HERE, "s5-9", trace, "compare.json")]
        if not all(os.path.exists(p) for p in parts):
            continue
        runs: dict[str, object] = {}
        seeds: list[int] = []
        for path in parts:
            with open(path) as f:
                data = json.load(f)
            overlap = runs.keys() & data["runs"].keys()
            if overlap:
                raise SystemExit(f"{path}: seeds {sorted(overlap)} already merged")
            runs.update(data["runs"])
            seeds += data["seeds"]
            scenario = data["scenario"]
        os.makedirs(os.path.join(HERE, trace), exist_ok=True)
        with open(os.path.join(HERE, trace, "compare.json"), "w") as f:
            json.dump({"runs": runs, "scenario": scenario, "seeds": seeds}, f, indent=1)


if __name__ == "__main__":
    main()
