"""The destination's reaper of silent migrations (``MigrationCoordinator._reap_pending``) sleeps while nothing is
incoming: an idle llumlet woke 4 times a second to find no reservation (~1 ms of CPU a second per llumlet here, part
of the idle cost every run of ``llumnix bench peers`` pays per request)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator
from pyllumnix.data_plane.transport import make_transport


async def test_the_reaper_sleeps_while_nothing_is_incoming(monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator = MigrationCoordinator(Llumlet(SimEngine("tiny"), "x"), make_transport("inproc"))
    real_sleep = asyncio.sleep
    reaper_sleeps = 0

    async def spy(delay: float, *args: Any, **kwargs: Any) -> Any:
        nonlocal reaper_sleeps
        if asyncio.current_task() is coordinator._reaper:
            reaper_sleeps += 1
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", spy)
    coordinator.start()
    try:
        await real_sleep(0.7)
        assert reaper_sleeps == 0, f"the reaper polled {reaper_sleeps} times with nothing incoming"
        coordinator._incoming_added.set()  # (a reservation's arrival wakes it; with none it goes back to sleep)
        await real_sleep(0.05)
        assert reaper_sleeps == 0
    finally:
        await coordinator.close()
