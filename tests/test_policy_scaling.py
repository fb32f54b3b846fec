"""Auto-scaling decisions against hand-computed clusters, plus min/max properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.scaling import ScalingDecision, decide_scaling
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.infra.vocabulary import InstanceState
from tests.test_policy_helpers import snapshots, view

CFG = PolicyConfig(enable_scaling=True)  # up 10, down 60, min 1, max 16


def test_scale_up_by_enough_instances() -> None:
    light = ClusterSnapshot.of([view(i, free_blocks=50, num_running=10) for i in "ab"])
    # F = (50+50)/20 = 5 < 10; (100 + n·1000)/20 ≥ 10 → n ≥ 0.1 → 1.
    d = decide_scaling(light, CFG)
    assert (d.start, d.cluster_freeness) == (1, 5.0)
    heavy = ClusterSnapshot.of(
        [view(i, free_blocks=0, num_running=50, num_waiting=5, waiting_demand_blocks=100) for i in "ab"]
    )
    # F = (0-200)/110 < 10; (-200 + 1000n)/110 ≥ 10 → n ≥ 1.3 → 2.
    assert decide_scaling(heavy, CFG).start == 2
    # One already starting (outside the snapshot, or as a STARTING view) counts toward the 2.
    assert decide_scaling(heavy, CFG, starting_count=1).start == 1
    starting = heavy.updated([view("c", state=InstanceState.STARTING, total_blocks=0)])
    assert decide_scaling(starting, CFG).start == 1
    # Capped by max: 2 running, max 3 → 1.
    assert decide_scaling(heavy, PolicyConfig(enable_scaling=True, max_instances=3)).start == 1
    # A drain in progress is cancelled before anything new starts.
    draining = heavy.updated([view("z", state=InstanceState.DRAINING)])
    assert decide_scaling(draining, CFG) == ScalingDecision(start=1, cancel_drain=("z",), cluster_freeness=-200 / 110)


def test_scale_down_one_when_the_rest_stays_free() -> None:
    snap = ClusterSnapshot.of(
        [view("a", free_blocks=900, num_running=2), view("b", free_blocks=950, num_running=1), view("c")]
    )
    # F = (900+950+1000)/3 = 950 > 60. Candidate: fewest requests → c. Without c: (900+950)/3 = 617 > 60.
    d = decide_scaling(snap, CFG)
    assert d.drain == ("c",) and d.start == 0
    # Floored by min.
    assert decide_scaling(snap, PolicyConfig(enable_scaling=True, min_instances=3)).is_noop
    # Not while another drain is in progress or instances are starting.
    assert decide_scaling(snap.updated([view("z", state=InstanceState.DRAINING)]), CFG).is_noop
    assert decide_scaling(snap, CFG, starting_count=1).is_noop


def test_no_scale_down_when_removal_would_cross_the_threshold() -> None:
    snap = ClusterSnapshot.of(
        [view("a", free_blocks=200, num_running=10), view("b", free_blocks=200, num_running=10), view("c")]
    )
    # F = (200+200+1000)/20 = 70 > 60, but without c (200+200)/20 = 20 ≤ 60: keep it.
    d = decide_scaling(snap, CFG)
    assert d.is_noop and d.cluster_freeness == 70


def test_min_and_max_are_enforced_and_disabled_does_nothing() -> None:
    one = ClusterSnapshot.of([view("a")])
    assert decide_scaling(one, PolicyConfig(enable_scaling=True, min_instances=3)).start == 2
    assert decide_scaling(ClusterSnapshot.of([]), CFG).start == 1
    many = ClusterSnapshot.of([view(f"i{k}", num_running=1, free_blocks=990) for k in range(4)])
    d = decide_scaling(many, PolicyConfig(enable_scaling=True, max_instances=3, min_instances=1))
    assert d.drain == ("i0",)
    assert decide_scaling(one, PolicyConfig()).is_noop


@given(snapshots(max_size=12), st.integers(0, 3), st.integers(1, 6), st.integers(0, 10), st.floats(0, 100))
def test_decisions_stay_within_min_and_max(
    snap: ClusterSnapshot, starting: int, lo: int, extra: int, up: float
) -> None:
    cfg = PolicyConfig(
        enable_scaling=True,
        min_instances=lo,
        max_instances=lo + extra,
        scale_up_threshold=up,
        scale_down_threshold=up + 50,
    )
    d = decide_scaling(snap, cfg, starting_count=starting)
    current = sum(1 for v in snap if v.state != InstanceState.DRAINING) + starting
    assert d.start >= 0
    assert not (d.start or d.cancel_drain) or not d.drain, "never grow and shrink at once"
    if d.start or d.cancel_drain:
        assert current + d.start + len(d.cancel_drain) <= cfg.max_instances
    if d.drain:
        assert len(d.drain) == 1
        assert current - 1 >= cfg.min_instances
        victim = snap.get(d.drain[0])
        assert victim is not None and victim.state == InstanceState.ACTIVE
    for i in d.cancel_drain:
        v = snap.get(i)
        assert v is not None and v.state == InstanceState.DRAINING


def test_drain_victim_last_is_the_highest_numbered_instance() -> None:
    """The artifact drains the last instance; ids compare naturally (i10 after i9). The default stays the cheapest
    to empty (fewest requests)."""
    snap = ClusterSnapshot.of(
        [
            view("i2"),
            view("i9", free_blocks=990, num_running=1),
            view("i10", free_blocks=900, num_running=3),
            view("i11", state=InstanceState.DRAINING),  # not a candidate: already draining... and blocks the drain
        ]
    )
    last = PolicyConfig(enable_scaling=True, drain_victim="last")
    assert decide_scaling(snap, last).is_noop  # one drain at a time
    snap = snap.without(["i11"])
    assert decide_scaling(snap, last).drain == ("i10",)
    assert decide_scaling(snap, CFG).drain == ("i2",)


MIN2 = PolicyConfig(enable_scaling=True, min_instances=2, scale_up_threshold=10, scale_down_threshold=60)


def _light(iid: str) -> object:
    return view(iid, free_blocks=990, num_running=1, running_blocks=10)


def test_a_silent_or_cordoned_instance_is_no_capacity_for_the_minimum() -> None:
    """REVIEW17-6: with one of them counted, a light cluster at min 2 drained a healthy instance, leaving one serving
    (for as long as the silent one kept its lease)."""
    silent = view("c", healthy=False, num_running=3, free_blocks=500, running_blocks=500)
    cordoned = view("c", state=InstanceState.CORDONED)
    for third in (silent, cordoned):
        snap = ClusterSnapshot.of([_light("a"), _light("b"), third])  # type: ignore[list-item]
        assert decide_scaling(snap, MIN2).drain == (), third
    # one serving instance and a silent one: the minimum starts a second
    snap = ClusterSnapshot.of([_light("a"), silent])  # type: ignore[list-item]
    assert decide_scaling(snap, MIN2).start == 1


def test_scale_up_never_undrains_a_silent_instance() -> None:
    snap = ClusterSnapshot.of(
        [
            view("a", num_running=50, free_blocks=100, running_blocks=900),
            view("b", state=InstanceState.DRAINING, healthy=False, num_running=5, free_blocks=0, running_blocks=1000),
        ]
    )
    d = decide_scaling(snap, MIN2)
    assert d.cancel_drain == () and d.start >= 1


def test_only_cancellable_drains_are_cancelled() -> None:
    """REVIEW17-4: an operator's drain (not in ``cancellable``) stays; a replacement starts instead."""
    snap = ClusterSnapshot.of([_light("a"), view("b", state=InstanceState.DRAINING, num_running=1)])  # type: ignore[list-item]
    assert decide_scaling(snap, MIN2) == ScalingDecision(
        cancel_drain=("b",), cluster_freeness=decide_scaling(snap, MIN2).cluster_freeness
    )
    d = decide_scaling(snap, MIN2, cancellable=())
    assert (d.start, d.cancel_drain) == (1, ())
    assert decide_scaling(snap, MIN2, cancellable={"b"}).cancel_drain == ("b",)


def test_the_fewest_requests_victim_is_not_one_holding_high_priority_work() -> None:
    """REVIEW17-8: high-priority requests never migrate, so draining their instance lasts as long as they run (and
    blocks every other scale-down meanwhile); the instance with one high-priority request was the victim."""
    cfg = PolicyConfig(enable_scaling=True, min_instances=1, scale_up_threshold=10, scale_down_threshold=60)
    snap = ClusterSnapshot.of(
        [
            view("a", num_running=1, num_running_high=1, running_high_blocks=20, running_blocks=20, free_blocks=980),
            view("b", num_running=3, free_blocks=970, running_blocks=30),
            view("c", num_running=3, free_blocks=970, running_blocks=30),
        ]
    )
    assert decide_scaling(snap, cfg).drain == ("b",)
