"""The leader warns, naming the instance, when an instance's load reports/keep-alives keep coming later than the
dispatch staleness bound: the llumlet's ``--load-interval-ms`` is independent of the cluster's
``load_report_interval_ms`` the bound is made of, and a llumlet keeping alive slower than the bound is skipped for
dispatch while alive. One late message (a stall) is no cadence: it takes ``LATE_LOAD_MESSAGES_WARN`` in a row.

Gaps are made by moving the instance's last arrival time back (no sleeps: a slow machine changes nothing here)."""

from __future__ import annotations

import logging

import pytest

from pyllumnix.control_plane.scheduler.cluster import quiet_stale_after
from pyllumnix.control_plane.scheduler.replica import LATE_LOAD_MESSAGES_WARN, SchedulerReplica
from pyllumnix.infra.load_cadence import QUIET_KEEPALIVE_EVERY
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_replica_leadership import active_load as quiet_load
from tests.test_replica_leadership import make_replica, register

LOGGER = "pyllumnix.control_plane.scheduler.replica"


def active_load(instance_id: str, seq: int = 1) -> common_pb2.InstanceLoad:
    """A busy instance's load (a running request): keep-alives every 3 intervals, judged by the short bound."""
    load = quiet_load(instance_id, seq)
    load.num_running = 1
    load.requests.add(request_id=f"{instance_id}-r", phase=common_pb2.REQUEST_PHASE_RUNNING, num_blocks=1)
    return load


def late_keepalive(replica: SchedulerReplica, instance_id: str, gap: float) -> None:
    """A keep-alive arriving ``gap`` seconds after the instance's previous message."""
    replica.cluster.report_times[instance_id] -= gap
    assert replica.keepalive(instance_id, replica.cluster.loads[instance_id].seq)


def late_report(replica: SchedulerReplica, instance_id: str, gap: float) -> None:
    replica.cluster.report_times[instance_id] -= gap
    assert replica.report(active_load(instance_id, seq=replica.cluster.loads[instance_id].seq + 1))


def warnings_about(caplog: pytest.LogCaptureFixture, instance_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"instance {instance_id}: ")
    ]


def replica_with(*ids: str, bound: float = 0.3) -> SchedulerReplica:
    replica, _ = make_replica(ids, [])
    replica.cluster.dispatch_stale_after = bound
    for iid in ids:
        assert replica.report(active_load(iid))
    return replica


def test_a_llumlet_keeping_alive_slower_than_the_bound_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    replica = replica_with("slow", "fast")
    for _ in range(LATE_LOAD_MESSAGES_WARN - 1):
        late_keepalive(replica, "slow", 0.45)  # e.g. --load-interval-ms 150: keep-alives every 0.45 s > 0.3 s
    assert warnings_about(caplog, "slow") == []
    late_keepalive(replica, "slow", 0.45)
    (message,) = warnings_about(caplog, "slow")
    assert "more than 0.30s apart" in message and "load_report_interval_ms = 50 ms" in message
    assert "--load-interval-ms" in message
    for _ in range(5):  # once per instance, not once per message
        late_keepalive(replica, "slow", 0.45)
        late_report(replica, "slow", 0.45)
    assert len(warnings_about(caplog, "slow")) == 1
    for _ in range(5):
        late_keepalive(replica, "fast", 0.29)  # just within the bound
    assert warnings_about(caplog, "fast") == []


def test_a_late_report_counts_like_a_late_keepalive(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    replica = replica_with("a")
    for _ in range(LATE_LOAD_MESSAGES_WARN):
        late_report(replica, "a", 1.0)
    assert len(warnings_about(caplog, "a")) == 1


def test_isolated_late_messages_are_a_stall_not_a_cadence(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    replica = replica_with("a")
    for _ in range(10):
        for _ in range(LATE_LOAD_MESSAGES_WARN - 1):
            late_keepalive(replica, "a", 2.0)
        late_keepalive(replica, "a", 0.01)  # back on time: the count starts over
    assert warnings_about(caplog, "a") == []


def test_the_bound_is_the_clusters_current_one(caplog: pytest.LogCaptureFixture) -> None:
    """A larger cluster interval (a larger bound) makes the same cadence fine."""
    caplog.set_level(logging.WARNING, LOGGER)
    replica = replica_with("a", bound=1.2)  # load_report_interval_ms = 200: 6 intervals
    for _ in range(5):
        late_keepalive(replica, "a", 0.45)
    assert warnings_about(caplog, "a") == []


def test_an_instance_registering_again_is_judged_afresh(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    replica = replica_with("a")
    for _ in range(LATE_LOAD_MESSAGES_WARN):
        late_keepalive(replica, "a", 1.0)
    replica._instance_vanished("a")
    register(replica, "a")
    assert replica.report(active_load("a", seq=1))
    for _ in range(LATE_LOAD_MESSAGES_WARN):
        late_keepalive(replica, "a", 1.0)
    assert len(warnings_about(caplog, "a")) == 2


def test_a_quiet_instance_keeping_alive_at_its_quiet_period_is_not_named(caplog: pytest.LogCaptureFixture) -> None:
    """#20: a quiet llumlet keeps alive every QUIET_KEEPALIVE_EVERY intervals (1 s at 50 ms); judged by the short bound
    (the old rule) it was named on every idle period. It is judged by the quiet bound, and named only past that."""
    caplog.set_level(logging.WARNING, LOGGER)
    replica, _ = make_replica(("q",), [])
    assert replica.report(quiet_load("q"))
    period = QUIET_KEEPALIVE_EVERY * 0.05
    for _ in range(5):
        late_keepalive(replica, "q", period)
    assert warnings_about(caplog, "q") == []
    for _ in range(LATE_LOAD_MESSAGES_WARN):
        late_keepalive(replica, "q", quiet_stale_after(0.05) + 0.1)
    (message,) = warnings_about(caplog, "q")
    assert "more than 2.00s apart" in message
    # A request arrives after a quiet spell: that first busy load came a quiet period after the last keep-alive, which
    # is on time (judged by the cadence it was due at); from then on the instance is judged by the short bound.
    busy, _ = make_replica(("b",), [])
    assert busy.report(quiet_load("b"))
    for _ in range(LATE_LOAD_MESSAGES_WARN):
        late_keepalive(busy, "b", period)
    late_report(busy, "b", period)
    assert warnings_about(caplog, "b") == []
    for _ in range(LATE_LOAD_MESSAGES_WARN):
        late_keepalive(busy, "b", 0.45)
    assert len(warnings_about(caplog, "b")) == 1
