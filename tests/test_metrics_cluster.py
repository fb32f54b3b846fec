"""Fragmentation and instance-hours on hand-computed time series."""

from __future__ import annotations

import pytest

from pyllumnix.tools.metrics import (
    ClusterSample,
    InstanceSample,
    fragmentation,
    fragmentation_fraction,
    fragmented_blocks,
    instance_hours,
    time_weighted_mean,
)


def _sample(t: float, a: tuple[int, int, int], b: tuple[int, int, int]) -> ClusterSample:
    """Two 100-block instances; each tuple is (free blocks, waiting requests, head-of-line demand)."""
    return ClusterSample(
        t,
        (
            InstanceSample("a", a[0], 100, num_waiting=a[1], head_demand_blocks=a[2]),
            InstanceSample("b", b[0], 100, num_waiting=b[1], head_demand_blocks=b[2]),
        ),
    )


SAMPLES = [
    # t=0: a's head needs 20 > its 10 free, the cluster has 10 + 15 = 25 >= 20: the 20 blocks it could use if pooled
    # are fragmented, 20 / 200 = 0.1 of memory (the other 5 no queue needs).
    _sample(0.0, (10, 1, 20), (15, 0, 0)),
    # t=10: a's head needs 30 > 25 free in the whole cluster: truly out of memory, not fragmentation -> 0.
    _sample(10.0, (10, 1, 30), (15, 0, 0)),
    # t=20: nothing waits -> 0 (free memory is idle, not fragmented).
    _sample(20.0, (60, 0, 0), (70, 0, 0)),
    # t=30: a blocked (8 > 5) while the cluster has 5 + 40 = 45 free: 8 / 200 = 0.04.
    _sample(30.0, (5, 2, 8), (40, 0, 0)),
]


def test_fragmented_blocks_per_sample() -> None:
    assert [fragmented_blocks(s) for s in SAMPLES] == [20, 0, 0, 8]
    assert [fragmentation_fraction(s) for s in SAMPLES] == [0.1, 0.0, 0.0, 0.04]


def test_several_blocked_heads_count_smallest_first_while_pooled_memory_lasts() -> None:
    # a: head 30 > 20 free; b: head 40 > 25 free; pooled 45 admits a's 30 but not both (70): 30 fragmented.
    assert fragmented_blocks(_sample(0.0, (20, 1, 30), (25, 2, 40))) == 30
    # with a third, idle instance's 50 free blocks pooled (95 >= 30 + 40) both heads count: 70, not all 95
    idle = InstanceSample("c", 50, 100)
    three = ClusterSample(0.0, (*_sample(0.0, (20, 1, 30), (25, 2, 40)).instances, idle))
    assert fragmented_blocks(three) == 70


def test_head_that_fits_locally_is_not_blocked() -> None:
    # a's head needs 5 <= 10 free: admissible where it is, nothing fragmented.
    assert fragmented_blocks(_sample(0.0, (10, 3, 5), (50, 0, 0))) == 0


def test_time_weighted_fragmentation() -> None:
    # Each value holds 10 s, the last until 40: (0.1 * 10 + 0 + 0 + 0.04 * 10) / 40 = 1.4 / 40 = 0.035.
    assert fragmentation(SAMPLES, end_time_s=40.0) == pytest.approx(0.035)
    # Without an end time the last sample carries no weight: 1.0 / 30.
    assert fragmentation(SAMPLES) == pytest.approx(1.0 / 30)
    assert fragmentation([]) == 0.0


def test_time_weighted_mean_edge_cases() -> None:
    assert time_weighted_mean([5.0], [3.0]) == 3.0  # zero span: plain mean
    with pytest.raises(ValueError, match="non-decreasing"):
        time_weighted_mean([1.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="precedes the last sample"):
        time_weighted_mean([0.0, 1.0], [1.0, 2.0], end_time_s=0.5)


def test_instance_hours() -> None:
    # 8 instances for 30 min, 10 for 60 min, 4 for 30 min: 4 + 10 + 2 = 16 instance-hours.
    assert instance_hours([(0.0, 8), (1800.0, 10), (5400.0, 4)], end_time_s=7200.0) == pytest.approx(16.0)
    assert instance_hours([], end_time_s=10.0) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        instance_hours([(0.0, -1)], end_time_s=1.0)
