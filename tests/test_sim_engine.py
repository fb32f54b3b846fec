"""Engine-level contract of the sim engine: input errors, determinism, load snapshots and payload bytes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import (
    DuplicateRequestError,
    EngineError,
    Finish,
    InvalidRequestError,
    InvalidStateError,
    OutOfBlocksError,
    Phase,
    RequestSpec,
    Sampling,
    UnknownRequestError,
)
from pyllumnix.data_plane.engine.payload import expected_block_bytes
from pyllumnix.data_plane.engine.sim import SimEngine


def spec(rid: str, prompt_len: int, max_tokens: int = 4, seed: int | None = None) -> RequestSpec:
    return RequestSpec(rid, tuple(range(1, prompt_len + 1)), Sampling(max_tokens=max_tokens, seed=seed))


def run(engine: SimEngine) -> tuple[list[tuple[str, tuple[int, ...], int, Finish | None]], list[float]]:
    outputs, durations = [], []
    t = 0.0
    while engine.has_work():
        result = engine.step(t)
        t += result.duration
        durations.append(result.duration)
        outputs += [(o.request_id, o.token_ids, o.first_index, o.finish) for o in result.outputs]
    return outputs, durations


def busy_engine(payload: bool = True) -> SimEngine:
    engine = SimEngine("tiny", total_blocks=12, max_model_len=160, payload=payload)
    for i in range(5):
        engine.add_request(spec(f"r{i}", 20 + 13 * i, max_tokens=40), 0.0)
    return engine


def test_deterministic_across_instances_and_payload_modes() -> None:
    a, b, c = busy_engine(), busy_engine(), busy_engine(payload=False)
    assert run(a) == run(b) == run(c)


def test_tokens_depend_on_seed_not_request_id() -> None:
    def tokens(rid: str, seed: int | None) -> list[tuple[int, ...]]:
        engine = SimEngine("tiny")
        engine.add_request(spec(rid, 10, max_tokens=12, seed=seed), 0.0)
        return [o[1] for o in run(engine)[0]]

    assert tokens("a", 7) == tokens("b", 7)
    assert tokens("a", None) != tokens("b", None)
    assert all(0 <= t[0] < 256 for t in tokens("a", None))


Call = Callable[[SimEngine], object]

ERRORS: list[tuple[str, Call, type[EngineError] | type[KeyError]]] = [
    ("empty prompt", lambda e: e.add_request(RequestSpec("x", (), Sampling(max_tokens=1)), 0.0), InvalidRequestError),
    ("max_tokens 0", lambda e: e.add_request(spec("x", 4, max_tokens=0), 0.0), InvalidRequestError),
    ("too long", lambda e: e.add_request(spec("x", 500, max_tokens=13), 0.0), InvalidRequestError),
    ("duplicate", lambda e: e.add_request(spec("run", 4), 0.0), DuplicateRequestError),
    ("abort unknown", lambda e: e.abort_request("nope"), UnknownRequestError),
    ("phase unknown", lambda e: e.phase("nope"), UnknownRequestError),
    ("blocks unknown", lambda e: e.block_ids("nope"), UnknownRequestError),
    ("computed unknown", lambda e: e.num_computed_tokens("nope"), UnknownRequestError),
    ("export unknown", lambda e: e.export_state("nope"), UnknownRequestError),
    ("suspend unknown", lambda e: e.suspend("nope"), UnknownRequestError),
    ("suspend twice", lambda e: (e.suspend("run"), e.suspend("run")), InvalidStateError),
    ("resume running", lambda e: e.resume("run"), InvalidStateError),
    ("release running", lambda e: e.release_suspended("run"), InvalidStateError),
    ("reserve negative", lambda e: e.reserve_blocks(-1), InvalidRequestError),
    ("reserve too many", lambda e: e.reserve_blocks(e.load().free_blocks + 1), OutOfBlocksError),
    ("free unreserved", lambda e: e.free_reserved(e.block_ids("run")), InvalidStateError),
    ("write unreserved", lambda e: e.write_blocks([0], np.zeros((1, e.block_bytes), np.uint8)), InvalidStateError),
    ("write bad shape", lambda e: e.write_blocks(e.reserve_blocks(2), np.zeros((1, 8), np.uint8)), InvalidRequestError),
    ("read free block", lambda e: e.read_blocks([e.total_blocks - 1]), KeyError),
    (
        "commit duplicate",
        lambda e: e.commit_incoming(e.export_state("run"), e.reserve_blocks(2), 0.0),
        DuplicateRequestError,
    ),
]


@pytest.mark.parametrize(("case", "call", "error"), ERRORS, ids=[c[0] for c in ERRORS])
def test_errors(case: str, call: Call, error: type[Exception]) -> None:
    engine = SimEngine("tiny", watermark=0.1)
    engine.add_request(spec("run", 20, max_tokens=50), 0.0)
    engine.step(0.0)
    before = engine.load()
    with pytest.raises(error):
        call(engine)
    if case not in ("suspend twice", "write bad shape", "commit duplicate"):
        assert engine.load() == before  # a refused call changes nothing


def test_abort_in_every_phase_frees_everything() -> None:
    engine = SimEngine("tiny", max_num_seqs=1)
    engine.add_request(spec("run", 40, max_tokens=50), 0.0)
    engine.add_request(spec("wait", 40, max_tokens=50), 0.0)
    engine.add_request(spec("susp", 40, max_tokens=50), 0.0)
    engine.step(0.0)
    engine.suspend("susp")
    phases = {rid: engine.phase(rid) for rid in engine.request_ids()}
    assert phases == {"run": Phase.RUNNING, "wait": Phase.WAITING, "susp": Phase.SUSPENDED}
    for rid in ("run", "wait", "susp"):
        out = engine.abort_request(rid)
        assert (out.finished, out.finish, out.token_ids) == (True, Finish.ABORT, ())
    assert out.first_index == 0
    assert engine.load().free_blocks == 64
    assert not engine.has_work()


def test_abort_reports_next_index() -> None:
    engine = SimEngine("tiny")
    engine.add_request(spec("r", 8, max_tokens=10), 0.0)
    for t in range(3):
        engine.step(float(t))
    assert engine.abort_request("r").first_index == 3


def test_load_snapshot_per_request() -> None:
    engine = SimEngine("tiny", max_num_seqs=1)
    engine.add_request(RequestSpec("a", tuple(range(33)), Sampling(max_tokens=5), priority=2, arrival_time=1.0), 0.0)
    engine.add_request(RequestSpec("b", tuple(range(17)), Sampling(max_tokens=5), arrival_time=2.0), 0.0)
    engine.step(0.0)
    infos = {r.request_id: r for r in engine.load().requests}
    assert infos["a"].phase is Phase.RUNNING
    assert (infos["a"].num_blocks, infos["a"].demand_blocks, infos["a"].priority) == (3, 0, 2)
    assert (infos["a"].num_prompt_tokens, infos["a"].num_output_tokens, infos["a"].arrival_time) == (33, 1, 1.0)
    assert (infos["b"].phase, infos["b"].num_blocks, infos["b"].demand_blocks) == (Phase.WAITING, 0, 2)


@pytest.mark.parametrize("block_size", [16, 8])
def test_payload_bytes_match_expected(block_size: int) -> None:
    engine = SimEngine("tiny", block_size=block_size, total_blocks=128)
    engine.add_request(spec("p", 37, max_tokens=9), 0.0)
    engine.add_request(spec("q", 6, max_tokens=9), 0.0)
    for t in range(4):
        engine.step(float(t))
    for rid in ("p", "q"):
        n = engine.num_computed_tokens(rid)
        assert n == (37 if rid == "p" else 6) + 3
        data = engine.read_blocks(engine.block_ids(rid))
        assert data.shape == (-(-n // block_size), engine.block_bytes)
        for i, row in enumerate(data):
            expected = expected_block_bytes(rid, i, n, block_size=block_size, bytes_per_token=2048)
            np.testing.assert_array_equal(row, expected)
    # Different requests and positions differ; the slot past the computed tokens is still zero.
    last = data[-1].reshape(block_size, -1)
    assert last[(n - 1) % block_size].any() and not last[n % block_size].any()


def test_payload_off_reads_zeros() -> None:
    engine = SimEngine("tiny", payload=False)
    engine.add_request(spec("p", 40), 0.0)
    engine.step(0.0)
    data = engine.read_blocks(engine.block_ids("p"))
    assert data.shape == (3, engine.block_bytes) and not data.any()
    assert engine.payload.num_materialized == 0
