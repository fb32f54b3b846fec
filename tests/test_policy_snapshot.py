"""Snapshot views and their adapters from engine snapshots (from proto load reports: test_scheduler_views.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.data_plane.engine.base import LoadSnapshot, Phase, RequestLoadInfo
from pyllumnix.data_plane.llumlet.views import instance_view, request_view
from pyllumnix.infra.vocabulary import Priority, RequestPhase
from tests.test_policy_helpers import instance_views, snapshots, view


def test_from_load_snapshot() -> None:
    reqs = (
        RequestLoadInfo("r1", Phase.RUNNING, 2, 12, 0, 100, 3, 0, 1.0),
        RequestLoadInfo("r2", Phase.WAITING, 1, 0, 7, 100, 0, 1, 2.0),
        RequestLoadInfo("r3", Phase.SUSPENDED, 1, 4, 0, 50, 1, 0, 0.5),
    )
    load = LoadSnapshot(1300, 1284, 16, 13, 2, 1, 1, 7, 7, 0, 5, reqs)
    v = instance_view("sim-0", load, migrating_in=True)
    assert (v.instance_id, v.num_running, v.num_waiting, v.num_preempted) == ("sim-0", 2, 1, 1)
    assert (v.num_running_high, v.running_blocks, v.migrating_in) == (1, 16, True)
    assert request_view(reqs[2]).phase == RequestPhase.MIGRATING


def test_snapshot_sorted_and_immutable() -> None:
    s = ClusterSnapshot.of([view("b"), view("a")])
    assert s.ids == ("a", "b") and len(s) == 2 and "a" in s
    with pytest.raises(ValueError, match="duplicate"):
        ClusterSnapshot.of([view("a"), view("a")])
    with pytest.raises(ValueError):
        s.columns.avail[0] = 1.0
    s2 = s.record_dispatch("b", 5, Priority.HIGH)
    assert s.get("b") == view("b")  # the old snapshot is untouched
    b = s2.get("b")
    assert b is not None and (b.dispatched_since_report, b.dispatched_demand_blocks, b.dispatched_high) == (1, 5, 1)
    with pytest.raises(KeyError):
        s.record_dispatch("zz", 1)
    assert s.without(["a"]).ids == ("b",)
    assert s.updated([view("c")]).ids == ("a", "b", "c")


# Drawing data-dependent snapshot chains is slow on a loaded CPU: the too_slow health check is about the machine.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(min_size=1), st.data())
def test_incremental_update_equals_rebuild(snap: ClusterSnapshot, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.sampled_from(snap.ids), unique=True))
    new = [data.draw(instance_views(i)) for i in ids]
    inc = snap.updated(new)
    full = ClusterSnapshot.of({**{v.instance_id: v for v in snap}, **{v.instance_id: v for v in new}}.values())
    assert inc == full
    for name in ("avail", "load", "total", "block_size", "eligible", "draining", "holds_high", "holds_normal"):
        assert np.array_equal(getattr(inc.columns, name), getattr(full.columns, name)), name


# Drawing data-dependent snapshot chains is slow on a loaded CPU: the too_slow health check is about the machine.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(min_size=1), st.data())
def test_chains_of_derived_snapshots_equal_rebuilds(snap: ClusterSnapshot, data: st.DataObject) -> None:
    """Views and columns stay right along long chains (past the delta limit), whichever of them is materialized
    when, and for a branch taken off an older snapshot."""
    history = [snap]
    views = {v.instance_id: v for v in snap}
    for _ in range(data.draw(st.integers(1, 90))):
        if data.draw(st.booleans()):
            snap.instances  # noqa: B018  (materializes the views)
        if data.draw(st.booleans()):
            snap.columns  # noqa: B018  (materializes the columns)
        if data.draw(st.integers(0, 9)) == 0:
            snap = data.draw(st.sampled_from(history))
            views = {v.instance_id: v for v in snap}
        ids = data.draw(st.lists(st.sampled_from(snap.ids), unique=True, max_size=3))
        new = [data.draw(instance_views(i)) for i in ids]
        snap = snap.updated(new)
        views.update((v.instance_id, v) for v in new)
        history.append(snap)
        assert snap.changed == tuple(snap.positions[i] for i in ids)
        assert all(snap.get(i) == v for i, v in views.items())
    full = ClusterSnapshot.of(views.values())
    assert snap == full
    for name in ("avail", "load", "total", "block_size", "eligible", "draining", "holds_high", "holds_normal"):
        assert np.array_equal(getattr(snap.columns, name), getattr(full.columns, name)), name


def test_pickled_snapshot_is_rebuilt_with_a_fresh_serial_and_single_views_are_refused() -> None:
    s = ClusterSnapshot.of([view("a"), view("b")]).updated([view("a", free_blocks=7)])
    copy = pickle.loads(pickle.dumps(s))
    assert copy == s and copy.serial != s.serial and copy.parent_serial == 0
    assert np.array_equal(copy.columns.avail, s.columns.avail)
    with pytest.raises(TypeError, match="iterable"):
        s.updated(view("a"))  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        s.columns.floats = s.columns.floats  # type: ignore[misc]
