"""Virtual usage and freeness against hand-computed cases from the paper's definitions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import freeness_of
from pyllumnix.control_plane.policy.freeness import (
    cluster_freeness,
    cluster_load,
    dispatch_freeness,
    freest_first,
    migration_freeness,
    most_loaded_first,
    paper_freeness,
)
from pyllumnix.control_plane.policy.views import RequestView
from pyllumnix.control_plane.policy.virtual_usage import (
    instance_headroom,
    instance_virtual_usage,
    request_virtual_usages,
)
from pyllumnix.infra.vocabulary import InstanceState, Priority, RequestPhase
from tests.test_policy_helpers import instance_views, view

INF = math.inf
DEFAULT = PolicyConfig()  # high headroom total - 100 (900 on these 1,000-block views), normal 0, de-frag on
NO_DEFRAG = PolicyConfig(enable_defrag=False)

# (view kwargs, dispatch F, migration F with de-frag, migration F without de-frag)
CASES = [
    # avail 300, b_all 100, b_first 40, R 10, W 2:
    # dispatch (300-100)/(10+2) = 16.67; de-frag (300-40)/(10+1) = 23.64; plain 300/10 = 30.
    (dict(free_blocks=300, num_running=10, num_waiting=2, head_of_line_demand_blocks=40, waiting_demand_blocks=100),
     200 / 12, 260 / 11, 30.0),
    # Empty instance: +inf in every form.
    (dict(free_blocks=1000), INF, INF, INF),
    # Draining: one fake request of infinite usage: -inf in every form, even when empty.
    (dict(state=InstanceState.DRAINING, free_blocks=1000), -INF, -INF, -INF),
    # One high-priority request among 2 running: headroom 1000 - 100 held. (1000-900)/2 = 50 everywhere.
    (dict(free_blocks=1000, num_running=2, num_running_high=1), 50.0, 50.0, 50.0),
    # Only a queued request: de-frag (500-64)/(0+1) = 436; without de-frag avail/R with R=0 is +inf.
    (dict(free_blocks=500, num_waiting=1, head_of_line_demand_blocks=64, waiting_demand_blocks=64),
     (500 - 64) / 1, 436.0, INF),
    # Two requests dispatched since the report (30 blocks of demand) count as waiting: (500-30)/(4+2) = 78.33.
    (dict(free_blocks=500, num_running=4, dispatched_since_report=2, dispatched_demand_blocks=30),
     470 / 6, 500 / 4, 500 / 4),
    # Over-committed: freeness may be negative. (10-50)/(8+1) = -4.44 with de-frag; dispatch (10-90)/(8+2) = -8.
    (dict(free_blocks=10, num_running=8, num_waiting=2, head_of_line_demand_blocks=50, waiting_demand_blocks=90),
     -8.0, -40 / 9, 10 / 8),
]  # fmt: skip


@pytest.mark.parametrize(("kw", "f_dispatch", "f_defrag", "f_plain"), CASES)
def test_freeness_forms(kw: dict[str, object], f_dispatch: float, f_defrag: float, f_plain: float) -> None:
    v = view("a", **kw)
    assert dispatch_freeness(v, DEFAULT) == pytest.approx(f_dispatch)
    assert migration_freeness(v, DEFAULT) == pytest.approx(f_defrag)
    assert migration_freeness(v, NO_DEFRAG) == pytest.approx(f_plain)


def test_request_virtual_usage_per_paper() -> None:
    cfg = PolicyConfig(normal_headroom_blocks=100, high_headroom_blocks=1200)
    reqs = [
        RequestView("r1", RequestPhase.RUNNING, Priority.NORMAL, num_blocks=10, arrival_time=0.0),
        RequestView("r2", RequestPhase.RUNNING, Priority.HIGH, num_blocks=20, arrival_time=0.5),
        RequestView("r3", RequestPhase.WAITING, Priority.HIGH, demand_blocks=8, arrival_time=1.0),
        RequestView("r4", RequestPhase.WAITING, Priority.NORMAL, demand_blocks=5, arrival_time=2.0),
        RequestView("r5", RequestPhase.FINISHED, Priority.NORMAL, num_blocks=3, arrival_time=0.1),
    ]
    u = request_virtual_usages(reqs, cfg, total_blocks=2000)
    # Two normal (r1, r4) share 100; two high (r2, r3) share 1200.
    assert u == {
        "r1": 10 + 100 / 2,  # running: blocks + headroom share = 60
        "r2": 20 + 1200 / 2,  # 620
        "r3": 8 + 1200 / 2,  # head-of-line queued: full demand + share = 608
        "r4": 0 + 100 / 2,  # other queued: no demand, share only = 50
    }
    # Σ = physical 30 + head-of-line 8 + headroom 1300 = 1338.
    assert sum(u.values()) == 1338
    assert request_virtual_usages(reqs, cfg, total_blocks=2000, draining=True)[""] == INF
    # The default high headroom is relative: all but 100 blocks of this instance (capped by high_headroom_blocks).
    rel = request_virtual_usages(reqs, PolicyConfig(normal_headroom_blocks=100), total_blocks=800)
    assert rel["r2"] == 20 + (800 - 100) / 2
    assert request_virtual_usages(reqs, cfg, total_blocks=800)["r2"] == 20 + (800 - 100) / 2


def test_practical_form_matches_the_definition() -> None:
    # M=1000, running blocks 600 (avail 400), R=6, no queue, one high request, headroom 300:
    # ΣV = 600 + 300 = 900 → F = (1000 - 900)/6 = 16.67 = (avail - headroom)/R.
    cfg = PolicyConfig(high_headroom_blocks=300)
    v = view("a", free_blocks=400, num_running=6, num_running_high=1)
    assert instance_headroom(v, cfg) == 300
    vu = instance_virtual_usage(v, cfg)
    assert vu == 900
    assert paper_freeness(1000, vu, 6) == pytest.approx(100 / 6) == pytest.approx(migration_freeness(v, cfg))
    assert paper_freeness(1000, 0, 0) == INF
    assert paper_freeness(1000, INF, 3) == -INF
    assert instance_virtual_usage(view("d", state=InstanceState.DRAINING), cfg) == INF


def test_cluster_freeness_as_one_virtual_instance() -> None:
    a = view("a", free_blocks=300, num_running=10, num_waiting=2, waiting_demand_blocks=100)
    b = view("b", free_blocks=800, num_running=5)
    # Σ(avail - b_all) / Σ(R+W) = (200 + 800) / (12 + 5) = 58.8
    assert cluster_freeness([a, b], DEFAULT) == pytest.approx(1000 / 17)
    # Removing b keeps its load but loses its 1000 blocks: (200 + 800 - 1000) / 17 = 0.
    assert cluster_load([a, b], DEFAULT, removed={"b"}) == (0.0, 17)
    # A draining instance counts as removed.
    d = view("b", state=InstanceState.DRAINING, free_blocks=800, num_running=5)
    assert cluster_freeness([a, d], DEFAULT) == pytest.approx(0.0)
    # Cordoned/starting/unhealthy are left out; nothing running is +inf.
    c = view("c", state=InstanceState.CORDONED, free_blocks=0, num_running=50)
    assert cluster_freeness([a, b, c], DEFAULT) == pytest.approx(1000 / 17)
    assert cluster_freeness([view("e")], DEFAULT) == INF


def test_sort_keys_are_strict_and_break_ties_by_id() -> None:
    fs = [("b", 5.0), ("a", 5.0), ("c", -INF), ("d", INF), ("e", -2.0)]
    assert [i for i, f in sorted(fs, key=lambda t: most_loaded_first(t[1], t[0]))] == ["c", "e", "a", "b", "d"]
    assert [i for i, f in sorted(fs, key=lambda t: freest_first(t[1], t[0]))] == ["d", "a", "b", "e", "c"]


@given(st.lists(instance_views("x"), min_size=1, max_size=20), st.integers(0, 1500), st.integers(0, 300))
def test_vectorized_dispatch_freeness_matches_scalar(views: list, high: int, normal: int) -> None:  # type: ignore[type-arg]
    """The numpy form used by dispatch equals the scalar reference exactly."""
    import numpy as np

    cfg = PolicyConfig(high_headroom_blocks=high, normal_headroom_blocks=normal)
    views = [v for v in views if v.state != InstanceState.DRAINING]
    num = np.array(
        [
            v.free_blocks - v.waiting_demand_blocks - v.dispatched_demand_blocks - instance_headroom(v, cfg)
            for v in views
        ],
        dtype=np.float64,
    )
    load = np.array([v.num_requests for v in views], dtype=np.float64)
    got = freeness_of(num, load) if views else np.array([])
    assert list(got) == [dispatch_freeness(v, cfg) for v in views]
