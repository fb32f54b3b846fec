"""Migration hooks of the sim engine: suspend/resume is lossless, and moving a request's blocks to another engine
(multi-stage copy, then commit) continues exactly the token stream it would have produced unmigrated."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import (
    InvalidRequestError,
    InvalidStateError,
    OutOfBlocksError,
    Phase,
    RequestSpec,
    Sampling,
    StepResult,
)
from pyllumnix.data_plane.engine.payload import expected_block_bytes
from pyllumnix.data_plane.engine.sim import SimEngine


def spec(rid: str, prompt_len: int, max_tokens: int = 40, arrival: float = 0.0) -> RequestSpec:
    return RequestSpec(rid, tuple(range(3, prompt_len + 3)), Sampling(max_tokens=max_tokens), arrival_time=arrival)


class Collector:
    """Merges outputs by index, as the frontend does across migrations."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}

    def add(self, result: StepResult) -> None:
        for out in result.outputs:
            got = self.tokens.setdefault(out.request_id, [])
            assert out.first_index == len(got), (out, len(got))
            got.extend(out.token_ids)


def step_n(engine: SimEngine, n: int, sink: Collector, t: float = 0.0) -> float:
    for _ in range(n):
        result = engine.step(t)
        t += result.duration
        sink.add(result)
    return t


def drain(engine: SimEngine, sink: Collector, t: float = 0.0) -> float:
    while engine.has_work():
        t = step_n(engine, 1, sink, t)
    return t


def reference(specs: list[RequestSpec]) -> dict[str, list[int]]:
    sink = Collector()
    for s in specs:
        engine = SimEngine("tiny")
        engine.add_request(s, 0.0)
        drain(engine, sink)
    return sink.tokens


def test_suspend_resume_of_running_request_is_lossless() -> None:
    def make() -> SimEngine:
        engine = SimEngine("tiny", total_blocks=16, max_model_len=128)
        for i in range(4):
            engine.add_request(spec(f"r{i}", 20 + 9 * i, max_tokens=60), 0.0)
        return engine

    twin, engine = make(), make()
    a, b = Collector(), Collector()
    step_n(twin, 5, a)
    step_n(engine, 5, b)
    before = engine.load()
    order = [r.request_id for r in engine.scheduler.running]
    blocks = engine.block_ids("r1")
    data = engine.read_blocks(blocks)
    state = engine.suspend("r1")
    assert engine.phase("r1") is Phase.SUSPENDED
    assert state.num_computed_tokens == engine.num_computed_tokens("r1") == 29 + 4
    assert state.output_token_ids == tuple(b.tokens["r1"])
    assert engine.export_state("r1") == state
    suspended = engine.load()
    assert (suspended.num_running, suspended.free_blocks) == (before.num_running - 1, before.free_blocks)
    engine.resume("r1")
    assert engine.load() == before
    assert [r.request_id for r in engine.scheduler.running] == order
    assert engine.block_ids("r1") == blocks
    np.testing.assert_array_equal(engine.read_blocks(blocks), data)
    drain(twin, a)
    drain(engine, b)
    assert a.tokens == b.tokens
    assert engine.load().free_blocks == 16


def test_suspended_request_pauses_and_keeps_its_slot() -> None:
    engine = SimEngine("tiny", max_num_seqs=2)
    for rid in ("a", "b", "c"):
        engine.add_request(spec(rid, 10), 0.0)
    sink = Collector()
    step_n(engine, 1, sink)
    engine.suspend("a")
    step_n(engine, 3, sink)
    assert len(sink.tokens["a"]) == 1  # no progress while suspended
    assert "c" not in sink.tokens  # its batch slot stays held
    engine.resume("a")
    drain(engine, sink)
    assert sink.tokens == reference([spec(r, 10) for r in "abc"])


def test_suspend_resume_of_waiting_request_keeps_queue_position() -> None:
    engine = SimEngine("tiny", max_num_seqs=1)
    for i, rid in enumerate(("run", "w1", "w2", "w3")):
        engine.add_request(spec(rid, 10, arrival=float(i)), 0.0)
    engine.step(0.0)
    state = engine.suspend("w2")
    assert (state.num_computed_tokens, engine.block_ids("w2")) == (0, [])
    engine.add_request(spec("late", 10, arrival=9.0), 0.0)
    engine.resume("w2")
    assert [r.request_id for r in engine.scheduler.waiting] == ["w1", "w2", "w3", "late"]


def migrate(src: SimEngine, dst: SimEngine, rid: str, sink: Collector, precopy_steps: int) -> float:
    """Llumnix-style: stage 0 copies all blocks but the last while the request keeps decoding, the last stage
    suspends it, copies the rest and commits on the destination."""
    ids0 = src.block_ids(rid)[:-1]
    dst0 = dst.reserve_blocks(len(ids0))
    dst.write_blocks(dst0, src.read_blocks(ids0))
    t = step_n(src, precopy_steps, sink)
    state = src.suspend(rid)
    rest = src.block_ids(rid)[len(ids0) :]
    dst1 = dst.reserve_blocks(len(rest))
    assert dst.load().reserved_blocks == len(ids0) + len(rest)
    dst.write_blocks(dst1, src.read_blocks(rest))
    dst.commit_incoming(state, dst0 + dst1, t)
    src.release_suspended(rid)
    return t


@pytest.mark.parametrize("payload", [True, False])
def test_migrating_a_running_request_continues_the_same_stream(payload: bool) -> None:
    specs = [spec("m", 40, max_tokens=80), spec("s1", 30, max_tokens=50)]
    src = SimEngine("tiny", payload=payload)
    dst = SimEngine("tiny", payload=payload)
    for s in specs:
        src.add_request(s, 0.0)
    dst.add_request(spec("d1", 25, max_tokens=30), 0.0)
    sink = Collector()
    step_n(src, 6, sink)
    step_n(dst, 2, sink)
    migrate(src, dst, "m", sink, precopy_steps=20)
    assert "m" not in src.request_ids() and dst.phase("m") is Phase.RUNNING
    assert dst.load().reserved_blocks == 0
    step_n(dst, 7, sink)
    n = dst.num_computed_tokens("m")
    if payload:
        for i, row in enumerate(dst.read_blocks(dst.block_ids("m"))):
            expected = expected_block_bytes("m", i, n, block_size=16, bytes_per_token=2048)
            np.testing.assert_array_equal(row, expected)
    drain(src, sink)
    drain(dst, sink)
    assert sink.tokens == reference([*specs, spec("d1", 25, max_tokens=30)])
    assert src.load().free_blocks == dst.load().free_blocks == 64


def test_migrated_request_is_first_preemption_victim_on_destination() -> None:
    src = SimEngine("tiny")
    dst = SimEngine("tiny", total_blocks=12, max_model_len=128)
    src.add_request(spec("m", 60, max_tokens=60), 0.0)
    dst.add_request(spec("d", 60, max_tokens=60), 0.0)
    sink = Collector()
    step_n(src, 2, sink)
    step_n(dst, 2, sink)
    migrate(src, dst, "m", sink, precopy_steps=1)
    preempted: list[str] = []
    t = 0.0
    while dst.has_work():
        result = dst.step(t)
        t += result.duration
        sink.add(result)
        preempted += result.preempted
    assert preempted and preempted[0] == "m"
    assert sink.tokens == reference([spec("m", 60, max_tokens=60), spec("d", 60, max_tokens=60)])


def test_migrating_waiting_and_preempted_requests() -> None:
    src = SimEngine("tiny", total_blocks=8, max_model_len=128, max_num_seqs=2)
    specs = [spec("r0", 32, max_tokens=60), spec("r1", 32, max_tokens=60, arrival=1.0), spec("w", 8, arrival=2.0)]
    for s in specs:
        src.add_request(s, 0.0)
    sink = Collector()
    t = 0.0
    while not src.load().num_preempted:
        t = step_n(src, 1, sink, t)
    dst = SimEngine("tiny")
    dst.add_request(spec("d_early", 8, arrival=0.5), 0.0)
    dst.add_request(spec("d_late", 8, arrival=5.0), 0.0)
    dst.add_request(spec("d_run", 8, arrival=0.0), 0.0)
    for rid in ("r1", "w"):  # r1 was preempted (outputs, no KV); w never ran
        assert src.phase(rid) is Phase.WAITING
        state = src.suspend(rid)
        assert state.num_computed_tokens == 0
        reserved = dst.reserve_blocks(dst.scheduler.blocks_for(len(state.spec.prompt_token_ids) + 1))
        dst.commit_incoming(state, reserved, t)
        src.release_suspended(rid)
    assert dst.load().reserved_blocks == 0 and dst.load().free_blocks == 64
    waiting = [r.request_id for r in dst.scheduler.waiting]
    assert waiting == ["d_run", "d_early", "r1", "w", "d_late"]
    load = dst.load()
    assert {r.request_id: r.num_preemptions for r in load.requests}["r1"] == 1
    assert load.num_preempted == 1  # r1 still awaits its recompute
    drain(src, sink)
    drain(dst, sink)
    assert sink.tokens == reference([*specs, spec("d_early", 8), spec("d_late", 8), spec("d_run", 8)])


def test_destination_abort_resumes_on_source_and_frees_reservation() -> None:
    src, twin = SimEngine("tiny"), SimEngine("tiny")
    dst = SimEngine("tiny", watermark=0.25)
    for engine in (src, twin):
        engine.add_request(spec("m", 50, max_tokens=30), 0.0)
    a, b = Collector(), Collector()
    step_n(src, 3, a)
    step_n(twin, 3, b)
    reserved = dst.reserve_blocks(3)
    assert (dst.load().free_blocks, dst.load().reserved_blocks) == (61, 3)
    dst.write_blocks(reserved, src.read_blocks(src.block_ids("m")[:3]))
    with pytest.raises(OutOfBlocksError):
        dst.reserve_blocks(61 - 16 + 1)  # would go below the 16-block watermark
    src.suspend("m")
    dst.free_reserved(reserved)
    src.resume("m")
    assert (dst.load().free_blocks, dst.load().reserved_blocks) == (64, 0)
    assert dst.payload.num_materialized == 0
    drain(src, a)
    drain(twin, b)
    assert a.tokens == b.tokens


def test_commit_validates_blocks_and_state() -> None:
    src, dst = SimEngine("tiny"), SimEngine("tiny")
    src.add_request(spec("m", 40, max_tokens=30), 0.0)
    for t in range(3):
        src.step(float(t))
    state = src.suspend("m")  # 42 computed tokens: 3 blocks
    with pytest.raises(InvalidStateError):
        dst.commit_incoming(state, dst.reserve_blocks(2), 0.0)
    with pytest.raises(InvalidStateError):
        dst.commit_incoming(state, [0, 1, 2], 0.0)  # not reserved
    too_far = dataclasses.replace(state, num_computed_tokens=40 + 3)
    with pytest.raises(InvalidRequestError):
        dst.commit_incoming(too_far, dst.reserve_blocks(3), 0.0)
    assert dst.request_ids() == []


def test_waiting_request_migrates_only_where_it_can_be_admitted() -> None:
    """A request without KV is committed only if the destination could admit it now (its demand behind the waiting
    requests ahead of it, above the watermark); otherwise the commit raises OutOfBlocksError (a destination abort:
    the source resumes it), and nothing leaks. Before, it was queued there whatever the destination held."""
    src = SimEngine("tiny")
    src.add_request(spec("w", 200, arrival=3.0), 0.0)
    dst = SimEngine("tiny", total_blocks=32)
    dst.add_request(spec("big", 300, max_tokens=200, arrival=0.0), 0.0)
    dst.step(0.0)  # big runs on 19 of 32 blocks: 13 free, w needs 13 (200 tokens + 1)
    dst.add_request(spec("queued", 40, arrival=1.0), 0.0)  # 3 blocks ahead of w
    state = src.suspend("w")
    with pytest.raises(OutOfBlocksError):
        dst.commit_incoming(state, [], 0.0)
    assert dst.load().free_blocks == 13 and [r.request_id for r in dst.scheduler.waiting] == ["queued"]
    src.resume("w")
    assert src.phase("w") is Phase.WAITING
    # a request arriving before the queued one jumps it: only its own demand counts, and it fits
    src.add_request(spec("early", 150, arrival=0.5), 0.0)
    dst.commit_incoming(src.suspend("early"), [], 0.0)
    assert [r.request_id for r in dst.scheduler.waiting] == ["early", "queued"]
