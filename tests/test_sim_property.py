"""Property tests: under any interleaving of add / abort / step / suspend / resume / reserve, blocks are never lost
or shared, and every token a request emits is the one it emits when run alone."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllumnix.data_plane.engine.base import Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine

TOTAL = 12  # 96 token slots of 8: four requests of up to 80 tokens must preempt each other

Op = tuple[str, int, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 50), st.integers(1, 40)),
        st.tuples(
            st.sampled_from(["abort", "suspend", "resume", "reserve", "unreserve"]), st.integers(0, 20), st.just(0)
        ),
        st.tuples(st.just("step"), st.integers(1, 20), st.just(0)),
    ),
    max_size=60,
)
# Long requests and long runs of steps: memory pressure, so preemption and recompute happen in most examples.
pressure_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(20, 50), st.integers(20, 30)),
        st.tuples(st.sampled_from(["suspend", "resume"]), st.integers(0, 20), st.just(0)),
        st.tuples(st.just("step"), st.integers(5, 30), st.just(0)),
    ),
    min_size=8,
    max_size=30,
)


def make_spec(rid: str, prompt_len: int, max_tokens: int) -> RequestSpec:
    return RequestSpec(rid, tuple(range(7, 7 + prompt_len)), Sampling(max_tokens=max_tokens))


@functools.cache
def alone(rid: str, prompt_len: int, max_tokens: int) -> tuple[int, ...]:
    engine = SimEngine("tiny")
    engine.add_request(make_spec(rid, prompt_len, max_tokens), 0.0)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step(0.0).outputs:
            tokens += out.token_ids
    return tuple(tokens)


def check_blocks(engine: SimEngine, reservations: list[list[int]]) -> None:
    held = [b for rid in engine.request_ids() for b in engine.block_ids(rid)]
    reserved = [b for r in reservations for b in r]
    assert len(set(held + reserved)) == len(held) + len(reserved)
    load = engine.load()
    assert load.free_blocks + len(held) + len(reserved) == TOTAL
    assert load.reserved_blocks == len(reserved)
    for rid in engine.request_ids():
        assert len(engine.block_ids(rid)) == engine.scheduler.blocks_for(engine.num_computed_tokens(rid))
    assert engine.payload.num_materialized <= len(held)
    assert load.num_running <= engine.profile.max_num_seqs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_operations_keep_blocks_and_tokens(sequence: list[Op]) -> None:
    run_ops(sequence)


def test_memory_pressure_preempts_without_changing_tokens() -> None:
    """The invariants under memory pressure; and the pressure is real: at least a third of the generated cases preempt
    (counted over the run; 35 of 60 with the fixed seed), so a change that stops preemption, or a strategy that stops
    reaching it, fails here instead of passing on cases that never preempt."""
    preemptions: list[int] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(pressure_ops)
    def run(sequence: list[Op]) -> None:
        preemptions.append(run_ops(sequence))

    run()
    preempting = sum(1 for n in preemptions if n > 0)
    assert preempting >= len(preemptions) // 3, f"only {preempting} of {len(preemptions)} cases preempted"


def test_a_preempting_case_is_checked() -> None:
    """Two long requests outgrow the 12 blocks together: the newer one must be preempted and recomputed, and its
    tokens still equal the ones it produces alone (run_ops checks them)."""
    assert run_ops([("add", 40, 30), ("add", 40, 30), ("step", 60, 0), ("step", 60, 0)]) >= 1


def run_ops(sequence: list[Op]) -> int:
    """Applies the operations, checking invariants after each; returns the number of preemptions."""
    engine = SimEngine("tiny", block_size=8, total_blocks=TOTAL, max_model_len=80, max_num_seqs=4, watermark=0.1)
    shapes: dict[str, tuple[int, int]] = {}
    emitted: dict[str, list[int]] = {}
    reservations: list[list[int]] = []
    t = 0.0
    for i, (op, a, b) in enumerate(sequence):
        ids = engine.request_ids()
        if op == "add" and a + b <= 80:
            rid = f"r{i}"
            shapes[rid] = (a, b)
            engine.add_request(make_spec(rid, a, b), 0.0)
        elif op == "abort" and ids:
            rid = ids[a % len(ids)]
            assert engine.abort_request(rid).first_index == len(emitted.get(rid, []))
        elif op == "suspend" and ids:
            rid = ids[a % len(ids)]
            if engine.phase(rid) in (Phase.RUNNING, Phase.WAITING):
                state = engine.suspend(rid)
                assert list(state.output_token_ids) == emitted.get(rid, [])
        elif op == "resume":
            suspended = [r for r in ids if engine.phase(r) is Phase.SUSPENDED]
            if suspended:
                engine.resume(suspended[a % len(suspended)])
        elif op == "reserve" and engine.load().free_blocks - a % 4 >= engine.load().watermark_blocks:
            reservations.append(engine.reserve_blocks(a % 4))
        elif op == "unreserve" and reservations:
            engine.free_reserved(reservations.pop(a % len(reservations)))
        elif op == "step":
            for _ in range(a):
                result = engine.step(t)
                t += result.duration
                for out in result.outputs:
                    got = emitted.setdefault(out.request_id, [])
                    assert out.first_index == len(got)
                    got += out.token_ids
        check_blocks(engine, reservations)
    for rid, tokens in emitted.items():
        assert tuple(tokens) == alone(rid, *shapes[rid])[: len(tokens)]
    for rid in engine.request_ids():
        engine.abort_request(rid)
    for r in reservations:
        engine.free_reserved(r)
    load = engine.load()
    assert (load.free_blocks, load.reserved_blocks, engine.payload.num_materialized) == (TOTAL, 0, 0)
    assert not engine.has_work()
    return load.total_preemptions
