"""Freeness ``F = (M - ΣV) / B``: roughly how many more decode steps the batch can run. Higher is freer.

One sign convention throughout (the public artifact mixed "load" and "freeness" and sorted with a non-strict
comparator, which starved an instance): an empty instance is +inf, a draining one -inf, and every sort key ends with
the instance id so ties break the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.views import InstanceView
from pyllumnix.control_plane.policy.virtual_usage import instance_headroom
from pyllumnix.infra.vocabulary import InstanceState

INF = math.inf


def paper_freeness(total_blocks: float, virtual_usage: float, batch_size: int) -> float:
    """The definition: (M - ΣV) / B; +inf for an empty batch, -inf for infinite usage."""
    if math.isinf(virtual_usage):
        return -INF
    if batch_size <= 0:
        return INF
    return (total_blocks - virtual_usage) / batch_size


def dispatch_freeness(view: InstanceView, config: PolicyConfig) -> float:
    """Dispatch and scaling form: (avail - b_all - headroom) / (R + W); requests dispatched since the last report count
    as waiting (their prefill demand is in b_all)."""
    if view.state == InstanceState.DRAINING:
        return -INF
    n = view.num_requests
    if n == 0:
        return INF
    avail = view.free_blocks - view.waiting_demand_blocks - view.dispatched_demand_blocks
    return (avail - instance_headroom(view, config)) / n


def migration_freeness(view: InstanceView, config: PolicyConfig) -> float:
    """Migration form: with de-frag (avail - b_first - headroom) / (R + [W > 0]); without, (avail - headroom) / R."""
    if view.state == InstanceState.DRAINING:
        return -INF
    h = instance_headroom(view, config)
    if config.enable_defrag:
        hol = view.head_of_line_demand_blocks if view.num_waiting > 0 else 0
        n = view.num_running + (1 if view.num_waiting > 0 else 0)
        return INF if n == 0 else (view.free_blocks - hol - h) / n
    return INF if view.num_running == 0 else (view.free_blocks - h) / view.num_running


def cluster_load(
    views: Iterable[InstanceView], config: PolicyConfig, *, removed: Collection[str] = ()
) -> tuple[float, int]:
    """The cluster as one virtual instance, dispatch form: (Σ(capacity - used - b_all - headroom), Σ(R + W)).

    Instances in ``removed`` and draining ones lose their capacity but keep their load (it moves to the others).
    Cordoned, starting and unhealthy instances are left out: the policy neither places work there nor counts on them.
    """
    num = 0.0
    den = 0
    for v in views:
        if not v.healthy or v.state in (InstanceState.CORDONED, InstanceState.STARTING, InstanceState.UNSPECIFIED):
            continue
        used = v.total_blocks - v.free_blocks
        keep = v.state != InstanceState.DRAINING and v.instance_id not in removed
        num += (v.total_blocks if keep else 0) - used - v.waiting_demand_blocks - v.dispatched_demand_blocks
        num -= instance_headroom(v, config)
        den += v.num_requests
    return num, den


def cluster_freeness(views: Iterable[InstanceView], config: PolicyConfig, *, removed: Collection[str] = ()) -> float:
    """Average freeness of the cluster: Σ(avail - b_all - headroom) / Σ(R + W); +inf when nothing is running."""
    num, den = cluster_load(views, config, removed=removed)
    return INF if den == 0 else num / den


def most_loaded_first(freeness: float, instance_id: str) -> tuple[float, str]:
    """Sort key: lowest freeness first, ties by id."""
    return (freeness, instance_id)


def freest_first(freeness: float, instance_id: str) -> tuple[float, str]:
    """Sort key: highest freeness first, ties by id (negating ±inf is exact)."""
    return (-freeness, instance_id)
