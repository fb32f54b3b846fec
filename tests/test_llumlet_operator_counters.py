"""Counters an operator must see grow are Prometheus series on the llumlet's ``/metrics``, not plain attributes:
``llumnix_llumlet_late_adds_refused_total`` (AddRequests refused because their caller had given up: a frontend timing
out on this instance) and ``llumnix_llumlet_load_report_failures_total`` (load-report ticks skipped: the scheduler
leader sees a stale instance).

Before, both lived only as attributes (``LlumletServicer.late_adds_refused``, ``LoadReporter.report_failures``) that
nothing exported: a scrape had neither series.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyllumnix.data_plane.llumlet.main import LlumletOptions, run_llumlet, streams_opened
from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics
from pyllumnix.data_plane.llumlet.reporter import LoadReporter
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from tests.test_llumlet_metrics import load
from tests.test_load_reporting import FakeLlumlet

LATE = "llumnix_llumlet_late_adds_refused_total"
FAILURES = "llumnix_llumlet_load_report_failures_total"


def sample(text: str, name: str, instance: str) -> float | None:
    """The value of ``name{instance=...}`` in an exposition (None: no such series)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("instance") == instance:
                return float(s.value)
    return None


def instance_metrics(**counters: Any) -> InstanceMetrics:
    """Instance ``i0``'s metrics with the given counter sources (the rest idle)."""
    return InstanceMetrics("i0", "m", load, common_pb2.MigrationStats, list, **counters)


def test_the_counters_are_read_at_scrape_time() -> None:
    counts = {"late": 0}
    reporter = LoadReporter(cast(Any, FakeLlumlet()), cast(Any, object()), KeyLayout("c1"))
    metrics = instance_metrics(
        late_adds_refused=lambda: counts["late"], report_failures=lambda: reporter.report_failures
    )
    text = metrics.render().decode()
    assert sample(text, LATE, "i0") == 0 and sample(text, FAILURES, "i0") == 0, "exported from the start, at 0"
    counts["late"] = 3
    reporter._report_failed(RuntimeError("engine race"))
    reporter._report_failed(RuntimeError("engine race"))
    text = metrics.render().decode()
    assert sample(text, LATE, "i0") == 3 and sample(text, FAILURES, "i0") == 2
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types[LATE.removesuffix("_total")] == types[FAILURES.removesuffix("_total")] == "counter"


@pytest.fixture
async def llumlet(capsys: pytest.CaptureFixture[str]) -> AsyncIterator[dict[str, Any]]:
    """A whole llumlet (``run_llumlet``, no etcd) in this process; yields its ready line."""
    stop = asyncio.Event()
    opts = LlumletOptions(instance_id="ops-1", profile="tiny", payload=False, transport="tcp", metrics_port=0)
    task = asyncio.get_running_loop().create_task(run_llumlet(opts, stop))
    try:
        async with asyncio.timeout(30):
            while True:
                assert not task.done(), "the llumlet ended before it was ready"
                lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
                ready = [x for x in lines if x.get("event") == "ready"]
                if ready:
                    break
                await asyncio.sleep(0.05)
        yield ready[0]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await task


def test_the_streams_opened_are_exported_by_transport() -> None:
    """Which transport carries a llumlet's outputs and load reports (the peer's framed port, or gRPC when it offers
    none or cannot be reached) is a series an operator can alert on: ``llumnix_llumlet_streams_opened_total``."""

    class Pusher:
        framed_streams, grpc_streams = 3, 1

    class Reporter:
        framed_streams, grpc_streams = 0, 2

    def opened() -> dict[tuple[str, str], float]:
        return {
            (s.labels["stream"], s.labels["transport"]): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples
            if s.name == "llumnix_llumlet_streams_opened_total" and s.labels.get("instance") == "i0"
        }

    reporter: Reporter | None = Reporter()
    metrics = instance_metrics(streams_opened=lambda: streams_opened(cast(Any, Pusher()), cast(Any, reporter)))
    assert opened() == {("outputs", "framed"): 3, ("outputs", "grpc"): 1, ("load", "framed"): 0, ("load", "grpc"): 2}
    reporter = None  # a llumlet without etcd runs no reporter: only the output streams
    assert opened() == {("outputs", "framed"): 3, ("outputs", "grpc"): 1}


async def test_a_refused_late_add_shows_on_the_llumlets_metrics(llumlet: dict[str, Any]) -> None:
    """Through the llumlet's own wiring: an abort overtakes its AddRequest, the add is refused (ABORTED), and the
    scrape counts it. Old code: no such series."""
    url = f"http://{llumlet['metrics_address']}/metrics"
    async with aiohttp.ClientSession() as session:

        async def scrape() -> str:
            async with session.get(url, timeout=aiohttp.ClientTimeout(10)) as reply:
                assert reply.status == 200
                return await reply.text()

        before = await scrape()
        assert sample(before, LATE, "ops-1") == 0
        assert sample(before, FAILURES, "ops-1") == 0, "no etcd, no reporter: nothing failed"
        async with grpc.aio.insecure_channel(llumlet["grpc_address"]) as channel:
            stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="gone"), timeout=10)
            request = common_pb2.EngineRequest(
                request_id="gone", prompt_token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=2)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=request), timeout=10)
            assert err.value.code() == grpc.StatusCode.ABORTED
        assert sample(await scrape(), LATE, "ops-1") == 1
