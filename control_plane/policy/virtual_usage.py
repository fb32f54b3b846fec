"""Virtual usage (paper §4.4): what each request "occupies" on an instance, in KV blocks.

- running request: its physical blocks plus a share ``headroom[p] / n_p`` of its priority's headroom;
- head-of-line queued request: its full demand (a blocked queue makes the instance look loaded: de-fragmentation);
- other queued requests: nothing but their headroom share;
- a draining instance: one fake request of infinite usage.

Deviation from the paper, on purpose: the headroom of priority ``p`` is held as soon as the instance holds any
request of ``p`` (running *or queued*), split over those ``n_p`` requests, because the queued high-priority request is
the one the headroom exists for. The instance's total is the same either way once the request runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.views import InstanceView, RequestView
from pyllumnix.infra.vocabulary import InstanceState, Priority, RequestPhase

INF = math.inf


def instance_headroom(view: InstanceView, config: PolicyConfig) -> int:
    """Σ headroom[p] over the priorities the instance holds (each request's shares sum to its priority's headroom)."""
    h = 0
    if view.holds_high:
        h += config.high_headroom(view.total_blocks)
    if view.holds_normal:
        h += config.normal_headroom_blocks
    return h


def request_virtual_usages(
    requests: Sequence[RequestView], config: PolicyConfig, *, total_blocks: int, draining: bool = False
) -> dict[str, float]:
    """Virtual usage of each request on one instance of ``total_blocks`` (finished requests count 0). On a draining
    instance the extra fake request is reported under the key ``""`` with +inf."""
    live = [r for r in requests if r.phase != RequestPhase.FINISHED]
    held: dict[Priority, int] = {}
    for r in live:
        held[r.priority] = held.get(r.priority, 0) + 1
    waiting = [r for r in live if r.phase == RequestPhase.WAITING]
    head = min(waiting, key=lambda r: (r.arrival_time, r.request_id)).request_id if waiting else None
    out: dict[str, float] = {}
    for r in live:
        share = config.headroom(r.priority, total_blocks) / held[r.priority]
        if r.phase == RequestPhase.WAITING:
            out[r.request_id] = share + (r.demand_blocks if r.request_id == head else 0)
        else:
            out[r.request_id] = r.num_blocks + share
    if draining:
        out[""] = INF
    return out


def instance_virtual_usage(view: InstanceView, config: PolicyConfig, *, defrag: bool = True) -> float:
    """ΣV of an instance from its view: running blocks + headroom (+ head-of-line demand under de-frag); +inf when
    draining."""
    if view.state == InstanceState.DRAINING:
        return INF
    hol = view.head_of_line_demand_blocks if defrag and view.num_waiting > 0 else 0
    return float(view.running_blocks + instance_headroom(view, config) + hol)
