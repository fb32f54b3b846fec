"""Auto-scaling on the cluster's average freeness (the cluster as one virtual instance), every scaling interval.

- Below ``min_instances``: bring the count up (cancelling drains first).
- Average below ``scale_up_threshold``: enough instances to lift it back to the threshold, counting those already
  starting, capped by ``max_instances``; draining instances are cancelled ("undrained") before new ones start, since
  they are warm and already paid for.
- Average, recomputed as if the candidate (``drain_victim``: "last" = the highest instance id, the artifact's choice;
  "fewest-requests" = fewest requests, then freest, then id) were removed, still above ``scale_down_threshold``: drain
  that one instance (infinite virtual usage; it stops when empty). One drain at a
  time and none while instances start, so a decision is never made on load that is still moving.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.freeness import cluster_freeness, cluster_load, dispatch_freeness
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import InstanceView
from pyllumnix.infra.vocabulary import InstanceState


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    """Start ``start`` new instances, drain ``drain``, cancel the drain of ``cancel_drain``."""

    start: int = 0
    drain: tuple[str, ...] = ()
    cancel_drain: tuple[str, ...] = ()
    # The cluster average freeness the decision was made on (for metrics and logs).
    cluster_freeness: float = math.inf

    @property
    def is_noop(self) -> bool:
        return self.start == 0 and not self.drain and not self.cancel_drain


def decide_scaling(
    snapshot: ClusterSnapshot,
    config: PolicyConfig,
    starting_count: int = 0,
    cancellable: Collection[str] | None = None,
) -> ScalingDecision:
    """``starting_count``: instances the provider is starting that are not in the snapshot yet (STARTING views in the
    snapshot are counted as well). ``cancellable``: the draining instances whose drain this scaler may cancel (None:
    every one; the live scheduler passes the drains it ordered itself, so an operator's drain, e.g. to take a host
    down, is never undone: a replacement starts instead).

    Capacity for ``min_instances`` and for a scale-down is what serves: healthy ACTIVE (or STARTING) instances, not a
    silent or a cordoned one (before, with one of those counted, a scale-down could leave fewer serving instances than
    the minimum, for as long as the silent one kept its lease). The ``max_instances`` cap counts every instance."""
    views = snapshot.instances
    f = cluster_freeness(views, config)
    if not config.enable_scaling:
        return ScalingDecision(cluster_freeness=f)
    draining = sorted(
        (
            v
            for v in views
            if v.state == InstanceState.DRAINING and v.healthy and (cancellable is None or v.instance_id in cancellable)
        ),
        key=lambda v: (-v.num_requests, v.instance_id),
    )
    pending = starting_count + sum(1 for v in views if v.state == InstanceState.STARTING)
    current = sum(1 for v in views if v.state != InstanceState.DRAINING) + starting_count
    serving = starting_count + sum(
        1 for v in views if v.healthy and v.state in (InstanceState.ACTIVE, InstanceState.STARTING)
    )
    lo, hi = config.min_instances, config.max_instances

    def grow(needed: int) -> ScalingDecision:
        room = max(0, hi - current)
        undrain = tuple(v.instance_id for v in draining[: min(needed, room)])
        start = max(0, min(needed - len(undrain), room - len(undrain)))
        return ScalingDecision(start=start, cancel_drain=undrain, cluster_freeness=f)

    if serving < lo:
        return grow(lo - serving)
    if current > hi:
        victim = _candidate(views, config)
        return ScalingDecision(drain=(victim,) if victim else (), cluster_freeness=f)
    if f < config.scale_up_threshold:
        needed = _instances_to_reach(views, config, config.scale_up_threshold) - pending
        return grow(needed) if needed > 0 else ScalingDecision(cluster_freeness=f)
    any_draining = any(v.state == InstanceState.DRAINING for v in views)
    if f > config.scale_down_threshold and not any_draining and pending == 0 and serving - 1 >= lo:
        victim = _candidate(views, config)
        if victim is not None and cluster_freeness(views, config, removed=(victim,)) > config.scale_down_threshold:
            return ScalingDecision(drain=(victim,), cluster_freeness=f)
    return ScalingDecision(cluster_freeness=f)


def _candidate(views: tuple[InstanceView, ...], config: PolicyConfig) -> str | None:
    """The instance to drain, not mid-migration, chosen by ``config.drain_victim`` (``DRAIN_VICTIM_REGISTRY``)."""
    cands = [
        v for v in views if v.state == InstanceState.ACTIVE and v.healthy and not v.migrating_in and not v.migrating_out
    ]
    if not cands:
        return None
    return DRAIN_VICTIM_REGISTRY[config.drain_victim](cands, config).instance_id


def _last(cands: Sequence[InstanceView], config: PolicyConfig) -> InstanceView:
    """The highest id in natural order (the artifact's choice: the last-started instance of a numbered cluster)."""
    return max(cands, key=lambda v: _id_order(v.instance_id))


def _fewest_requests(cands: Sequence[InstanceView], config: PolicyConfig) -> InstanceView:
    """The cheapest to empty: one holding no high-priority work first (that never migrates, so such a drain lasts as
    long as its requests run, and high-priority work gathers on small batches by design), then fewest requests, then
    freest, then lowest id."""
    return min(cands, key=lambda v: (v.holds_high, v.num_requests, -dispatch_freeness(v, config), v.instance_id))


# How a scale-down picks its victim among the candidates, by ``PolicyConfig.drain_victim``.
DRAIN_VICTIM_REGISTRY: dict[str, Callable[[Sequence[InstanceView], PolicyConfig], InstanceView]] = {
    "fewest-requests": _fewest_requests,
    "last": _last,
}
# The names config validation and the CLIs accept, in registry order.
DRAIN_VICTIMS: tuple[str, ...] = tuple(DRAIN_VICTIM_REGISTRY)


@dataclass(frozen=True, slots=True)
class ManualScalePlan:
    """What a manual scale target asks for now: start ``start`` instances, drain ``drain``."""

    start: int = 0
    drain: tuple[str, ...] = ()


def plan_manual_scale(
    snapshot: ClusterSnapshot, registered: Mapping[str, InstanceState | None], starting: Collection[str], target: int
) -> ManualScalePlan:
    """``llmctl scale``'s target, converged one pass at a time. ``registered``: every registered instance and its
    state as the leader knows it (a drain order it sent wins over the last report; None before the first report);
    ``starting``: the ids the provider is starting. Every instance is counted exactly once: a registered one not
    draining is active, also before its first load report (active with unknown load), and an id both starting and
    registered counts as registered (the provider hears of a registration after the registry watch).

    Starts the instances missing (counting those starting), or drains the surplus among the active ones, those with
    the fewest requests first (cheapest to empty; an instance with no view yet counts as empty), ties by id. Unlike
    the automatic scaler's candidate, an instance mid-migration is not skipped: the operator's target is met at once."""
    active = [iid for iid, state in registered.items() if state != InstanceState.DRAINING]
    missing = target - len(active) - len(set(starting).difference(registered))
    if missing > 0:
        return ManualScalePlan(start=missing)
    surplus = len(active) - target
    if surplus <= 0:
        return ManualScalePlan()

    def load(instance_id: str) -> tuple[int, str]:
        view = snapshot.get(instance_id)
        return (0 if view is None else view.num_requests, instance_id)

    return ManualScalePlan(drain=tuple(sorted(active, key=load)[:surplus]))


def count_starting(snapshot: ClusterSnapshot, registered: Collection[str], starting: Collection[str]) -> int:
    """``decide_scaling``'s ``starting_count``: the instances not in the snapshot that will count soon, each once:
    those the provider starts (or that vanished in a blip and may come back) and those registered that have not
    reported their load yet. Without the latter, an instance between its registration and its first report would
    count nowhere, and the scaler would start another in its place."""
    return len({iid for iid in (*registered, *starting) if iid not in snapshot})


def _instances_to_reach(views: tuple[InstanceView, ...], config: PolicyConfig, target: float) -> int:
    """Smallest n ≥ 1 with (num + n·M̄) / den ≥ target, M̄ the mean size of the active instances: what n empty new
    instances would lift the average to. A cancelled drain is counted as one such instance."""
    sizes = [v.total_blocks for v in views if v.state == InstanceState.ACTIVE and v.total_blocks > 0]
    if not sizes:
        sizes = [v.total_blocks for v in views if v.total_blocks > 0]
    num, den = cluster_load(views, config)
    if not sizes or den == 0:
        return 1
    mean = sum(sizes) / len(sizes)
    return max(1, math.ceil((target * den - num) / mean))


def _id_order(instance_id: str) -> tuple[str, int, str]:
    """Natural order of ids such as ``i2`` < ``i10`` (the last-started instance of a numbered cluster comes last)."""
    head = instance_id.rstrip("0123456789")
    tail = instance_id[len(head) :]
    return (head, int(tail) if tail else -1, instance_id)
