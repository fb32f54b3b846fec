"""Prometheus metrics of one scheduler replica: its decisions (dispatch by policy and outcome, pairing by policy and
outcome), the migrations it ordered and their results, and whether it leads.

Only the leader decides, so in a replicated scheduler the followers' counters stay still; sum over replicas (``sum
without (replica)``) for the cluster's totals across fail-overs. Per-instance figures (freeness, blocks, queues) are
on the frontend's ``/metrics`` (from the leader's view) and on each llumlet's own.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import ENDED_OUTCOMES
from pyllumnix.protos.llumnix.v1 import llumlet_pb2


class SchedulerMetrics(Collector):
    """Renders the replica's counters at scrape time (the dispatch path only bumps a ``collections.Counter``)."""

    def __init__(self, replica: SchedulerReplica) -> None:
        self.replica = replica
        self.migration_results: dict[str, int] = {o.label: 0 for o in ENDED_OUTCOMES}
        replica.on_migration.append(self._record)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def _record(self, result: llumlet_pb2.MigrationResult) -> None:
        self.migration_results[wire.outcome_from_pb(result.outcome).counted_as.label] += 1

    def collect(self) -> Iterator[Metric]:
        r = self.replica
        rid = [r.replica_id]
        leader = GaugeMetricFamily("llumnix_scheduler_is_leader", "1 while this replica leads", labels=["replica"])
        leader.add_metric(rid, 1.0 if r.is_leader else 0.0)
        instances = GaugeMetricFamily(
            "llumnix_scheduler_instances", "Instances this replica knows (registry)", labels=["replica"]
        )
        instances.add_metric(rid, len(r.cluster.infos))
        dispatch = CounterMetricFamily(
            "llumnix_dispatch_decisions",
            "Dispatch decisions of this replica by policy and outcome (placed, refused: nothing free)",
            labels=["replica", "policy", "outcome"],
        )
        policy = r.core.config.dispatch_policy
        for outcome in ("placed", "refused"):  # present from the start, so rate() sees the first decision
            dispatch.add_metric([*rid, policy, outcome], r.dispatch_decisions.get((policy, outcome), 0))
        for (p, outcome), n in sorted(r.dispatch_decisions.items()):
            if p != policy:
                dispatch.add_metric([*rid, p, outcome], n)
        pairing = CounterMetricFamily(
            "llumnix_pairing_decisions",
            "Migration pairs chosen by the pairing policy (ordered; source_busy: its previous order still runs; "
            "nothing_fits: the same order found nothing to move and neither instance's load changed since)",
            labels=["replica", "policy", "outcome"],
        )
        pairing_policy = r.core.config.pairing_policy
        for outcome in ("ordered", "source_busy", "nothing_fits"):
            pairing.add_metric([*rid, pairing_policy, outcome], r.pairing_decisions.get((pairing_policy, outcome), 0))
        for (p, outcome), n in sorted(r.pairing_decisions.items()):
            if p != pairing_policy:
                pairing.add_metric([*rid, p, outcome], n)
        orders = CounterMetricFamily(
            "llumnix_scheduler_migration_orders", "MigrateOut orders sent by this replica", labels=["replica"]
        )
        orders.add_metric(rid, r.migrations_ordered)
        results = CounterMetricFamily(
            "llumnix_scheduler_migration_results",
            "Results of the migrations this replica ordered, by outcome",
            labels=["replica", "outcome"],
        )
        for outcome, n in self.migration_results.items():
            results.add_metric([*rid, outcome], n)
        yield from (leader, instances, dispatch, pairing, orders, results)
