"""The scheduler freezes its startup heap (``main.freeze_startup_heap``, called by ``run_scheduler`` once the replica
runs): the objects alive then are out of the collector's passes, so a pass of the oldest generation no longer walks
the imported modules with the event loop stopped (~50 ms each under ``llumnix bench dispatch`` before, ~5 ms after)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pyllumnix.control_plane.scheduler.main import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # this test process collects its objects again


def test_objects_alive_at_startup_leave_the_collectors_passes(unfrozen: None) -> None:
    alive = {"a": [1, 2, 3]}  # tracked by the collector, like the modules' and the replica's objects
    assert any(o is alive for o in gc.get_objects())
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects())  # no generation holds it: no pass walks it
    later = {"b": [4]}
    assert any(o is later for o in gc.get_objects())  # what the leader allocates afterwards is collected as usual


def test_run_scheduler_freezes_once_the_replica_runs() -> None:
    """The call sits in ``run_scheduler`` right after the replica started (source check: the function needs etcd)."""
    import inspect

    from pyllumnix.control_plane.scheduler import main

    source = inspect.getsource(main.run_scheduler)
    assert source.index("await replica.start()") < source.index("freeze_startup_heap()") < source.index('"ready"')
