"""``llmctl scale``'s choice, now in the pure policy core (``scaling.plan_manual_scale``; the leader's scaling loop
only gathers the registered instances' states and carries the plan out): how many instances to start, which ones to
drain. Every instance counts exactly once: registered (active or draining; a registered one with no load report yet
is active with unknown load) or starting (started, not registered yet); ``count_starting`` is the same rule for the
automatic scaler, whose snapshot holds only the instances that reported."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.scaling import ManualScalePlan, count_starting, plan_manual_scale
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.infra.vocabulary import InstanceState
from tests.test_policy_helpers import view

# Requests held per instance (running + waiting + dispatched since the report count alike).
SNAP = ClusterSnapshot.of(
    [
        view("i1", num_running=5),
        view("i2", num_running=1, num_waiting=1),
        view("i3", num_running=2),
        view("i10"),
        view("i4", dispatched_since_report=1),
        view("mig", num_running=0, migrating_out=True),
    ]
)
A, D = InstanceState.ACTIVE, InstanceState.DRAINING


def active(*ids: str) -> dict[str, InstanceState | None]:
    return dict.fromkeys(ids, A)


@pytest.mark.parametrize(
    ("registered", "starting", "target", "plan"),
    [
        # At the target, or at it counting the instances already starting: nothing.
        (active("i1", "i2", "i3"), [], 3, ManualScalePlan()),
        (active("i1", "i2"), ["s1"], 3, ManualScalePlan()),
        # Below: start what is missing, net of those starting.
        (active("i1"), [], 3, ManualScalePlan(start=2)),
        (active("i1"), ["s1"], 4, ManualScalePlan(start=2)),
        ({}, [], 2, ManualScalePlan(start=2)),
        # Above: drain the surplus, fewest requests first (i10: 0, i4: 1 dispatched, i3 and i2: 2, i1: 5).
        (active("i1", "i2", "i3", "i10", "i4"), [], 4, ManualScalePlan(drain=("i10",))),
        (active("i1", "i2", "i3", "i10", "i4"), [], 2, ManualScalePlan(drain=("i10", "i4", "i2"))),  # i2 < i3: by id
        (active("i1", "i2", "i3"), [], 0, ManualScalePlan(drain=("i2", "i3", "i1"))),
        # Instances starting do not stop a drain of the surplus among the active ones.
        (active("i1", "i2", "i3"), ["s1", "s2"], 2, ManualScalePlan(drain=("i2",))),
        # Unlike the automatic scaler's candidate, one mid-migration is not skipped.
        (active("i1", "mig"), [], 1, ManualScalePlan(drain=("mig",))),
        # Registered, no load report yet (state None): active with unknown load. It counts toward the target (the
        # host-loss test's over-start: it counted neither as starting nor as active, so a third one started) ...
        ({"i1": A, "new": None}, [], 2, ManualScalePlan()),
        ({"i1": A, "new": None}, ["s1"], 3, ManualScalePlan()),
        ({"new": None, "new2": None}, [], 2, ManualScalePlan()),
        # ... and, holding no request we know of, it is the cheapest to drain.
        ({"i1": A, "new": None}, [], 1, ManualScalePlan(drain=("new",))),
        # An id the provider still lists as starting but already registered counts once (as registered).
        ({"i1": A, "new": None}, ["new"], 2, ManualScalePlan()),
        ({"i1": A, "new": None}, ["new", "s1"], 3, ManualScalePlan()),
        # Draining ones (reported, or ordered and not confirmed yet) count for neither side: not drained twice.
        ({"i1": A, "i2": D, "i3": A}, [], 2, ManualScalePlan()),
        ({"i1": A, "i2": D, "i3": A}, [], 1, ManualScalePlan(drain=("i3",))),
        ({"i1": A, "i2": D}, [], 2, ManualScalePlan(start=1)),
        ({"i1": A, "new": D}, [], 1, ManualScalePlan()),
        # Any other state (cordoned, unspecified) is registered and not draining: active.
        ({"i1": InstanceState.CORDONED, "i2": InstanceState.UNSPECIFIED}, [], 2, ManualScalePlan()),
    ],
)
def test_plan_manual_scale(
    registered: dict[str, InstanceState | None], starting: list[str], target: int, plan: ManualScalePlan
) -> None:
    assert plan_manual_scale(SNAP, registered, starting, target) == plan


def test_the_order_of_the_ids_does_not_matter() -> None:
    ids = ["i1", "i2", "i3", "i10", "i4"]
    assert plan_manual_scale(SNAP, active(*ids), [], 2) == plan_manual_scale(SNAP, active(*reversed(ids)), [], 2)
    assert plan_manual_scale(SNAP, active(*ids), {"s1", "s2"}, 9) == plan_manual_scale(
        SNAP, active(*ids), ["s2", "s1"], 9
    )


@pytest.mark.parametrize(
    ("registered", "starting", "count"),
    [
        # Every registered instance reported: only the provider's count.
        (["i1", "i2"], [], 0),
        (["i1", "i2"], ["s1", "s2"], 2),
        # Registered without a report yet (not in the snapshot): starting, until its first report.
        (["i1", "new"], [], 1),
        (["i1", "new"], ["s1"], 2),
        # Listed by the provider and registered (the provider hears late), or listed twice: once.
        (["i1", "new"], ["new"], 1),
        (["i1"], ["s1", "s1"], 1),
        # One in the snapshot is counted there, never here (a vanished instance is out of the registry and snapshot).
        (["i1"], ["i1"], 0),
        ([], [], 0),
    ],
)
def test_count_starting(registered: list[str], starting: list[str], count: int) -> None:
    assert count_starting(SNAP, registered, starting) == count
