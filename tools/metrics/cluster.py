"""Cluster-level metrics from time series: memory fragmentation and instance-hours (cost)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceSample:
    """One instance's KV-cache state at a sample time.

    ``head_demand_blocks`` is the block demand of its head-of-line waiting request (ignored when ``num_waiting`` is 0).
    """

    instance_id: str
    free_blocks: int
    total_blocks: int
    num_waiting: int = 0
    head_demand_blocks: int = 0

    @property
    def blocked(self) -> bool:
        """A queue whose head cannot be admitted here for lack of free blocks."""
        return self.num_waiting > 0 and self.head_demand_blocks > self.free_blocks


@dataclass(frozen=True)
class ClusterSample:
    """All instances at one time."""

    time_s: float
    instances: tuple[InstanceSample, ...]


def fragmented_blocks(sample: ClusterSample) -> int:
    """Free blocks that are free in total but unusable by the queue at this sample (the paper's fragmentation: memory
    the queued requests could use if it were not scattered over the instances).

    Let ``F`` be the cluster's total free blocks. The *blocked* instances (waiting requests whose head-of-line request
    needs more blocks than the instance has free) hold heads that pooled memory could admit: taking the heads
    smallest first while their summed demand fits in ``F``, that summed demand is fragmented. Free memory no queue
    could use (nothing blocked, or a head larger than even the pooled memory) is idle or truly exhausted, not
    fragmented. (An earlier version counted all ``F`` as soon as one head could be admitted anywhere, which made one
    small blocked head count the whole cluster's free memory.)
    """
    free = sum(i.free_blocks for i in sample.instances)
    used = 0
    for demand in sorted(i.head_demand_blocks for i in sample.instances if i.blocked):
        if used + demand > free:
            break
        used += demand
    return used


def fragmentation_fraction(sample: ClusterSample) -> float:
    """``fragmented_blocks`` as a fraction of the cluster's total blocks at this sample (0 for an empty cluster)."""
    total = sum(i.total_blocks for i in sample.instances)
    return fragmented_blocks(sample) / total if total > 0 else 0.0


def _check_times(times: Sequence[float], end_time_s: float | None) -> None:
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("sample times must be non-decreasing")
    if end_time_s is not None and times and end_time_s < times[-1]:
        raise ValueError(f"end_time_s {end_time_s} precedes the last sample at {times[-1]}")


def time_weighted_mean(times: Sequence[float], values: Sequence[float], end_time_s: float | None = None) -> float:
    """Mean of a step function: ``values[k]`` holds from ``times[k]`` until ``times[k + 1]`` (the last one until
    ``end_time_s``, or for no time when that is None). With zero total span, the plain mean of the values."""
    if len(times) != len(values):
        raise ValueError("times and values differ in length")
    if not times:
        return 0.0
    _check_times(times, end_time_s)
    ends = [*times[1:], times[-1] if end_time_s is None else end_time_s]
    weights = [b - a for a, b in zip(times, ends, strict=True)]
    span = sum(weights)
    if span <= 0.0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / span


def fragmentation(samples: Sequence[ClusterSample], end_time_s: float | None = None) -> float:
    """Time-weighted average fraction of total KV blocks that is fragmented (see ``fragmented_blocks``).

    Each sample's fraction holds until the next sample (the last until ``end_time_s``, if given).
    """
    return time_weighted_mean(
        [s.time_s for s in samples], [fragmentation_fraction(s) for s in samples], end_time_s=end_time_s
    )


def instance_hours(series: Sequence[tuple[float, int]], end_time_s: float) -> float:
    """Instance-hours of a ``(time_s, n_instances)`` step series: each count holds until the next change, the last
    until ``end_time_s``. The cost measure of the auto-scaling experiments."""
    if not series:
        return 0.0
    times = [t for t, _ in series]
    _check_times(times, end_time_s)
    if any(n < 0 for _, n in series):
        raise ValueError("instance counts must be >= 0")
    ends = [*times[1:], end_time_s]
    return sum(n * (end - t) for (t, n), end in zip(series, ends, strict=True)) / 3600.0
