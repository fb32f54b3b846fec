"""Session 19: per-instance state through one episode of a simulated run, and the migrate orders issued meanwhile.

Each line is one second of virtual time: per instance its free blocks (f), running (r) and waiting (w) requests and
head-of-line demand (h), then the orders (time, source, destination) since the line before. M-M 7.7 req/s, seed 2, the
paper's testbed (split steps, migrate-out threshold 10), run on PYTHONPATH of a snapshot:

    PYTHONPATH=<snapshot>/src python docs/sim/full/s19/veto/diag.py {llumnix|infaas++} T0 T1
"""

from __future__ import annotations

import sys
from typing import Any

from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.tools.sim.cluster import ClusterSimulator
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import load_workload


def main(policy: str, t0: float, t1: float) -> None:
    cfg = SimConfig(
        instances=16,
        profile="llama-7b-a10",
        policy=policy,
        enable_migration=policy == "llumnix",
        split_steps=True,
        migrate_out_threshold=10,
        seed=2,
    )
    sim = ClusterSimulator(cfg, load_workload("M-M:poisson:rate=7.7:n=10000", 2, cfg.profile, None))
    orders: list[tuple[float, str, str]] = []
    due = [t0]
    start = sim._start_migration

    def on_order(order: MigrateOrder, t: float) -> None:
        if t0 <= t <= t1:
            orders.append((round(t, 2), order.source[-2:], order.destination[-2:]))
        start(order, t)

    def on_report(arg: Any, t: float) -> None:
        if due[0] <= t <= t1:
            due[0] += 1.0
            cells = []
            for iid, inst in sorted(sim.instances.items()):
                ld = inst.engine.load()
                cells.append(
                    f"{iid[-2:]}:f{ld.free_blocks:>3} r{ld.num_running:>2} w{ld.num_waiting:>2}"
                    f" h{ld.head_of_line_demand_blocks:>3}"
                )
            print(f"t={t:.0f} " + " | ".join(cells))
            print("   orders since last:", orders)
            orders.clear()
        ClusterSimulator._report_tick(sim, arg, t)

    sim._start_migration = on_order  # type: ignore[method-assign]
    sim._report_tick = on_report  # type: ignore[method-assign]
    sim.run()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
