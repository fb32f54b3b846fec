"""A replica's watch/loop bodies restart after failures. One that keeps failing at once (an operator's etcd role
without the ``frontends/`` grant: every watch is refused) used to log a full traceback every 0.2 s per replica; now
the traceback is logged once per streak, then one line per restart at growing intervals."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pyllumnix.control_plane.scheduler import replica as replica_module
from pyllumnix.control_plane.scheduler.replica import restart_delay
from tests.test_replica_leadership import make_replica

LOGGER = "pyllumnix.control_plane.scheduler.replica"


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0), (50, 2.0), (10_000, 2.0)]
)
def test_restarts_back_off_to_a_short_cap(failures: int, delay: float) -> None:
    assert restart_delay(failures) == pytest.approx(delay)


async def run_failing(errors: list[Exception], *, back_off: bool = True) -> None:
    """Runs a replica's ``_forever`` on a body (named like the frontends watch) that raises ``errors`` in turn, until
    it raised the last one."""
    replica, _ = make_replica((), [])
    done = asyncio.Event()

    async def watch_frontends() -> None:
        error = errors.pop(0)
        if not errors:
            done.set()
        raise error

    task = asyncio.get_running_loop().create_task(replica._forever(watch_frontends, back_off=back_off))
    try:
        await asyncio.wait_for(done.wait(), timeout=30)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def run_failing_body(calls_wanted: int) -> None:
    """A body refused every time (etcd denies a key), until it ran ``calls_wanted`` times."""
    await run_failing([PermissionError("etcdserver: permission denied") for _ in range(calls_wanted)])


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "watch_frontends" in r.getMessage()]


async def test_a_body_failing_at_once_logs_its_traceback_once_per_streak(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_module, "RESTART_FIRST_S", 0.001)
    monkeypatch.setattr(replica_module, "RESTART_MAX_S", 0.004)
    caplog.set_level(logging.INFO, logger=LOGGER)
    await run_failing_body(6)
    logged = records(caplog)
    with_traceback = [r for r in logged if r.exc_info]
    assert len(with_traceback) == 1, [r.getMessage() for r in logged]
    again = [r.getMessage() for r in logged if not r.exc_info]
    assert len(again) >= 4 and all("failed again" in m and "permission denied" in m for m in again), again
    assert "(5 in a row)" in again[3] and "restarting in 0.0 s" in again[3]


async def test_a_failure_after_a_healthy_run_starts_a_new_streak(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that ran for ``RESTART_HEALTHY_S`` before failing restarts at once again, with its traceback."""
    monkeypatch.setattr(replica_module, "RESTART_FIRST_S", 0.001)
    monkeypatch.setattr(replica_module, "RESTART_HEALTHY_S", 0.0)  # every run counts as healthy
    caplog.set_level(logging.INFO, logger=LOGGER)
    await run_failing_body(3)
    assert len([r for r in records(caplog) if r.exc_info]) >= 3


async def test_a_new_error_in_a_streak_gets_its_traceback_and_election_loops_never_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """REVIEW11: a streak logged only its first error's traceback, and the campaign and leader-observe loops backed
    off like the watches (up to 2 s more to a failover after an etcd outage)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    await run_failing(
        [PermissionError("denied"), PermissionError("denied"), KeyError("other"), KeyError("other")], back_off=False
    )
    logged = records(caplog)
    assert [bool(r.exc_info) for r in logged] == [True, False, True, False], [r.getMessage() for r in logged]
    assert all("restarting in 0.2 s" in r.getMessage() for r in logged), [r.getMessage() for r in logged]
