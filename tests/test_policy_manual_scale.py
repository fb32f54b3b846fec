"""``llmctl scale``'s choice, now in the pure policy core (``scaling.plan_manual_scale``; the leader's scaling loop
only gathers the active instances and carries the plan out): how many instances to start, which ones to drain."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.scaling import ManualScalePlan, plan_manual_scale
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
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


@pytest.mark.parametrize(
    ("active", "starting", "target", "plan"),
    [
        # At the target, or at it counting the instances already starting: nothing.
        (["i1", "i2", "i3"], 0, 3, ManualScalePlan()),
        (["i1", "i2"], 1, 3, ManualScalePlan()),
        # Below: start what is missing, net of those starting.
        (["i1"], 0, 3, ManualScalePlan(start=2)),
        (["i1"], 1, 4, ManualScalePlan(start=2)),
        ([], 0, 2, ManualScalePlan(start=2)),
        # Above: drain the surplus, fewest requests first (i10: 0, i4: 1 dispatched, i3 and i2: 2, i1: 5).
        (["i1", "i2", "i3", "i10", "i4"], 0, 4, ManualScalePlan(drain=("i10",))),
        (["i1", "i2", "i3", "i10", "i4"], 0, 2, ManualScalePlan(drain=("i10", "i4", "i2"))),  # i2 before i3: by id
        (["i1", "i2", "i3"], 0, 0, ManualScalePlan(drain=("i2", "i3", "i1"))),
        # Instances starting do not stop a drain of the surplus among the active ones.
        (["i1", "i2", "i3"], 2, 2, ManualScalePlan(drain=("i2",))),
        # An active instance without a view yet (registered, no load report) counts as empty: drained first.
        (["i1", "new"], 0, 1, ManualScalePlan(drain=("new",))),
        # Unlike the automatic scaler's candidate, one mid-migration is not skipped.
        (["i1", "mig"], 0, 1, ManualScalePlan(drain=("mig",))),
    ],
)
def test_plan_manual_scale(active: list[str], starting: int, target: int, plan: ManualScalePlan) -> None:
    assert plan_manual_scale(SNAP, active, starting, target) == plan


def test_the_order_of_the_active_ids_does_not_matter() -> None:
    ids = ["i1", "i2", "i3", "i10", "i4"]
    assert plan_manual_scale(SNAP, ids, 0, 2) == plan_manual_scale(SNAP, list(reversed(ids)), 0, 2)
    assert plan_manual_scale(SNAP, set(ids), 0, 2) == plan_manual_scale(SNAP, ids, 0, 2)
