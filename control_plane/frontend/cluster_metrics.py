"""Scheduler-side figures on the frontend's /metrics: freeness and load per instance, migration counts and a
cluster-wide migration downtime histogram.

A background task refreshes a cached ``ListInstances`` answer from the scheduler leader (every ``interval`` seconds)
while someone scrapes: from the first scrape until ``idle_after`` seconds after the latest one. The collector renders
that cache at scrape time, so a scrape never waits on the scheduler (the first scrape after a quiet spell shows the
cache as it was, and wakes the refresh). Why not always: the answer is O(instances) for the leader to build and for
every frontend to read, every second, and nobody may be looking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pyllumnix.clients.channel import CallKind, EndpointPool
from pyllumnix.clients.errors import LlumnixError
from pyllumnix.protos.llumnix.v1 import admin_pb2, admin_pb2_grpc, common_pb2, scheduler_pb2

log = logging.getLogger(__name__)


# Seconds after the latest scrape that the refresh goes on: longer than any usual scrape interval (Prometheus' default
# is 1 min), so a scraped frontend keeps today's freshness.
IDLE_AFTER_S = 300.0


class ClusterMetrics(Collector):
    def __init__(self, pool: EndpointPool, interval: float = 1.0, idle_after: float = IDLE_AFTER_S) -> None:
        self.pool = pool
        self.interval = interval
        self.idle_after = idle_after
        self.instances: list[scheduler_pb2.InstanceStatus] = []
        self._task: asyncio.Task[None] | None = None
        self._scraped_at = -math.inf
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._refresh_forever(), name="cluster-metrics")

    def _scraped(self) -> None:
        """Notes a scrape (from any thread: prometheus_client may collect outside the loop) and wakes the refresh."""
        self._scraped_at = time.monotonic()
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or wake.is_set() or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        reply = await self.pool.call(
            lambda channel, timeout: admin_pb2_grpc.AdminServiceStub(channel).ListInstances(
                admin_pb2.ListInstancesRequest(), timeout=timeout
            ),
            what="ListInstances",
            kind=CallKind.READ,
            prefer_leader=True,
        )
        self.instances = list(reply.instances)

    async def _refresh_forever(self) -> None:
        wake = self._wake
        if wake is None:
            raise RuntimeError("ClusterMetrics: the refresh runs from start()")
        while True:
            if time.monotonic() - self._scraped_at > self.idle_after:
                wake.clear()
                await wake.wait()  # nobody scrapes: no call to the scheduler until someone does
            try:
                await self.refresh()
            except LlumnixError as exc:
                log.debug("cluster metrics refresh failed: %s", exc)
            await asyncio.sleep(self.interval)

    def collect(self) -> Iterator[Metric]:
        self._scraped()
        labels = ["instance"]
        freeness = GaugeMetricFamily(
            "llumnix_instance_freeness", "Migration freeness F (+Inf when empty)", labels=labels
        )
        used = GaugeMetricFamily("llumnix_instance_used_blocks", "KV blocks in use", labels=labels)
        total = GaugeMetricFamily("llumnix_instance_total_blocks", "KV blocks in all", labels=labels)
        running = GaugeMetricFamily("llumnix_instance_running_requests", "Requests running", labels=labels)
        waiting = GaugeMetricFamily("llumnix_instance_waiting_requests", "Requests queued", labels=labels)
        migrations = CounterMetricFamily(
            "llumnix_migrations", "Outgoing migrations by outcome", labels=["instance", "outcome"]
        )
        buckets: list[float] = []
        counts: list[int] = []
        downtime_sum = 0.0
        for status in self.instances:
            iid = status.info.instance_id
            load = status.load
            freeness.add_metric([iid], status.freeness)
            used.add_metric([iid], load.total_blocks - load.free_blocks)
            total.add_metric([iid], load.total_blocks or status.info.total_blocks)
            running.add_metric([iid], load.num_running)
            waiting.add_metric([iid], load.num_waiting)
            stats: common_pb2.MigrationStats = load.migration_stats
            migrations.add_metric([iid, "committed"], stats.committed)
            migrations.add_metric([iid, "aborted_by_source"], stats.aborted_by_source)
            migrations.add_metric([iid, "aborted_by_destination"], stats.aborted_by_destination)
            if stats.downtime_bucket_le_ms:
                if not buckets:
                    buckets = list(stats.downtime_bucket_le_ms)
                    counts = [0] * len(buckets)
                if list(stats.downtime_bucket_le_ms) == buckets:
                    counts = [c + n for c, n in zip(counts, stats.downtime_bucket_counts, strict=True)]
                    downtime_sum += stats.downtime_sum_ms
        yield from (freeness, used, total, running, waiting, migrations)
        histogram = HistogramMetricFamily(
            "llumnix_migration_downtime_seconds", "Last-stage downtime of committed migrations (all instances)"
        )
        if buckets:
            histogram.add_metric(
                [],
                [
                    ("+Inf" if math.isinf(le) else repr(le / 1000), float(c))
                    for le, c in zip(buckets, counts, strict=True)
                ],
                downtime_sum / 1000,
            )
        yield histogram
