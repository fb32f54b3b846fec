"""The scheduler's cluster view (``ClusterState``) and the leader's Dispatch answers when nothing can be chosen.

Issue #12 follow-ups: an instance whose load reports stopped (a SIGSTOPped llumlet) stops taking requests within a few
report intervals while the others keep reporting, not only after ``stale_after`` (1 s): requests sent there waited for
their AddRequest deadline. A stall of the scheduler itself (every report late at once) must not empty the cluster.
A leader with no instance to choose from answers UNAVAILABLE (503 + Retry-After at the frontend, or its bypass), not
RESOURCE_EXHAUSTED (429 "the cluster is full"), which stays for instances that exist and are all full. The admin
API's ``last_report_time`` is Unix seconds, as the proto says.
"""

from __future__ import annotations

import time
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.scheduler.cluster import STALE_SCAN_INTERVAL_S, ClusterState
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica, SchedulingError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2

STEP = STALE_SCAN_INTERVAL_S  # snapshots further apart than this each scan for silent instances


def load(instance_id: str, seq: int) -> common_pb2.InstanceLoad:
    return common_pb2.InstanceLoad(
        instance_id=instance_id,
        seq=seq,
        total_blocks=100,
        free_blocks=100,
        block_size=16,
        state=common_pb2.INSTANCE_STATE_ACTIVE,
    )


def busy_load(instance_id: str, seq: int) -> common_pb2.InstanceLoad:
    """A load with a running request: a busy instance keeps alive every 3 intervals and is judged by the short bound
    (a quiet one, with nothing on it, by the rules in ``test_load_reporting``'s quiet-instance tests)."""
    pb = load(instance_id, seq)
    pb.num_running = 1
    pb.requests.add(request_id=f"{instance_id}-r", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=1)
    return pb


def cluster_of(*ids: str, **kwargs: float) -> ClusterState:
    cluster = ClusterState(**kwargs)
    for iid in ids:
        cluster.upsert(common_pb2.InstanceInfo(instance_id=iid, grpc_address=f"127.0.0.1:{1000 + len(iid)}"))
    return cluster


def accepting(cluster: ClusterState, now: float) -> set[str]:
    return {v.instance_id for v in cluster.snapshot(now) if v.accepts_requests}


def test_a_silent_instance_stops_taking_requests_while_the_others_report() -> None:
    cluster = cluster_of("a", "b", stale_after=1.0, dispatch_stale_after=0.3)
    cluster.report(busy_load("a", 1), 0.0)
    cluster.report(busy_load("b", 1), 0.0)
    assert accepting(cluster, 0.0) == {"a", "b"}
    t, seq = 0.0, 1
    while t < 0.5:  # b reports every 50 ms, a is stopped
        t, seq = round(t + 0.05, 3), seq + 1
        cluster.report(busy_load("b", seq), t)
    # 0.5 s of silence: within stale_after (1 s), yet not dispatchable (before the fix: still chosen until 1 s).
    assert accepting(cluster, t + STEP) == {"b"}
    cluster.report(busy_load("a", 2), t + 2 * STEP)  # a is continued: dispatchable at once
    assert accepting(cluster, t + 2 * STEP) == {"a", "b"}


def test_a_stall_of_the_scheduler_itself_keeps_every_instance() -> None:
    cluster = cluster_of("a", "b", stale_after=1.0, dispatch_stale_after=0.3)
    cluster.report(busy_load("a", 1), 0.0)
    cluster.report(busy_load("b", 1), 0.0)
    # No report taken for 0.8 s, from anyone (the scheduler's loop was busy or stopped): nobody is singled out.
    assert accepting(cluster, 0.8) == {"a", "b"}
    # Past stale_after every silent instance is unhealthy, as before.
    assert accepting(cluster, 1.2) == set()


def test_last_report_time_is_unix_seconds() -> None:
    cluster = cluster_of("a")
    now = time.monotonic()
    cluster.report(load("a", 1), now - 2.0)
    status = cluster.status("a", PolicyConfig(), now)
    assert status.last_report_time == pytest.approx(time.time() - 2.0, abs=0.5)


def replica() -> SchedulerReplica:
    """A leader's dispatch path without etcd: the replica's other parts are never started here."""
    r = SchedulerReplica(cast(Any, object()), KeyLayout("c1"), "s0", "127.0.0.1:1")
    r.require_leader = lambda: None  # type: ignore[method-assign]
    return r


def dispatch_error(r: SchedulerReplica) -> SchedulingError:
    with pytest.raises(SchedulingError) as caught:
        r.dispatch("req", common_pb2.PRIORITY_NORMAL, 10, 10)
    return caught.value


def test_no_instance_to_choose_from_is_unavailable_not_resource_exhausted() -> None:
    r = replica()
    err = dispatch_error(r)  # nothing registered (every lease expired while etcd was paused)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "0 known" in str(err)
    # Registered and once reporting, but silent for longer than stale_after: still nothing to choose from.
    r.cluster.upsert(common_pb2.InstanceInfo(instance_id="a", grpc_address="127.0.0.1:2"))
    r.cluster.report(load("a", 1), time.monotonic() - 5.0)
    time.sleep(STEP * 1.5)  # silent instances are looked for at most every STEP
    err = dispatch_error(r)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "1 known" in str(err)
    # A fresh report: dispatched there.
    r.cluster.report(load("a", 2), time.monotonic())
    assert r.dispatch("req", common_pb2.PRIORITY_NORMAL, 10, 10) == ("a", "127.0.0.1:2")


def test_instances_that_exist_but_are_all_full_are_resource_exhausted() -> None:
    r = replica()
    r.cluster.upsert(common_pb2.InstanceInfo(instance_id="a", grpc_address="127.0.0.1:2"))
    r.cluster.report(load("a", 1), time.monotonic())
    r.core.dispatch = lambda snapshot, request: None  # type: ignore[method-assign]  # a policy that finds no room
    err = dispatch_error(r)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "all full" in str(err)


def test_uncordoning_a_silent_instance_keeps_it_undispatchable() -> None:
    """An override (drain, cordon, uncordon) rebuilds the instance's view: it must keep the staleness scan's verdict.
    Before, the rebuilt view was healthy, and since the scan marks an instance only once, an instance uncordoned while
    silent took new requests until its next report."""
    cluster = cluster_of("a", "b", stale_after=1.0, dispatch_stale_after=0.3)
    cluster.report(busy_load("a", 1), 0.0)
    cluster.report(busy_load("b", 1), 0.0)
    cluster.set_override("a", InstanceState.CORDONED, 0.0)
    t, seq = 0.0, 1
    while t < 0.5:  # b reports every 50 ms, a is stopped
        t, seq = round(t + 0.05, 3), seq + 1
        cluster.report(busy_load("b", seq), t)
    assert accepting(cluster, t + STEP) == {"b"}
    cluster.set_override("a", InstanceState.ACTIVE, t + STEP)  # uncordoned while still silent
    cluster.report(busy_load("b", seq + 1), t + 2 * STEP)
    assert accepting(cluster, t + 3 * STEP) == {"b"}
    cluster.report(busy_load("a", 2), t + 3 * STEP)  # a speaks again: dispatchable at once
    assert accepting(cluster, t + 3 * STEP) == {"a", "b"}


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        ((), (2, 30, 1)),  # nothing listed yet: both fresh dispatches count (r3 outlived pending_ttl)
        (("r1",), (1, 20, 1)),
        (("r2", "other"), (1, 10, 0)),
        (("r1", "r2", "later-1", "later-2"), (0, 0, 0)),  # all found: the rest of the list is not needed
        (("other", "r2", "r1"), (0, 0, 0)),
        (("r3",), (2, 30, 1)),  # an expired one listed late changes nothing
    ],
)
def test_a_report_drops_the_dispatched_requests_it_lists(
    listed: tuple[str, ...], expected: tuple[int, int, int]
) -> None:
    """A dispatched request counts on its instance until a report lists it or ``pending_ttl`` passes; the report's
    request list is walked only while dispatched requests are still pending."""
    cluster = cluster_of("a", pending_ttl=1.0)
    cluster.report(load("a", 1), 0.0)
    cluster.snapshot(0.0)  # the first report folded: dispatch there
    cluster.record_dispatch("a", "r3", 30, common_pb2.PRIORITY_NORMAL, 0.0)
    cluster.record_dispatch("a", "r1", 10, common_pb2.PRIORITY_NORMAL, 0.8)
    cluster.record_dispatch("a", "r2", 20, common_pb2.PRIORITY_HIGH, 0.8)
    update = load("a", 2)
    for rid in listed:
        update.requests.add(request_id=rid, phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=1)
    assert cluster.report(update, 1.2)
    view = cluster.snapshot(1.2).get("a")
    assert view is not None
    assert (view.dispatched_since_report, view.dispatched_demand_blocks, view.dispatched_high) == expected
