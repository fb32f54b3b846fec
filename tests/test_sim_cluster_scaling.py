"""Cluster simulator: auto-scaling starts instances under load (after the start-up delay), drains and removes them
when idle, and stays within [min, max]."""

from __future__ import annotations

import dataclasses

from pyllumnix.tools.sim import SimConfig, load_workload, run_case


def _config(policy: str = "llumnix") -> SimConfig:
    return SimConfig(
        instances=2,
        profile="tiny",
        policy=policy,
        autoscale=True,
        min_instances=1,
        max_instances=5,
        scaling_interval_s=0.5,
        scaling_warmup_s=0.0,
        startup_s=0.3,
    )


def test_scales_up_under_load_and_down_when_idle() -> None:
    # A burst, then a long quiet tail of sparse requests: the cluster grows, then shrinks back.
    burst = load_workload("uniform:poisson:rate=150:in_min=16:in_max=200:out_min=16:out_max=200:n=300", 1, "tiny")
    tail_start = burst[-1].arrival_time_s + 5.0
    tail = load_workload("fixed:const:rate=0.5:in=16:out=8:n=20", 2, "tiny")
    arrivals = burst + [
        type(a)(f"tail-{i}", tail_start + a.arrival_time_s, a.input_len, a.output_len) for i, a in enumerate(tail)
    ]
    for policy in ("llumnix", "infaas++"):
        result, summary = run_case(_config(policy), arrivals)
        counts = [n for _, n in result.instance_series]
        assert summary["conservation"]["ok"]
        assert max(counts) > 2, counts
        assert max(counts) <= 5 and min(counts) >= 1
        assert counts[-1] < max(counts), counts
        assert summary["instance_hours"] > 0


def test_idle_cluster_shrinks_to_min() -> None:
    arrivals = load_workload("fixed:const:rate=0.4:in=16:out=4:n=12", 0, "tiny")
    result, _ = run_case(_config(), arrivals)
    counts = [n for _, n in result.instance_series]
    assert counts[0] == 2 and counts[-1] == 1 and min(counts) == 1


def test_no_scaling_before_the_warm_up_and_the_last_instance_drains() -> None:
    """The artifact waits 100 s before its first scaling decision (here 6 s); before, the first came at 10 s."""
    arrivals = load_workload("fixed:const:rate=0.4:in=16:out=4:n=12", 0, "tiny")
    config = dataclasses.replace(_config(), scaling_warmup_s=6.0, drain_victim="last")
    result, _ = run_case(config, arrivals)
    changes = [(t, n) for t, n in result.instance_series if n != 2]
    assert changes and changes[0][0] >= 6.0, result.instance_series
    no_warmup, _ = run_case(_config(), arrivals)
    assert next(t for t, n in no_warmup.instance_series if n != 2) < 6.0
