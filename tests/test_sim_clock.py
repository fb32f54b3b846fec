"""Clocks and the real-time pacer: virtual time advances by modelled durations; the pacer keeps the long-run pace
equal to the model even when every sleep oversleeps."""

from __future__ import annotations

import pytest

from pyllumnix.data_plane.engine.base import RequestSpec, Sampling, StepResult
from pyllumnix.data_plane.engine.clock import RealClock, StepPacer, VirtualClock
from pyllumnix.data_plane.engine.sim import SimEngine


class RecordingEngine(SimEngine):
    def __init__(self) -> None:
        super().__init__("tiny")
        self.starts: list[float] = []
        self.add_request(RequestSpec("r", tuple(range(1, 30)), Sampling(max_tokens=10)), 0.0)

    def step(self, now: float) -> StepResult:
        self.starts.append(now)
        return super().step(now)


class OversleepingClock(VirtualClock):
    """Every sleep lasts 1 ms longer than asked, like a coarse timer."""

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds) + 0.001)


def test_virtual_clock() -> None:
    clock = VirtualClock(5.0)
    clock.advance(1.5)
    assert clock.now() == 6.5
    with pytest.raises(ValueError):
        clock.advance(-1.0)


async def test_virtual_sleep_advances_instantly() -> None:
    clock = VirtualClock()
    await clock.sleep(3.0)
    await clock.sleep(-1.0)
    assert clock.now() == 3.0


async def test_pacer_in_virtual_time_sums_durations() -> None:
    engine, clock = RecordingEngine(), VirtualClock()
    pacer = StepPacer(engine, clock)
    durations = []
    while engine.has_work():
        durations.append((await pacer.step()).duration)
    assert clock.now() == pytest.approx(sum(durations))
    assert engine.starts == pytest.approx([sum(durations[:i]) for i in range(len(durations))])


async def test_pacer_absorbs_oversleep() -> None:
    engine, clock = RecordingEngine(), OversleepingClock()
    pacer = StepPacer(engine, clock)
    durations = []
    while engine.has_work():
        durations.append((await pacer.step()).duration)
    # Only the last step's oversleep shows: the others were taken out of the following sleeps.
    assert clock.now() == pytest.approx(sum(durations) + 0.001)
    assert engine.starts == pytest.approx([sum(durations[:i]) for i in range(len(durations))])


async def test_pacer_restarts_after_idle_and_lag() -> None:
    engine, clock = RecordingEngine(), VirtualClock()
    pacer = StepPacer(engine, clock, max_lag=0.01)
    await pacer.step()
    clock.advance(1.0)  # the llumlet waited on something else for a long time
    called_at = clock.now()
    await pacer.step()
    assert engine.starts[1] == called_at  # not the stale due time
    while engine.has_work():
        await pacer.step()
    assert (await pacer.step()).duration == 0.0
    clock.advance(0.5)
    engine.add_request(RequestSpec("s", (1, 2), Sampling(max_tokens=1)), 0.0)
    called_at = clock.now()
    await pacer.step()
    assert engine.starts[-1] == called_at


async def test_real_clock_sleeps() -> None:
    clock = RealClock()
    t0 = clock.now()
    await clock.sleep(0.02)
    assert 0.015 <= clock.now() - t0 < 0.5
