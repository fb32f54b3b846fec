"""The frontend's cluster-metrics collector: what a scrape shows for a given scheduler answer.

The scheduler's ``ListInstances`` answer is served by a real in-process gRPC AdminService (a fake only in what it
answers), the migration statistics are built by the llumlet's own ``LlumletStats.record_migration``, and every expected
figure is computed here from the inputs (used = total - free, per-bucket sums across instances, seconds from ms).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pyllumnix.clients.channel import EndpointPool
from pyllumnix.control_plane.frontend.cluster_metrics import ClusterMetrics
from pyllumnix.data_plane.llumlet.llumlet import DOWNTIME_BUCKETS_MS, LlumletStats
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import admin_pb2, admin_pb2_grpc, common_pb2, llumlet_pb2, scheduler_pb2

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def migration_stats(downtimes_ms: Sequence[float], aborted_src: int = 0, aborted_dst: int = 0) -> Any:
    stats = LlumletStats()
    for d in downtimes_ms:
        stats.record_migration(
            llumlet_pb2.MigrationResult(outcome=llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, downtime_ms=d)
        )
    for outcome, n in (
        (llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, aborted_src),
        (llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, aborted_dst),
    ):
        for _ in range(n):
            stats.record_migration(llumlet_pb2.MigrationResult(outcome=outcome))
    return stats.migration


def status(
    iid: str, *, free: int, total: int, running: int, waiting: int, freeness: float, stats: Any
) -> scheduler_pb2.InstanceStatus:
    return scheduler_pb2.InstanceStatus(
        info=common_pb2.InstanceInfo(instance_id=iid, total_blocks=total),
        load=common_pb2.InstanceLoad(
            instance_id=iid,
            free_blocks=free,
            total_blocks=total,
            num_running=running,
            num_waiting=waiting,
            migration_stats=stats,
        ),
        freeness=freeness,
    )


def scrape(collector: ClusterMetrics) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


A_DOWNTIMES = [0.5, 4.0, 12.0, 250.0]  # ms
B_DOWNTIMES = [1.5, 4.5, 2000.0]


def two_instances() -> list[scheduler_pb2.InstanceStatus]:
    return [
        status(
            "a",
            free=30,
            total=100,
            running=5,
            waiting=2,
            freeness=-1.25,
            stats=migration_stats(A_DOWNTIMES, aborted_src=2, aborted_dst=1),
        ),
        status("b", free=64, total=64, running=0, waiting=0, freeness=math.inf, stats=migration_stats(B_DOWNTIMES)),
    ]


def test_gauges_and_counters_per_instance() -> None:
    collector = ClusterMetrics(EndpointPool("127.0.0.1:1"))
    collector.instances = two_instances()
    samples = scrape(collector)
    for iid, free, total, running, waiting, freeness in (("a", 30, 100, 5, 2, -1.25), ("b", 64, 64, 0, 0, math.inf)):
        assert value(samples, "llumnix_instance_freeness", instance=iid) == freeness
        assert value(samples, "llumnix_instance_used_blocks", instance=iid) == total - free
        assert value(samples, "llumnix_instance_total_blocks", instance=iid) == total
        assert value(samples, "llumnix_instance_running_requests", instance=iid) == running
        assert value(samples, "llumnix_instance_waiting_requests", instance=iid) == waiting
    for iid, committed, src, dst in (("a", len(A_DOWNTIMES), 2, 1), ("b", len(B_DOWNTIMES), 0, 0)):
        for outcome, n in (("committed", committed), ("aborted_by_source", src), ("aborted_by_destination", dst)):
            assert value(samples, "llumnix_migrations_total", instance=iid, outcome=outcome) == n


def test_downtime_histogram_sums_every_instance() -> None:
    collector = ClusterMetrics(EndpointPool("127.0.0.1:1"))
    collector.instances = two_instances()
    samples = scrape(collector)
    downtimes = A_DOWNTIMES + B_DOWNTIMES
    for le_ms in DOWNTIME_BUCKETS_MS:
        le = "+Inf" if math.isinf(le_ms) else repr(le_ms / 1000)
        expected = sum(1 for d in downtimes if d <= le_ms)
        assert value(samples, "llumnix_migration_downtime_seconds_bucket", le=le) == expected, le
    assert value(samples, "llumnix_migration_downtime_seconds_count") == len(downtimes)
    assert value(samples, "llumnix_migration_downtime_seconds_sum") == pytest.approx(sum(downtimes) / 1000)
    # spot checks against hand-counted buckets: <= 5 ms holds 0.5, 1.5, 4.0, 4.5; <= 1 s all but the 2 s one
    assert value(samples, "llumnix_migration_downtime_seconds_bucket", le="0.005") == 4
    assert value(samples, "llumnix_migration_downtime_seconds_bucket", le="1.0") == 6


def test_no_migrations_shows_an_empty_histogram_and_zero_counters() -> None:
    collector = ClusterMetrics(EndpointPool("127.0.0.1:1"))
    collector.instances = [
        status("a", free=10, total=10, running=0, waiting=0, freeness=math.inf, stats=migration_stats([]))
    ]
    samples = scrape(collector)
    assert value(samples, "llumnix_migration_downtime_seconds_count") == 0
    assert value(samples, "llumnix_migration_downtime_seconds_bucket", le="+Inf") == 0
    assert value(samples, "llumnix_migration_downtime_seconds_sum") == 0
    assert value(samples, "llumnix_migrations_total", instance="a", outcome="committed") == 0


def test_nothing_cached_yet_shows_no_instance() -> None:
    samples = scrape(ClusterMetrics(EndpointPool("127.0.0.1:1")))
    assert not [key for key in samples if key[0].startswith("llumnix_instance_")]
    assert not [key for key in samples if key[0].startswith("llumnix_migration_downtime_seconds_")]


class Admin(admin_pb2_grpc.AdminServiceServicer):
    """Answers ListInstances with whatever the test put in ``instances``."""

    def __init__(self) -> None:
        self.instances: list[scheduler_pb2.InstanceStatus] = []
        self.calls = 0

    async def ListInstances(
        self, request: admin_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListInstancesResponse:
        self.calls += 1
        return admin_pb2.ListInstancesResponse(instances=self.instances)


@pytest.fixture
async def admin() -> AsyncIterator[tuple[Admin, RunningServer]]:
    servicer = Admin()  # type: ignore[abstract]  # only ListInstances is served
    server = await start_server(
        [(admin_pb2_grpc.add_AdminServiceServicer_to_server, servicer, "llumnix.v1.AdminService")]
    )
    yield servicer, server
    await server.stop(None)


async def test_refresh_reads_the_scheduler_and_a_scrape_shows_the_latest_answer(
    admin: tuple[Admin, RunningServer],
) -> None:
    servicer, server = admin
    pool = EndpointPool(server.address)
    collector = ClusterMetrics(pool)
    try:
        servicer.instances = two_instances()
        await collector.refresh()
        first = scrape(collector)
        assert value(first, "llumnix_instance_used_blocks", instance="a") == 70
        assert value(first, "llumnix_migration_downtime_seconds_count") == 7
        # the scheduler's view changes: a finished a request (+20 free) and committed one more migration of 3 ms
        servicer.instances = two_instances()
        servicer.instances[0].load.free_blocks = 50
        servicer.instances[0].load.migration_stats.CopyFrom(migration_stats([*A_DOWNTIMES, 3.0], 2, 1))
        assert value(scrape(collector), "llumnix_instance_used_blocks", instance="a") == 70, "a scrape never calls"
        await collector.refresh()
        second = scrape(collector)
        assert value(second, "llumnix_instance_used_blocks", instance="a") == 50
        assert value(second, "llumnix_migrations_total", instance="a", outcome="committed") == 5
        assert value(second, "llumnix_migration_downtime_seconds_count") == 8
        assert value(second, "llumnix_migration_downtime_seconds_bucket", le="0.005") == 5
        assert servicer.calls == 2
    finally:
        await pool.close()


async def test_background_refresh_keeps_the_last_answer_when_the_scheduler_goes_away(
    admin: tuple[Admin, RunningServer],
) -> None:
    servicer, server = admin
    pool = EndpointPool(server.address, timeout=0.3, connect_timeout=0.3, rounds=1)
    collector = ClusterMetrics(pool, interval=0.05)
    servicer.instances = two_instances()
    collector.start()
    try:
        scrape(collector)  # someone looks: the refresh runs
        for _ in range(200):
            if collector.instances:
                break
            await asyncio.sleep(0.01)
        assert [s.info.instance_id for s in collector.instances] == ["a", "b"]
        await server.stop(None)
        calls = servicer.calls
        await asyncio.sleep(0.5)  # several failed refreshes: logged, the loop goes on, the cache stays
        assert servicer.calls == calls
        assert collector._task is not None and not collector._task.done()
        assert value(scrape(collector), "llumnix_instance_used_blocks", instance="a") == 70
    finally:
        await collector.stop()
        await pool.close()


async def test_no_scrape_no_call_to_the_scheduler_and_the_refresh_stops_when_scrapes_do(
    admin: tuple[Admin, RunningServer],
) -> None:
    """The refresh asks the leader for every instance's status (O(instances)) every ``interval``: only while someone
    scrapes. Before: ListInstances every second from start, scraped or not."""
    servicer, server = admin
    pool = EndpointPool(server.address)
    collector = ClusterMetrics(pool, interval=0.02, idle_after=0.3)
    servicer.instances = two_instances()
    collector.start()
    try:
        await asyncio.sleep(0.3)
        assert servicer.calls == 0, "nobody scraped: no ListInstances"
        assert scrape(collector) is not None and not collector.instances  # the first scrape shows the empty cache
        for _ in range(300):
            if collector.instances:
                break
            await asyncio.sleep(0.01)
        assert [s.info.instance_id for s in collector.instances] == ["a", "b"]
        # 5x idle_after since that scrape: the refresh went quiet long ago, even if a loaded CI delivered a call
        # started before idle_after late (at a 0.02 s interval, a refresh that never stops adds ~25 calls below).
        await asyncio.sleep(1.5)
        calls = servicer.calls
        assert calls >= 2
        await asyncio.sleep(0.5)
        assert servicer.calls == calls, "no scrape for idle_after: no more calls"
        servicer.instances[0].load.free_blocks = 50
        scrape(collector)  # a scrape wakes it again
        for _ in range(300):
            if value(scrape(collector), "llumnix_instance_used_blocks", instance="a") == 50:
                break
            await asyncio.sleep(0.01)
        assert servicer.calls > calls
        assert value(scrape(collector), "llumnix_instance_used_blocks", instance="a") == 50
    finally:
        await collector.stop()
        await pool.close()


async def test_a_scrape_from_another_thread_wakes_the_refresh(admin: tuple[Admin, RunningServer]) -> None:
    servicer, server = admin
    pool = EndpointPool(server.address)
    collector = ClusterMetrics(pool, interval=0.02)
    servicer.instances = two_instances()
    collector.start()
    try:
        await asyncio.to_thread(scrape, collector)
        for _ in range(300):
            if collector.instances:
                break
            await asyncio.sleep(0.01)
        assert [s.info.instance_id for s in collector.instances] == ["a", "b"]
    finally:
        await collector.stop()
        await pool.close()
