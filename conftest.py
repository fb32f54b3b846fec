"""Fixtures shared by ``tests/`` and ``integration/`` (pytest loads this conftest for both)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyllumnix.tools.recording_sink import RecordingSink


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama the vLLM tests run (built locally: no model hub here), once per test session;
    ``LLUMNIX_TINY_MODEL`` names a directory to build it in (or reuse) instead of a temporary one."""
    from pyllumnix.tools.tiny_model import build_tiny_model

    path = os.environ.get("LLUMNIX_TINY_MODEL")
    return build_tiny_model(path if path else tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def private_context_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``llumnix serve`` (secure) writes a client context file: a temp one, never the user's own. Here, not in
    integration/, so that every test sees the same (under pytest-xdist a worker runs modules of both folders)."""
    path = tmp_path_factory.mktemp("context") / "context.yaml"
    old = os.environ.get("LLUMNIX_CONTEXT")
    os.environ["LLUMNIX_CONTEXT"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("LLUMNIX_CONTEXT", None)
        else:
            os.environ["LLUMNIX_CONTEXT"] = old


# Seconds before pytest-timeout fires at which every asyncio task's stack is written to the test's stderr: the timeout's
# own dump shows threads only, and a hung async test sits in the loop's epoll (CI once saw
# test_etcd_stall_does_not_move_leadership time out at 120 s on a loaded host, with nothing to say which await hung).
TASK_DUMP_LEAD_S = 5.0


def _dump_asyncio_tasks(name: str) -> None:
    """Best effort from a timer thread: task stacks are read while the loop may run (diagnostics only)."""
    try:
        tasks = list(asyncio.tasks._all_tasks)  # type: ignore[attr-defined]  # every loop's tasks (3.11)
    except RuntimeError:  # the set changed while copied
        return
    out = [f"\n=== {len(tasks)} asyncio tasks of {name}, {TASK_DUMP_LEAD_S:.0f} s before its timeout ==="]
    for task in tasks:
        if task.done():
            continue
        out.append(f"{task.get_name()}: {_await_chain(task.get_coro())}")
    sys.stderr.write("\n".join(out) + "\n")


def _await_chain(coro: Any) -> str:
    """``outer:line -> inner:line -> ...``: a suspended task's own stack has one frame; its awaits name the rest."""
    hops: list[str] = []
    while coro is not None and len(hops) < 40:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            hops.append(type(coro).__name__)
            break
        hops.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return " -> ".join(hops) or "(done)"


@pytest.fixture(autouse=True)
def _asyncio_tasks_before_timeout(request: pytest.FixtureRequest) -> Generator[None, None, None]:
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)
    if timeout <= TASK_DUMP_LEAD_S:
        yield
        return
    timer = threading.Timer(timeout - TASK_DUMP_LEAD_S, _dump_asyncio_tasks, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture
async def sink() -> AsyncIterator[RecordingSink]:
    """A real OutputSink gRPC server recording what llumlets push to it."""
    s = RecordingSink()
    await s.start()
    yield s
    await s.stop()


# Under CI (CI=true, set by .ci/run) a skipped test fails the run unless its reason is listed here: a dependency that
# went missing (vLLM, UCX) must not turn its tests into silent skips. Nothing is expected to skip today.
ALLOWED_CI_SKIPS: tuple[str, ...] = ()


def _unexpected_ci_skip(report: pytest.TestReport | pytest.CollectReport) -> bool:
    """Turns a skip into a failure under CI unless its reason is allowed; returns whether it did."""
    if not report.skipped or os.environ.get("CI", "").lower() not in ("true", "1") or hasattr(report, "wasxfail"):
        return False
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in ALLOWED_CI_SKIPS):
        return False
    report.outcome = "failed"
    report.longrepr = f"unexpected skip under CI ({reason}); fix the environment or add it to ALLOWED_CI_SKIPS"
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _unexpected_ci_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """A module-level ``pytest.importorskip`` skips at collection, before any test report exists."""
    outcome = yield
    _unexpected_ci_skip(outcome.get_result())
