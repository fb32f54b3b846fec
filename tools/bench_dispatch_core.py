"""In-process latency of ``PolicyCore.dispatch`` on a large random cluster, updated between decisions the way the live
scheduler updates its snapshot: each decision is recorded on the chosen instance, and a batch of fresh load reports is
applied every few decisions. Only the dispatch call is timed; the update cost is reported separately.
"""

from __future__ import annotations

import json
import random
import statistics
import time

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, InstanceView
from pyllumnix.infra.vocabulary import InstanceState, Priority


def random_view(rng: random.Random, instance_id: str, total_blocks: int = 1300) -> InstanceView:
    running = rng.randint(0, 48)
    running_blocks = min(total_blocks, sum(rng.randint(1, 40) for _ in range(running)))
    waiting = rng.choice((0, 0, 0, rng.randint(1, 8)))
    hol = rng.randint(1, 64) if waiting else 0
    high = rng.randint(0, min(2, running)) if rng.random() < 0.1 else 0
    state = rng.choices(
        (InstanceState.ACTIVE, InstanceState.CORDONED, InstanceState.DRAINING, InstanceState.STARTING),
        weights=(94, 2, 2, 2),
    )[0]
    return InstanceView(
        instance_id=instance_id,
        state=state,
        healthy=rng.random() > 0.01,
        total_blocks=total_blocks,
        free_blocks=total_blocks - running_blocks,
        num_running=running,
        num_waiting=waiting,
        head_of_line_demand_blocks=hol,
        waiting_demand_blocks=hol + sum(rng.randint(1, 64) for _ in range(waiting - 1)) if waiting else 0,
        num_running_high=high,
        running_high_blocks=high * 10,
        running_blocks=running_blocks,
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_dispatch_latency(
    n_instances: int = 1024,
    n_decisions: int = 5000,
    seed: int = 0,
    *,
    policy: str = "llumnix",
    reports_every: int = 10,
    reports_per_batch: int = 20,
    high_priority_fraction: float = 0.1,
) -> dict[str, float | int | str]:
    """p50/p99/max of one dispatch decision in ms, plus the mean cost of recording a dispatch and of applying a batch
    of ``reports_per_batch`` load reports (applied every ``reports_every`` decisions)."""
    rng = random.Random(seed)
    ids = [f"instance-{i:05d}" for i in range(n_instances)]
    snapshot = ClusterSnapshot.of(random_view(rng, iid) for iid in ids)
    core = PolicyCore(PolicyConfig(dispatch_policy=policy), seed=seed)
    decide: list[float] = []
    record: list[float] = []
    reports: list[float] = []
    for k in range(n_decisions):
        prio = Priority.HIGH if rng.random() < high_priority_fraction else Priority.NORMAL
        request = DispatchRequestView(f"r{k}", prio, rng.randint(16, 2048), 128)
        t0 = time.perf_counter()
        chosen = core.dispatch(snapshot, request)
        t1 = time.perf_counter()
        decide.append(t1 - t0)
        if chosen is not None:
            view = snapshot.get(chosen)
            assert view is not None
            snapshot = snapshot.record_dispatch(chosen, request.demand_blocks(view.block_size), prio)
            record.append(time.perf_counter() - t1)
        if k % reports_every == reports_every - 1:
            batch = [random_view(rng, rng.choice(ids)) for _ in range(reports_per_batch)]
            t2 = time.perf_counter()
            snapshot = snapshot.updated({v.instance_id: v for v in batch}.values())
            reports.append(time.perf_counter() - t2)
    decide.sort()
    ms = 1e3
    return {
        "policy": policy,
        "n_instances": n_instances,
        "n_decisions": n_decisions,
        "p50_ms": _percentile(decide, 0.50) * ms,
        "p99_ms": _percentile(decide, 0.99) * ms,
        "max_ms": decide[-1] * ms,
        "mean_ms": statistics.fmean(decide) * ms,
        "record_dispatch_mean_ms": statistics.fmean(record) * ms if record else 0.0,
        "report_batch_mean_ms": statistics.fmean(reports) * ms if reports else 0.0,
        "reports_per_batch": reports_per_batch,
    }


if __name__ == "__main__":
    print(json.dumps([measure_dispatch_latency(policy=p) for p in ("llumnix", "infaas++", "round-robin", "balanced")]))
