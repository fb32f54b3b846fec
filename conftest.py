"""Fixtures shared by ``tests/`` and ``integration/`` (pytest loads this conftest for both)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pyllumnix.tools.recording_sink import RecordingSink


@pytest.fixture
async def sink() -> AsyncIterator[RecordingSink]:
    """A real OutputSink gRPC server recording what llumlets push to it."""
    s = RecordingSink()
    await s.start()
    yield s
    await s.stop()
