"""Fig. 13 attribution (session 7): where do normal requests lose under priorities? One instrumented simulator run.

Hooks only record (no decision changes):
- every preemption: the victim's priority, whether the engine's high-priority admission (``_make_room``) caused it or
  a running request's block growth did, whether the instance held high-priority work, and the tokens thrown away
  (computed tokens that must be recomputed);
- every migration: (source holds high, destination holds high) at the start, outcome and the abort reason;
- every dispatch of a normal request: whether it went to an instance holding high-priority work;
- every 1 s sample: per instance free blocks, waiting / running counts, split by H (holds high) and N (does not):
  the integral of normal waiting requests, and the "idle" memory (free above the watermark on instances with an
  empty queue while some other instance has requests waiting) -- the part of the cluster that is not
  work-conserving.

    .venv/bin/python docs/sim/reduced/fig13-diag/attrib.py SEED RATE N aware|ignored [RESERVE|-] [OUT.json]

``SPILL=<blocks>`` overrides ``normal_spill_floor_blocks``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import Counter
from typing import Any

from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.data_plane.engine import scheduler as sched_mod
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.tools.sim.cluster import ClusterSimulator
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import load_workload
from pyllumnix.tools.sim.summary import run_summary

PRE: Counter[str] = Counter()
_CTX: list[str] = []

_orig_preempt = sched_mod.Scheduler._preempt
_orig_make_room = sched_mod.Scheduler._make_room


def _preempt(self: Any, req: Any) -> None:
    cls = "high" if req.high else "normal"
    ctx = _CTX[-1] if _CTX else "growth"
    holds_high = any(r.high for r in self.running) or any(r.high for r in self.waiting)
    key = f"{cls}/{ctx}/{'H' if holds_high or req.high else 'N'}"
    PRE[key] += 1
    PRE[key + "/tokens"] += req.num_computed_tokens
    _orig_preempt(self, req)


def _make_room(self: Any, need: int, scheduled: Any, preempted: Any) -> int | None:
    _CTX.append("make_room")
    try:
        return _orig_make_room(self, need, scheduled, preempted)
    finally:
        _CTX.pop()


sched_mod.Scheduler._preempt = _preempt  # type: ignore[method-assign]
sched_mod.Scheduler._make_room = _make_room  # type: ignore[method-assign]


class Attrib(ClusterSimulator):
    def __init__(self, config: SimConfig, arrivals: Any, priorities: bool) -> None:
        super().__init__(config, arrivals)
        self.priorities = priorities
        self.disp: Counter[str] = Counter()
        self.placed: dict[str, str] = {}
        self.mig_kind: dict[int, str] = {}
        self.migs: Counter[str] = Counter()
        self.integ: Counter[str] = Counter()
        self.max_wait: list[int] = []

    def _dispatch(self, arrival: Any, t: float) -> bool:
        before = self.snapshot
        ok = super()._dispatch(arrival, t)
        if ok:
            iid = self.tracker.tracks[arrival.request_id].instance
            v = before.get(iid)
            h = "H" if v is not None and v.holds_high else "N"
            cls = "high" if self.priorities and arrival.priority >= Priority.HIGH else "normal"
            self.disp[f"{cls}->{h}"] += 1
            self.placed[arrival.request_id] = h
            if v is not None and cls == "normal":
                # Would the engine queue it on arrival? avail as the dispatcher saw it, less the prompt's blocks,
                # below the watermark. "window": avail covered the prompt but not the watermark too.
                demand = -(-arrival.input_len // max(v.block_size, 1))
                avail = v.free_blocks - v.waiting_demand_blocks - v.dispatched_demand_blocks
                if avail - demand < v.watermark_blocks:
                    self.disp[f"normal->{h}/queued{'/window' if avail >= demand else ''}"] += 1
        return ok

    def _start_migration(self, order: Any, t: float) -> None:
        s, d = self.snapshot.get(order.source), self.snapshot.get(order.destination)
        started = len(self.migrations)
        super()._start_migration(order, t)
        if len(self.migrations) > started and s is not None and d is not None:
            kind = f"{'H' if s.holds_high else 'N'}->{'H' if d.holds_high else 'N'}/{order.selection.name}"
            self.mig_kind[id(self.migrations[-1])] = kind

    def _end_migration(self, mig: Any, t: float) -> None:
        super()._end_migration(mig, t)
        kind = self.mig_kind.get(id(mig), "?")
        reason = mig.reason.split(":")[0] if mig.reason else ""
        self.migs[f"{kind}/{mig.outcome.name}/{reason}"] += 1

    def _sample_tick(self, arg: Any, t: float) -> None:
        super()._sample_tick(arg, t)
        dt = self.config.sample_interval_s
        views = list(self.snapshot)
        any_wait = sum(v.num_waiting - v.num_waiting_high for v in views)
        self.max_wait.append(max((v.num_waiting for v in views), default=0))
        for v in views:
            g = "H" if v.holds_high else "N"
            nw = v.num_waiting - v.num_waiting_high
            self.integ[f"normal_waiting_{g}"] += nw * dt
            self.integ[f"high_waiting_{g}"] += v.num_waiting_high * dt
            self.integ[f"inst_s_{g}"] += dt
            self.integ[f"used_{g}"] += (v.total_blocks - v.free_blocks) * dt
            if any_wait > 0:
                self.integ["queued_s"] += dt / max(1, len(views))
                if v.num_waiting == 0:
                    self.integ[f"idle_free_{g}"] += max(0, v.free_blocks - v.watermark_blocks) * dt
                self.integ[f"free_while_queued_{g}"] += max(0, v.free_blocks - v.watermark_blocks) * dt


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
    sim = Attrib(config, arrivals, priorities)
    if "SPILL" in os.environ:
        sim.policy_config = dataclasses.replace(sim.policy_config, normal_spill_floor_blocks=int(os.environ["SPILL"]))
        sim.core = PolicyCore(sim.policy_config, seed=seed)
    result = sim.run()
    summary = run_summary(result, {a.request_id: a.output_len for a in arrivals})
    # Normal requests' prefill by where they were first placed.
    by_place: dict[str, list[float]] = {"H": [], "N": []}
    preempted_normal = 0
    for r in result.records:
        if r.priority >= Priority.HIGH or r.first_token_time is None:
            continue
        by_place[sim.placed.get(r.request_id, "N")].append(r.first_token_time - r.arrival)
        preempted_normal += bool(r.preemptions)
    by = summary["by_priority"]
    out = {
        "seed": seed,
        "rate": rate,
        "mode": mode,
        "reserve": reserve,
        "prefill_mean": {c: by[c]["prefill_s"]["mean"] for c in by},
        "normal_preemption_loss_s": by["normal"]["preemption_loss_s"],
        "normal_preempted_requests": preempted_normal,
        "normal_prefill_by_place": {k: [len(v), sum(v) / max(1, len(v))] for k, v in by_place.items()},
        "dispatch": dict(sim.disp),
        "preemptions": dict(PRE),
        "migrations": dict(sim.migs),
        "integrals": {k: round(v, 1) for k, v in sim.integ.items()},
        "max_wait_top": sorted(sim.max_wait)[-5:],
        "end_s": result.end_time_s,
    }
    path = argv[6] if len(argv) > 6 else f"attrib-s{seed}-r{rate}-{mode}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv)
