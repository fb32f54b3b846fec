"""Migration pairing (every pairing interval): overloaded sources with underloaded destinations.

Sources: migration freeness below ``migrate_out_threshold``, or preempted requests, or draining (-inf). Destinations:
freeness above the threshold, ACTIVE and healthy, no preempted requests. Sources go most-loaded first, destinations
least-loaded first, and the i-th is paired with the i-th. Instances already migrating (out or in) sit the round out:
one migration at a time per instance and direction.

The pairing policy (``PAIRING_REGISTRY``, by name) then decides which of these pairs to keep: "defrag" keeps every
pair (the paper's), "balanced" only those whose move narrows the freeness gap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.dispatch import DISPATCH_REGISTRY
from pyllumnix.control_plane.policy.freeness import freest_first, migration_freeness, most_loaded_first
from pyllumnix.control_plane.policy.selection import RUNNING_GROWTH_BLOCKS
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import InstanceView
from pyllumnix.infra.vocabulary import InstanceState

_SOURCE_STATES = (InstanceState.ACTIVE, InstanceState.CORDONED, InstanceState.DRAINING)


@dataclass(frozen=True, slots=True)
class MigrateOrder:
    """Tell ``source`` to migrate one request (picked by ``selection``) to ``destination``, one that fits in
    ``max_blocks`` (the destination's room when the order was made; 0: no limit). Without the limit the source picked
    a request the destination refused at pre-allocation, and the same order came back every round."""

    source: str
    destination: str
    selection: Selection
    max_blocks: int = 0


class PairingPolicy(ABC):
    """Which of the matched (source, destination) pairs become migrate orders. Stateless: the class is the policy."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def keeps(cls, src: InstanceView, dst: InstanceView, f_src: float, f_dst: float, config: PolicyConfig) -> bool:
        """``f_src``/``f_dst``: the pair's migration freeness."""


class DefragPairing(PairingPolicy):
    """Every pair (the paper's): moving load off an overloaded instance also de-fragments its memory."""

    name = "defrag"

    @classmethod
    def keeps(cls, src: InstanceView, dst: InstanceView, f_src: float, f_dst: float, config: PolicyConfig) -> bool:
        return True


class BalancedPairing(PairingPolicy):
    """Only pairs whose move narrows the freeness gap (see ``_narrows_gap``)."""

    name = "balanced"

    @classmethod
    def keeps(cls, src: InstanceView, dst: InstanceView, f_src: float, f_dst: float, config: PolicyConfig) -> bool:
        return _narrows_gap(src, dst, f_src, f_dst, config)


PAIRING_REGISTRY: dict[str, type[PairingPolicy]] = {cls.name: cls for cls in (DefragPairing, BalancedPairing)}
# The names config validation and the CLIs accept, in registry order.
PAIRING_POLICIES: tuple[str, ...] = tuple(PAIRING_REGISTRY)


def migration_active(config: PolicyConfig) -> bool:
    """Migration on in the config and allowed by the dispatch policy (the no-migration baselines turn pairing off
    whatever the migration flag says)."""
    policy = DISPATCH_REGISTRY.get(config.dispatch_policy)
    return config.enable_migration and (policy is None or policy.allows_migration)


def pair_instances(
    snapshot: ClusterSnapshot, config: PolicyConfig, avoid: Collection[str] = frozenset()
) -> list[MigrateOrder]:
    """``avoid``: instances taken as no destination this round (the scheduler's back-off of destinations that refused
    its recent orders: one that fails every migration without filling up stays the freest, so the most loaded source,
    e.g. a draining one, was paired with it every round and never tried another)."""
    if not migration_active(config):
        return []
    keeps = PAIRING_REGISTRY[config.pairing_policy].keeps
    threshold = config.migrate_out_threshold
    sources: list[tuple[tuple[bool, float, str], InstanceView, float]] = []
    dests: list[tuple[tuple[float, str], InstanceView, float]] = []
    for v in snapshot.instances:
        if not v.healthy or v.state not in _SOURCE_STATES:
            continue
        f = migration_freeness(v, config)
        if f < threshold or v.num_preempted > 0 or v.state == InstanceState.DRAINING:
            # Only what may move makes a source: high-priority requests never do (select_request skips them).
            if not v.migrating_out and v.num_running + v.num_waiting - v.num_running_high - v.num_waiting_high > 0:
                # An instance holding high-priority work goes after every other source: its freeness carries the
                # headroom, so it would otherwise take the freest destinations first, and in a burst move its
                # spilled normal requests onto the memory the queueing instances need.
                sources.append(((v.holds_high, *most_loaded_first(f, v.instance_id)), v, f))
        elif f > threshold and v.state == InstanceState.ACTIVE and not v.migrating_in and v.instance_id not in avoid:
            dests.append((freest_first(f, v.instance_id), v, f))
    sources.sort(key=lambda t: t[0])
    dests.sort(key=lambda t: t[0])
    # A destination without room takes nothing (every request needs a block): no order, rather than one that moves
    # nothing or is refused.
    orders = [
        MigrateOrder(src.instance_id, dst.instance_id, config.selection, room)
        for (_, src, f_src), (_, dst, f_dst) in zip(sources, dests, strict=False)
        if (room := order_room(dst)) > 0 and keeps(src, dst, f_src, f_dst, config)
    ]
    return orders + _spill_orders(snapshot, config, [v for _, v, _ in sources[len(dests) :]], orders, avoid)


def _spill_orders(
    snapshot: ClusterSnapshot,
    config: PolicyConfig,
    unpaired: list[InstanceView],
    orders: list[MigrateOrder],
    avoid: Collection[str],
) -> list[MigrateOrder]:
    """Pairs the sources left without a destination whose queue is blocked (normal instances only) with instances
    holding high-priority work that have room above ``normal_spill_floor_blocks`` and the watermark (``spill_room``),
    most room first; each moves its head waiting request (FCW: no KV to copy, and it shortens the queue that made it
    a source) where that fits the room, else a running request (the configured selection) where the largest it may
    pick fits, whose blocks go to the blocked head; else it sends nothing (the destination would refuse it).

    The headroom charged in the migration freeness makes such an instance a source and never a destination, so in a
    burst, when no instance is above the threshold, its spare memory stayed idle while the queues elsewhere drained
    (Fig. 13: 1,100-1,600 free blocks on 3 instances while 275-360 normal requests waited). Only a source that holds
    no high-priority work sends there, so a spilled request never moves from one such instance to another; once
    the pressure ends, the instance is a source again and its normal requests leave for the freed destinations."""
    floor = config.normal_spill_floor_blocks
    busy = {o.source for o in orders} | {o.destination for o in orders}
    senders = [v for v in unpaired if not v.holds_high and (v.num_waiting > 0 or v.num_preempted > 0)]
    if not senders:
        return []
    rooms = sorted(
        (-room, v.instance_id)
        for v in snapshot.instances
        if v.holds_high
        and v.accepts_requests
        and not v.migrating_in
        and v.num_preempted == 0
        and v.instance_id not in busy
        and v.instance_id not in avoid
        and (room := spill_room(v, floor)) > 0
    )
    out: list[MigrateOrder] = []
    for src in senders:
        if not rooms:
            break
        # Most room first: a sender that does not fit the largest room fits none, and leaves it to the next sender.
        room = -rooms[0][0]
        if src.num_preempted == 0 and room >= src.head_of_line_demand_blocks:
            # The head itself: FCW picks the earliest arrival, which is the queue head only while nothing was
            # preempted (a preempted request goes back to the front of the queue).
            selection = Selection.FCW
        elif room >= _picked_blocks_bound(src, config.selection):
            # A running request, whose blocks the blocked head then gets.
            selection = config.selection
        else:
            continue
        out.append(MigrateOrder(src.instance_id, rooms.pop(0)[1], selection, room))
    return out


def order_room(v: InstanceView) -> int:
    """The blocks a request migrated onto ``v`` may take (``MigrateOrder.max_blocks``): ``spill_room`` without a
    floor, i.e. free less the waiting demand it would queue behind (a waiting request is refused behind it, and a
    running one would take the blocks that queue needs) less the watermark the destination's reservation keeps."""
    return spill_room(v, 0)


def spill_room(v: InstanceView, floor: int) -> int:
    """Blocks a request spilled onto ``v`` may take: free, less the demand of the waiting requests it may queue behind
    (those reported, and those dispatched there since, which arrive as waiting: the dispatch freeness counts them
    too), less the larger of the spill floor and the watermark the destination's admission checks keep free
    (``data_plane/engine/checks.py``), so an order the destination would refuse is never issued."""
    queued = v.waiting_demand_blocks + v.dispatched_demand_blocks
    return v.free_blocks - queued - max(floor, v.watermark_blocks)


def _picked_blocks_bound(src: InstanceView, selection: Selection) -> int:
    """An upper bound on the destination blocks (``selection.blocks_needed``) of the request
    ``select_request(..., selection)`` takes from a source holding no high-priority work: the view carries only the
    running total, and every running request holds at least one block, so the shortest holds at most the mean and any
    other at most the total less one block per other request, and a running pick needs its growth block on top (the
    source's fit rule counts it: without it, a request of exactly the room was ordered and then refused by the source,
    every round). With nothing running (or FCW), the waiting request it falls back to needs at most the whole waiting
    demand."""
    n = src.num_running_normal
    blocks = src.running_blocks - src.running_high_blocks
    if selection == Selection.FCW or n <= 0:
        return src.waiting_demand_blocks
    if selection == Selection.SR:
        return blocks // n + RUNNING_GROWTH_BLOCKS
    return blocks - (n - 1) + RUNNING_GROWTH_BLOCKS


def _narrows_gap(src: InstanceView, dst: InstanceView, f_src: float, f_dst: float, config: PolicyConfig) -> bool:
    """Estimates moving one average request (its blocks, or the head waiting request's demand when nothing runs):
    keep the pair only if the destination stays at or above the threshold and still at least as free as the source,
    so the move narrows the gap rather than reversing it."""
    if src.num_running > 0:
        blocks = -(-src.running_blocks // src.num_running)
        src_after = src._replace(num_running=src.num_running - 1, free_blocks=src.free_blocks + blocks)
        dst_after = dst._replace(num_running=dst.num_running + 1, free_blocks=dst.free_blocks - blocks)
    else:
        blocks = src.head_of_line_demand_blocks
        src_after = src._replace(num_waiting=src.num_waiting - 1)
        dst_after = dst._replace(
            num_waiting=dst.num_waiting + 1,
            head_of_line_demand_blocks=dst.head_of_line_demand_blocks if dst.num_waiting else blocks,
        )
    f_dst_after = migration_freeness(dst_after, config)
    f_src_after = migration_freeness(src_after, config)
    return f_dst_after >= config.migrate_out_threshold and f_dst_after >= f_src_after and f_dst > f_src
