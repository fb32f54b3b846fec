"""Cluster simulator: with priorities on, high-priority requests see lower prefill latency than normal ones under
load (the headroom relative to the 64-block test profile: all but 8 blocks, about the artifact's 100 of 792); with
priorities ignored they do not stand out. (A cap of 16 blocks with the default reserve of 100 left no headroom at all
on 64 blocks: only the old hard exclusion of normal requests from high-priority instances protected them.)"""

from __future__ import annotations

from pyllumnix.tools.sim import SimConfig, load_workload, run_case

SPEC = "uniform:poisson:rate=100:in_min=16:in_max=200:out_min=16:out_max=200:n=400:priority_share=0.1"


def _prefill(priorities: bool) -> tuple[float, float]:
    arrivals = load_workload(SPEC, 1, "tiny")
    config = SimConfig(instances=4, profile="tiny", priorities=priorities, high_headroom_reserve_blocks=8)
    _, summary = run_case(config, arrivals)
    assert summary["conservation"]["ok"]
    by = summary["by_priority"]
    return by["high"]["prefill_s"]["mean"], by["normal"]["prefill_s"]["mean"]


def test_high_priority_prefill_is_lower_with_priorities() -> None:
    high, normal = _prefill(True)
    assert high < 0.5 * normal
    high_ignored, _ = _prefill(False)
    assert high < 0.5 * high_ignored
