"""A llumlet keeps reporting its load through faults of its own (LEFT2 #1).

Before: one exception while building a report (``load_pb`` inside the request generator) made grpc cancel the
ReportLoad call; ``await stub.ReportLoad`` then raised ``CancelledError``, which passed the reporter's
``except Exception``: the stream task ended silently and no new one opened until the leader changed. The leader saw
the instance go stale and stopped dispatching to it for good. Now a failed tick is skipped (warned, rate-limited) and a
stream cancelled under the reporter (not by its own cancellation) is reopened after a short pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.data_plane.llumlet import reporter as reporter_module
from pyllumnix.data_plane.llumlet.reporter import LoadReporter
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import common_pb2, scheduler_pb2_grpc
from tests.test_load_reporting import FakeLlumlet, wait_for


class FlakyLlumlet(FakeLlumlet):
    """``load_pb`` raises on the calls numbered in ``fail_on`` (1-based), as an engine bug or race would."""

    def __init__(self, fail_on: set[int]) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on = fail_on

    def load_pb(self) -> common_pb2.InstanceLoad:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"engine race on call {self.calls}")
        return super().load_pb()


def leader() -> SchedulerReplica:
    r = SchedulerReplica(cast(Any, object()), KeyLayout("c1"), "s0", "127.0.0.1:1")
    r.require_leader = lambda: None  # type: ignore[method-assign]
    r.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:1"))
    return r


@pytest.fixture
async def served() -> AsyncIterator[tuple[SchedulerReplica, str]]:
    replica = leader()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(replica), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield replica, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def stopped(task: asyncio.Task[None]) -> None:
    """Cancels the stream task and checks that it ends (its own cancellation is never taken for a broken stream)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(5.0):
            await task
    assert task.done()


def new_reporter(llumlet: FakeLlumlet) -> LoadReporter:
    return LoadReporter(cast(Any, llumlet), cast(Any, object()), KeyLayout("c1"), interval_s=0.01)


async def test_a_report_that_fails_to_build_is_skipped_and_reports_go_on(
    served: tuple[SchedulerReplica, str], caplog: pytest.LogCaptureFixture
) -> None:
    replica, address = served
    llumlet = FlakyLlumlet(fail_on={2})  # the first load goes out, the second build raises
    rep = new_reporter(llumlet)
    task = asyncio.get_running_loop().create_task(rep._stream_to(address))
    try:
        with caplog.at_level(logging.WARNING, logger=reporter_module.__name__):
            await wait_for(lambda: llumlet.calls >= 3, "the load is read again after the failure")
            llumlet.free_blocks = 42
            # Old code: the stream task had ended (CancelledError) and nothing reached the leader again.
            await wait_for(
                lambda: "i-1" in replica.cluster.loads and replica.cluster.loads["i-1"].free_blocks == 42,
                "a change after the failed tick reaches the leader",
            )
        assert not task.done()
        assert rep.streams_ended == 0, "one failed tick does not cost the stream"
        assert rep.report_failures == 1
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "i-1" in r.getMessage()]
        assert warned and "engine race on call 2" in warned[0].getMessage()
    finally:
        await stopped(task)


async def test_report_build_failures_are_warned_at_a_limited_rate(caplog: pytest.LogCaptureFixture) -> None:
    llumlet = FlakyLlumlet(fail_on=set(range(1, 1000)))
    rep = LoadReporter(cast(Any, llumlet), cast(Any, object()), KeyLayout("c1"), interval_s=0.0)
    stream = rep._reports()
    with caplog.at_level(logging.WARNING, logger=reporter_module.__name__):
        task = asyncio.get_running_loop().create_task(anext(stream))
        await wait_for(lambda: llumlet.calls >= 200, "the load is read every tick though every build fails")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await stream.aclose()
    assert rep.report_failures >= 200
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, "one warning per REPORT_WARN_EVERY_S, not one per tick"


async def test_a_stream_cancelled_under_the_reporter_is_reopened(
    served: tuple[SchedulerReplica, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc cancels a call whose request iterator fails (or for reasons of its own): ``await ReportLoad`` raises
    CancelledError although nobody cancelled the reporter. Old code: the stream task ended there, for good."""
    replica, address = served
    real = scheduler_pb2_grpc.SchedulerServiceStub
    opened: list[int] = []

    class Stub:
        def __init__(self, channel: grpc.aio.Channel) -> None:
            self.real = real(channel)
            opened.append(1)

        async def ReportLoad(self, requests: Any) -> Any:
            if len(opened) == 1:
                raise asyncio.CancelledError()  # what grpc.aio raises for a call it cancelled itself
            return await self.real.ReportLoad(requests)

    monkeypatch.setattr(scheduler_pb2_grpc, "SchedulerServiceStub", Stub)  # looked up at each stream
    rep = new_reporter(FakeLlumlet())
    task = asyncio.get_running_loop().create_task(rep._stream_to(address))
    try:
        with caplog.at_level(logging.WARNING, logger=reporter_module.__name__):
            await wait_for(lambda: "i-1" in replica.cluster.loads, "the reopened stream reaches the leader")
        assert len(opened) == 2 and rep.streams_ended == 1
        assert any("i-1" in r.getMessage() and "cancelled" in r.getMessage() for r in caplog.records)
    finally:
        await stopped(task)


async def test_the_reporters_own_cancellation_still_ends_the_stream(served: tuple[SchedulerReplica, str]) -> None:
    replica, address = served
    rep = new_reporter(FakeLlumlet())
    task = asyncio.get_running_loop().create_task(rep._stream_to(address))
    await wait_for(lambda: "i-1" in replica.cluster.loads, "the stream is up")
    await stopped(task)
    assert task.cancelled()
