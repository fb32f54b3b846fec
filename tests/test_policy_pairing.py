"""Migration pairing against a hand-computed cluster, plus properties over random snapshots."""

from __future__ import annotations

from hypothesis import given

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.freeness import migration_freeness
from pyllumnix.control_plane.policy.pairing import MigrateOrder, pair_instances
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.infra.vocabulary import InstanceState
from tests.test_policy_helpers import snapshots, view

CFG = PolicyConfig()  # threshold 3, de-frag


def cluster() -> ClusterSnapshot:
    return ClusterSnapshot.of(
        [
            view(
                "s1", free_blocks=20, num_running=10, num_waiting=1, head_of_line_demand_blocks=50
            ),  # (20-50)/11 = -2.7
            view("s2", free_blocks=40, num_running=20),  # 40/20 = 2 < 3
            # F = (500-10)/(5+1) = 81.7, but it has a preempted request → source.
            view("s3", free_blocks=500, num_running=5, num_waiting=1, num_preempted=1, head_of_line_demand_blocks=10),
            view("x", state=InstanceState.DRAINING, free_blocks=900, num_running=2),  # -inf
            view("d1", free_blocks=800, num_running=4),  # 200
            view("d2"),  # empty: +inf
            view("d3", free_blocks=300, num_running=10, migrating_in=True),  # 30, but already receiving
            view("d4", state=InstanceState.CORDONED, free_blocks=600, num_running=3),  # 200, but cordoned
            view("m", free_blocks=30, num_running=10),  # exactly 3: neither side
            view("busy", free_blocks=0, num_running=10, migrating_out=True),  # 0, but already sending
            view("empty-drain", state=InstanceState.DRAINING),  # nothing left to move
        ]
    )


def test_defrag_pairs_most_loaded_with_least_loaded() -> None:
    # Sources by F: x (-inf), s1 (-2.7), s2 (2), s3 (81.7); destinations by F: d2 (+inf), d1 (200).
    assert pair_instances(cluster(), CFG) == [
        MigrateOrder("x", "d2", Selection.SR, 1000),
        MigrateOrder("s1", "d1", Selection.SR, 800),
    ]


def test_an_avoided_instance_is_no_destination_and_the_next_freest_takes_its_place() -> None:
    """The scheduler's back-off of a destination that refused: the most loaded source goes to the next freest."""
    assert pair_instances(cluster(), CFG, avoid={"d2"}) == [MigrateOrder("x", "d1", Selection.SR, 800)]
    assert pair_instances(cluster(), CFG, avoid={"d1", "d2"}) == []
    assert pair_instances(cluster(), CFG, avoid={"s1"}) == pair_instances(cluster(), CFG), "a source stays a source"


def test_without_defrag_the_queue_does_not_count() -> None:
    # s1 becomes 20/10 = 2 (still a source); s3 (500/5 = 100) is a source only through its preemption.
    cfg = PolicyConfig(enable_defrag=False, selection=Selection.LCR)
    orders = pair_instances(cluster(), cfg)
    assert [(o.source, o.destination) for o in orders] == [("x", "d2"), ("s1", "d1")]
    assert {o.selection for o in orders} == {Selection.LCR}


def test_no_migration_under_infaas_or_when_disabled() -> None:
    assert pair_instances(cluster(), PolicyConfig(dispatch_policy="infaas++")) == []
    assert pair_instances(cluster(), PolicyConfig(enable_migration=False)) == []


def test_balanced_keeps_only_pairs_that_narrow_the_gap() -> None:
    snap = ClusterSnapshot.of(
        [
            view("s", free_blocks=10, num_running=10),  # 10/10 = 1; a request holds 990/10 = 99 blocks
            view("d", free_blocks=40, num_running=10),  # 40/10 = 4 > 3
            view("t", free_blocks=5, num_running=5),  # 1
            view("e"),  # empty
        ]
    )
    # Sources s, t (F 1, ties by id); destinations e (+inf), d (4).
    assert [(o.source, o.destination) for o in pair_instances(snap, CFG)] == [("s", "e"), ("t", "d")]
    # Balanced: s → e: e after (1000-99)/1 = 901 ≥ 3 and ≥ s after (10+99)/9 = 12.1: kept.
    # t → d: t's request is 995/5 = 199 blocks; d after (40-199)/11 < 3: dropped.
    balanced = PolicyConfig(pairing_policy="balanced")
    assert [(o.source, o.destination) for o in pair_instances(snap, balanced)] == [("s", "e")]


@given(snapshots())
def test_pairing_invariants(snap: ClusterSnapshot) -> None:
    for cfg in (CFG, PolicyConfig(pairing_policy="balanced"), PolicyConfig(enable_defrag=False)):
        orders = pair_instances(snap, cfg)
        used = [o.source for o in orders] + [o.destination for o in orders]
        assert len(used) == len(set(used)), "an instance is used twice in one round"
        for o in orders:
            assert o.source != o.destination
            src, dst = snap.get(o.source), snap.get(o.destination)
            assert src is not None and dst is not None
            assert not src.migrating_out and not dst.migrating_in
            assert dst.accepts_requests and dst.num_preempted == 0
            assert src.healthy and src.state != InstanceState.STARTING
            assert migration_freeness(dst, cfg) > cfg.migrate_out_threshold
            assert (
                migration_freeness(src, cfg) < cfg.migrate_out_threshold
                or src.num_preempted > 0
                or src.state == InstanceState.DRAINING
            )
