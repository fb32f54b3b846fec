"""Clocks for driving an engine in real time (a live llumlet) or virtual time (the simulator).

The engine never reads a clock: ``step(now)`` returns a duration. Real time: ``StepPacer`` calls ``step`` and then
sleeps until the step's modelled end. Virtual time: the simulator calls ``step(clock.now())`` and
``clock.advance(duration)`` (``VirtualClock.sleep`` does the same without waiting), scheduling the outputs at the new
time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from pyllumnix.data_plane.engine.base import Engine, StepResult


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, monotonic."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """Time moves only when told to; sleeping advances it at once."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("virtual time cannot go back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))


class StepPacer:
    """Runs engine steps so each lasts its modelled duration on ``clock``.

    Step k+1 is due at the previous step's due time plus its duration, so an oversleep in one step (timer granularity,
    the work ``step`` itself did) is taken out of the next sleep and the long-run pace matches the model. After an
    idle step, or when more than ``max_lag`` seconds behind (computation slower than modelled), it restarts from now.
    """

    def __init__(self, engine: Engine, clock: Clock, *, max_lag: float = 0.02) -> None:
        self.engine = engine
        self.clock = clock
        self.max_lag = max_lag
        self._due: float | None = None

    async def step(self) -> StepResult:
        now = self.clock.now()
        start = now if self._due is None or now - self._due > self.max_lag else self._due
        result = self.engine.step(start)
        if result.duration <= 0:
            self._due = None
            return result
        self._due = start + result.duration
        await self.clock.sleep(self._due - self.clock.now())
        return result
