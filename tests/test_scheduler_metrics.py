"""A scheduler replica's /metrics: its decision counters by policy and outcome, the migrations it ordered and their
results, and whether it leads — rendered from the replica's own counts at scrape time."""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.scheduler.metrics import SchedulerMetrics
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.protos.llumnix.v1 import llumlet_pb2


def fake_replica() -> Any:
    return SimpleNamespace(
        replica_id="s0",
        is_leader=True,
        cluster=SimpleNamespace(infos={"a": None, "b": None}),
        core=SimpleNamespace(config=PolicyConfig()),
        dispatch_decisions=collections.Counter(),
        pairing_decisions=collections.Counter(),
        migrations_ordered=0,
        on_migration=[],
    )


def samples(metrics: SchedulerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_decisions_orders_and_results() -> None:
    replica = fake_replica()
    metrics = SchedulerMetrics(cast(SchedulerReplica, replica))
    s = samples(metrics)  # every current-policy outcome exported at 0 before the first decision
    assert s["llumnix_dispatch_decisions_total", (("outcome", "placed"), ("policy", "llumnix"), ("replica", "s0"))] == 0
    assert s["llumnix_pairing_decisions_total", (("outcome", "ordered"), ("policy", "defrag"), ("replica", "s0"))] == 0
    replica.dispatch_decisions["llumnix", "placed"] += 3
    replica.dispatch_decisions["round-robin", "refused"] += 1  # an earlier policy's counts stay visible
    replica.pairing_decisions["defrag", "source_busy"] += 2
    replica.migrations_ordered = 2
    for hook in replica.on_migration:
        hook(llumlet_pb2.MigrationResult(outcome=llumlet_pb2.MIGRATION_OUTCOME_COMMITTED))
        hook(llumlet_pb2.MigrationResult(outcome=llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION))
    s = samples(metrics)
    assert s["llumnix_dispatch_decisions_total", (("outcome", "placed"), ("policy", "llumnix"), ("replica", "s0"))] == 3
    assert (
        s["llumnix_dispatch_decisions_total", (("outcome", "refused"), ("policy", "round-robin"), ("replica", "s0"))]
        == 1
    )
    assert (
        s["llumnix_pairing_decisions_total", (("outcome", "source_busy"), ("policy", "defrag"), ("replica", "s0"))] == 2
    )
    assert s["llumnix_scheduler_migration_orders_total", (("replica", "s0"),)] == 2
    results = {
        dict(lbls)["outcome"]: v for (n, lbls), v in s.items() if n == "llumnix_scheduler_migration_results_total"
    }
    assert results == {"committed": 1, "aborted_by_source": 0, "aborted_by_destination": 1}
    assert s["llumnix_scheduler_is_leader", (("replica", "s0"),)] == 1
    assert s["llumnix_scheduler_instances", (("replica", "s0"),)] == 2
