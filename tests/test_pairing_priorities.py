"""Pairing never spends a destination on a source with nothing it may move.

High-priority requests never migrate (``select_request`` skips them), and an instance holding high-priority work
carries the high headroom (all but 100 blocks) in its freeness, so it sits at the head of the sources every round.
Paired while it holds only high-priority requests, it took the freest destination and moved nothing, and an
overloaded normal instance behind it went unpaired (in the simulator at S-S 40 req/s with 10 % high priority, ~2 such
instances took the two freest destinations every 100 ms round)."""

from __future__ import annotations

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.pairing import MigrateOrder, pair_instances
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from tests.test_policy_helpers import view

CFG = PolicyConfig()  # threshold 3, de-frag, high headroom = total - 100


def test_an_instance_holding_only_high_priority_requests_is_no_source() -> None:
    snap = ClusterSnapshot.of(
        [
            # 600 free, 5 high requests running: (600 - 900)/5 = -60, the most loaded by far, but nothing movable.
            view("high", free_blocks=600, num_running=5, num_running_high=5, running_high_blocks=400),
            view("normal", free_blocks=20, num_running=10),  # 20/10 = 2 < 3: overloaded
            view("dest", free_blocks=900, num_running=2),  # 450
        ]
    )
    assert pair_instances(snap, CFG) == [MigrateOrder("normal", "dest", Selection.SR, 900)]


def test_an_instance_holding_high_and_normal_requests_stays_a_source() -> None:
    snap = ClusterSnapshot.of(
        [
            view("mixed", free_blocks=600, num_running=6, num_running_high=5, running_high_blocks=350),
            view("dest", free_blocks=900, num_running=2),
        ]
    )
    assert pair_instances(snap, CFG) == [MigrateOrder("mixed", "dest", Selection.SR, 900)]


def test_a_queued_normal_request_behind_high_ones_is_movable() -> None:
    snap = ClusterSnapshot.of(
        [
            view(
                "queued",
                free_blocks=10,
                num_running=3,
                num_running_high=3,
                running_high_blocks=300,
                num_waiting=1,
                head_of_line_demand_blocks=40,
            ),
            view("dest", free_blocks=900, num_running=2),
        ]
    )
    assert pair_instances(snap, CFG) == [MigrateOrder("queued", "dest", Selection.SR, 900)]
