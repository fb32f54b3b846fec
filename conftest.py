"""Fixtures shared by ``tests/`` and ``integration/`` (pytest loads this conftest for both)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator
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
