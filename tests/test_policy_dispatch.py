"""Dispatch policies against hand-computed cases, plus properties over random snapshots."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch import DISPATCH_REGISTRY, make_dispatch_policy
from pyllumnix.control_plane.policy.dispatch.round_robin import RoundRobinDispatch
from pyllumnix.control_plane.policy.freeness import dispatch_freeness
from pyllumnix.control_plane.policy.pairing import migration_active
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.infra.vocabulary import InstanceState, Priority
from tests.test_policy_helpers import instance_views, snapshots, view

NORMAL = DispatchRequestView("n", Priority.NORMAL, num_prompt_tokens=32)
HIGH = DispatchRequestView("h", Priority.HIGH, num_prompt_tokens=32)  # 2 blocks of 16


def cluster(*extra: object) -> ClusterSnapshot:
    return ClusterSnapshot.of(
        [
            view("a", free_blocks=600, num_running=4),  # F = 600/4 = 150
            view("b", free_blocks=900, num_running=3, num_waiting=1, waiting_demand_blocks=60),  # (900-60)/4 = 210
            view("c", free_blocks=950, num_running=1, num_running_high=1),  # holds high: (950 - H)/1
            view("d", state=InstanceState.DRAINING),  # empty but draining
            view("e", state=InstanceState.CORDONED),
            view("f", healthy=False),
            view("g", state=InstanceState.STARTING),
            *extra,  # type: ignore[list-item]
        ]
    )


def choose(policy: str, snap: ClusterSnapshot, req: DispatchRequestView, **cfg: object) -> str | None:
    return make_dispatch_policy(policy, PolicyConfig(dispatch_policy=policy, **cfg)).choose(snap, req)  # type: ignore[arg-type]


def test_llumnix_highest_freeness() -> None:
    # H = 1000 - 100: c = (950-900)/1 = 50 and holds high anyway; b (210) beats a (150).
    assert choose("llumnix", cluster(), NORMAL) == "b"
    # An empty ACTIVE instance is +inf.
    assert choose("llumnix", cluster(view("h")), NORMAL) == "h"


def test_llumnix_priority_aware() -> None:
    # H = 500. Normal: c holds high work and is charged the headroom, (950-500)/1 = 450, still the freest: the
    # ranking is soft (the artifact's), so c takes it; with the default H = 900, c = 50 and b (210) wins.
    assert choose("llumnix", cluster(), NORMAL, high_headroom_blocks=500) == "c"
    assert choose("llumnix", cluster(), NORMAL) == "b"
    # High: c already holds high work, so it is not charged the headroom again: 950/1 = 950; a (600-500)/4 = 25,
    # b (840-500)/4 = 85 → c.
    assert choose("llumnix", cluster(), HIGH, high_headroom_blocks=500) == "c"
    # Default H = total - 100 = 900: a (600-900) and b (840-900) have no room for the headroom; c (not charged) → c.
    assert choose("llumnix", cluster(), HIGH) == "c"
    # If only high-holding instances can take work, a normal request still goes there.
    only_c = ClusterSnapshot.of(
        [view("c", free_blocks=950, num_running=1, num_running_high=1), view("d", healthy=False)]
    )
    assert choose("llumnix", only_c, NORMAL) == "c"


def test_high_priority_requests_concentrate_and_normal_ones_keep_away() -> None:
    """The artifact's behaviour: with the headroom relative to capacity (total - 100), high-priority requests gather
    on the instance(s) already holding high-priority work, even when that instance is busier, while normal requests
    avoid it. Before, every instance was charged the headroom for a high request, so they spread: the freest won."""
    snap = ClusterSnapshot.of(
        [
            view("a", free_blocks=500, num_running=6, num_running_high=2),  # busy, holds high
            view("b", free_blocks=900, num_running=2),  # much freer, no high work
            view("c", free_blocks=950, num_running=1),
        ]
    )
    policy = make_dispatch_policy("llumnix", PolicyConfig())
    placed = []
    for i in range(4):
        req = DispatchRequestView(f"h{i}", Priority.HIGH, num_prompt_tokens=64)
        chosen = policy.choose(snap, req)
        assert chosen is not None
        placed.append(chosen)
        snap = snap.record_dispatch(chosen, req.demand_blocks(16), req.priority)
    assert placed == ["a"] * 4
    assert policy.choose(snap, NORMAL) == "c"
    # With no high-priority work anywhere, the first one goes to the freest instance and the next follow it.
    fresh = ClusterSnapshot.of([view("a", free_blocks=500, num_running=6), view("b", free_blocks=900, num_running=2)])
    first = policy.choose(fresh, HIGH)
    assert first == "b"
    fresh = fresh.record_dispatch("b", 2, Priority.HIGH)
    assert policy.choose(fresh, HIGH) == "b"


def test_infaas_pp_is_llumnix_dispatch_without_migration() -> None:
    """The artifact's INFaaS++: Llumnix's load-based dispatch, migration off. Before, it dispatched on the free-memory
    fraction and picked c here (950/1000), though c holds high-priority work and a normal request avoids it."""
    assert choose("infaas++", cluster(), NORMAL) == "b" == choose("llumnix", cluster(), NORMAL)
    # load, not memory: x has more free memory but 10 requests ((900)/10 = 90), y less but 2 ((500)/2 = 250)
    snap = ClusterSnapshot.of([view("x", free_blocks=900, num_running=10), view("y", free_blocks=500, num_running=2)])
    assert choose("infaas++", snap, NORMAL) == "y"
    assert choose("infaas-mem", snap, NORMAL) == "x"
    assert not migration_active(PolicyConfig(dispatch_policy="infaas++"))
    assert not migration_active(PolicyConfig(dispatch_policy="infaas-mem"))


def test_infaas_mem_least_memory_load() -> None:
    # Free fraction after waiting demand: a 600/1000, b (900-60)/1000, c 950/1000 → c (not priority-aware).
    assert choose("infaas-mem", cluster(), NORMAL) == "c"


def test_balanced_fewest_requests_ties_by_id() -> None:
    # Requests: a 4, b 4, c 1 → c; then with c at 4 as well, a wins the tie by id.
    assert choose("balanced", cluster(), NORMAL) == "c"
    snap = cluster().record_dispatch("c", 2).record_dispatch("c", 2).record_dispatch("c", 2)
    assert choose("balanced", snap, NORMAL) == "a"


def test_round_robin_cycles_in_id_order_and_survives_membership_changes() -> None:
    rr = RoundRobinDispatch(PolicyConfig(dispatch_policy="round-robin"), random.Random(0))
    snap = cluster()
    rr.cursor = "a"
    assert [rr.choose(snap, NORMAL) for _ in range(4)] == ["b", "c", "a", "b"]
    # b leaves: the cursor is an id, so the next one after "b" is still "c".
    assert rr.choose(snap.without(["b"]), NORMAL) == "c"
    rr.cursor = "zzz"
    assert rr.choose(snap, NORMAL) == "a"


def test_dispatch_sees_its_own_recent_decisions() -> None:
    """Between two load reports, recorded dispatches spread requests instead of herding on one instance."""
    snap = ClusterSnapshot.of([view("a"), view("b"), view("c")])
    policy = make_dispatch_policy("llumnix", PolicyConfig())
    seen = []
    for _ in range(3):
        chosen = policy.choose(snap, NORMAL)
        assert chosen is not None
        seen.append(chosen)
        snap = snap.record_dispatch(chosen, NORMAL.demand_blocks(16))
    assert seen == ["a", "b", "c"]


@pytest.mark.parametrize("policy", sorted(DISPATCH_REGISTRY))
def test_none_when_nothing_can_take_requests(policy: str) -> None:
    snap = ClusterSnapshot.of([view("d", state=InstanceState.DRAINING), view("f", healthy=False)])
    assert choose(policy, snap, NORMAL) is None
    assert choose(policy, ClusterSnapshot.of([]), NORMAL) is None


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown dispatch policy 'nope'"):
        make_dispatch_policy("nope", PolicyConfig())


@given(snapshots(), st.sampled_from(sorted(DISPATCH_REGISTRY)), st.sampled_from([NORMAL, HIGH]), st.integers(0, 9))
def test_never_picks_an_instance_that_cannot_take_requests(
    snap: ClusterSnapshot, policy: str, req: DispatchRequestView, seed: int
) -> None:
    p = make_dispatch_policy(policy, PolicyConfig(dispatch_policy=policy), random.Random(seed))
    for _ in range(3):
        chosen = p.choose(snap, req)
        eligible = [v for v in snap if v.state == InstanceState.ACTIVE and v.healthy]
        if not eligible:
            assert chosen is None
            return
        v = snap.get(chosen) if chosen is not None else None
        assert v is not None and v.accepts_requests
        snap = snap.record_dispatch(v.instance_id, req.demand_blocks(v.block_size), req.priority)


@given(snapshots())
def test_llumnix_normal_matches_scalar_reference(snap: ClusterSnapshot) -> None:
    # The ranking alone: the spill (a floor above any instance's size turns it off) has tests of its own
    # (tests/test_dispatch_normal_spill.py); with it on, a best choice that would queue the request goes elsewhere.
    cfg = PolicyConfig(high_headroom_blocks=300, normal_headroom_blocks=10, normal_spill_floor_blocks=1_000_000)
    eligible = [v for v in snap if v.accepts_requests]
    expected = None
    if eligible:
        expected = min(eligible, key=lambda v: (-dispatch_freeness(v, cfg), v.instance_id)).instance_id
    assert make_dispatch_policy("llumnix", cfg).choose(snap, NORMAL) == expected


@given(snapshots(min_size=1), st.data())
def test_llumnix_kept_keys_equal_a_fresh_computation(snap: ClusterSnapshot, data: st.DataObject) -> None:
    """The policy patches its normal-request keys along a chain of derived snapshots (reports, dispatches, a headroom
    change, a branch off an older snapshot); every choice must equal that of a policy computing from scratch."""
    kept = make_dispatch_policy("llumnix", PolicyConfig())
    history = [snap]
    for step in range(12):
        action = data.draw(st.sampled_from(["report", "dispatch", "headroom", "branch"]))
        if action == "report":
            ids = data.draw(st.lists(st.sampled_from(snap.ids), unique=True, max_size=3))
            snap = snap.updated([data.draw(instance_views(i)) for i in ids])
        elif action == "dispatch":
            chosen = kept.choose(snap, NORMAL)
            if chosen is not None:
                snap = snap.record_dispatch(chosen, 2)
        elif action == "headroom":
            kept.config = PolicyConfig(normal_headroom_blocks=data.draw(st.integers(0, 50)))
        else:
            snap = data.draw(st.sampled_from(history))
        history.append(snap)
        fresh = make_dispatch_policy("llumnix", kept.config)
        for req in (NORMAL, HIGH):
            assert kept.choose(snap, req) == fresh.choose(snap, req), (step, action)
