"""Fig. 13 diagnosis: one instrumented simulator run (ad hoc, for the REPORT's evidence; not part of the product).

Every 10 virtual seconds it records, per instance, whether it holds high-priority work, its free blocks, running /
waiting counts, head-of-line and waiting demand, the dispatch and migration freeness a normal request sees, and, since
the previous sample, where requests were dispatched (``normal->H``: a normal request to an instance holding
high-priority work) and which migrations started (``N->H``: from a normal instance to a high-priority one).

    .venv/bin/python docs/sim/reduced/fig13-diag/diag.py SEED RATE N aware|ignored [RESERVE|-] [OUT.json]
    .venv/bin/python docs/sim/reduced/fig13-diag/show.py OUT.json [T0 T1]

``SPILL=<blocks>`` in the environment overrides ``PolicyConfig.normal_spill_floor_blocks`` (1000000: the spill off).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import Counter
from typing import Any

from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.freeness import dispatch_freeness, migration_freeness
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.tools.sim.cluster import ClusterSimulator
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import load_workload
from pyllumnix.tools.sim.summary import run_summary


class Diag(ClusterSimulator):
    """The simulator with three hooks; every decision is the unmodified one."""

    def __init__(self, config: SimConfig, arrivals: Any, priorities: bool) -> None:
        super().__init__(config, arrivals)
        self.priorities = priorities
        self.rows: list[dict[str, Any]] = []
        self.disp: Counter[str] = Counter()
        self.migs: Counter[str] = Counter()

    def _dispatch(self, arrival: Any, t: float) -> bool:
        before = self.snapshot
        ok = super()._dispatch(arrival, t)
        if ok:
            v = before.get(self.tracker.tracks[arrival.request_id].instance)
            cls = "high" if self.priorities and arrival.priority >= Priority.HIGH else "normal"
            self.disp[f"{cls}->{'H' if v is not None and v.holds_high else 'N'}"] += 1
        return ok

    def _start_migration(self, order: Any, t: float) -> None:
        s, d = self.snapshot.get(order.source), self.snapshot.get(order.destination)
        started = len(self.migrations)
        super()._start_migration(order, t)
        if len(self.migrations) > started and s is not None and d is not None:
            self.migs[f"{'H' if s.holds_high else 'N'}->{'H' if d.holds_high else 'N'}"] += 1

    def _sample_tick(self, arg: Any, t: float) -> None:
        super()._sample_tick(arg, t)
        if round(t) % 10:
            return
        pc = self.policy_config
        insts = [
            {
                "id": v.instance_id,
                "H": v.holds_high,
                "free": v.free_blocks,
                "run": v.num_running,
                "runH": v.num_running_high,
                "wait": v.num_waiting,
                "waitH": v.num_waiting_high,
                "hol": v.head_of_line_demand_blocks,
                "wdem": v.waiting_demand_blocks,
                "fd": round(dispatch_freeness(v, pc), 2),
                "fm": round(migration_freeness(v, pc), 2),
                "mig_in": v.migrating_in,
                "mig_out": v.migrating_out,
            }
            for v in self.snapshot
        ]
        self.rows.append({"t": round(t), "insts": insts, "disp": dict(self.disp), "migs": dict(self.migs)})
        self.disp.clear()
        self.migs.clear()


def main(argv: list[str]) -> None:
    seed, rate, n, mode = int(argv[1]), float(argv[2]), int(argv[3]), argv[4]
    reserve = int(argv[5]) if len(argv) > 5 and argv[5] != "-" else None
    priorities = mode == "aware"
    arrivals = load_workload(f"S-S:gamma:rate={rate}:cv=4:n={n}:priority_share=0.1", seed, "llama-7b-a10")
    config = SimConfig(
        instances=16,
        priorities=priorities,
        split_steps=True,
        migrate_out_threshold=3.0,
        seed=seed,
        high_headroom_reserve_blocks=reserve,
    )
    sim = Diag(config, arrivals, priorities)
    if "SPILL" in os.environ:
        sim.policy_config = dataclasses.replace(sim.policy_config, normal_spill_floor_blocks=int(os.environ["SPILL"]))
        sim.core = PolicyCore(sim.policy_config, seed=seed)
    result = sim.run()
    summary = run_summary(result, {a.request_id: a.output_len for a in arrivals})
    out = argv[6] if len(argv) > 6 else f"diag-s{seed}-r{rate}-{mode}.json"
    with open(out, "w") as f:
        json.dump({"rows": sim.rows, "summary": summary}, f)
    by = summary["by_priority"]
    print(json.dumps({c: {"prefill_mean": by[c]["prefill_s"]["mean"], "p99": by[c]["prefill_s"]["p99"]} for c in by}))


if __name__ == "__main__":
    main(sys.argv)
