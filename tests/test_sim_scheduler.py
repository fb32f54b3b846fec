"""Scheduling behaviour of the sim engine: batching limits, watermark, FCFS with head-of-line blocking, and
preemption by recompute."""

from __future__ import annotations

import pytest

from pyllumnix.data_plane.engine.base import Finish, Phase, RequestSpec, Sampling, StepResult
from pyllumnix.data_plane.engine.sim import SimEngine


def spec(rid: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0) -> RequestSpec:
    return RequestSpec(rid, tuple(range(1, prompt_len + 1)), Sampling(max_tokens=max_tokens), arrival_time=arrival)


def drain(engine: SimEngine, tokens: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    t = 0.0
    while engine.has_work():
        result = engine.step(t)
        t += result.duration
        collect(result, tokens)
    return tokens


def collect(result: StepResult, tokens: dict[str, list[int]]) -> None:
    for out in result.outputs:
        got = tokens.setdefault(out.request_id, [])
        assert out.first_index == len(got)
        got.extend(out.token_ids)


def running_ids(engine: SimEngine) -> list[str]:
    return [r.request_id for r in engine.scheduler.running]


def waiting_ids(engine: SimEngine) -> list[str]:
    return [r.request_id for r in engine.scheduler.waiting]


def test_max_num_seqs_caps_the_batch() -> None:
    engine = SimEngine("tiny", max_num_seqs=3)
    for i in range(5):
        engine.add_request(spec(f"r{i}", 8, max_tokens=10), 0.0)
    result = engine.step(0.0)
    assert [o.request_id for o in result.outputs] == ["r0", "r1", "r2"]
    load = engine.load()
    assert (load.num_running, load.num_waiting) == (3, 2)


def test_token_budget_limits_prefill_and_mixes_with_decode() -> None:
    engine = SimEngine("tiny", max_num_batched_tokens=100, max_model_len=100)
    for i in range(4):
        engine.add_request(spec(f"r{i}", 40, max_tokens=10), 0.0)
    first = engine.step(0.0)
    assert (first.num_prefill_tokens, first.num_decode_tokens) == (80, 0)
    assert waiting_ids(engine) == ["r2", "r3"]
    second = engine.step(first.duration)
    # 2 decode tokens + 2 prefills of 40 = 82 <= 100: continuous batching admits both.
    assert (second.num_prefill_tokens, second.num_decode_tokens) == (80, 2)
    assert second.duration == pytest.approx(engine.profile.step_seconds(80, 2, 2 * 41))


@pytest.mark.parametrize(
    ("prompt_len", "watermark", "admitted"),
    [
        (160, 0.25, True),  # 5 held + 10 of 20 blocks: 5 left = watermark 5
        (161, 0.25, False),  # 11 blocks: 4 left < 5
        (160, 0.30, False),  # 5 left < watermark 6
        (161, 0.0, True),
    ],
)
def test_watermark_on_admission(prompt_len: int, watermark: float, admitted: bool) -> None:
    engine = SimEngine("tiny", total_blocks=20, watermark=watermark, max_model_len=208)
    engine.add_request(spec("hold", 80, max_tokens=5), 0.0)  # 5 blocks
    engine.add_request(spec("r", prompt_len, max_tokens=1), 0.0)
    result = engine.step(0.0)
    assert ("r" in {o.request_id for o in result.outputs}) is admitted
    assert engine.load().watermark_blocks == int(watermark * 20)


def test_fcfs_head_of_line_blocking() -> None:
    engine = SimEngine("tiny", total_blocks=20, max_model_len=320)
    engine.add_request(spec("big0", 160, max_tokens=3), 0.0)  # 10 blocks (+1 while decoding)
    engine.add_request(spec("big1", 200, max_tokens=2), 0.0)  # 13 blocks: does not fit next to big0
    engine.add_request(spec("small", 16, max_tokens=2), 0.0)  # 1 block: fits, but queued behind big1
    engine.step(0.0)
    assert running_ids(engine) == ["big0"]
    assert waiting_ids(engine) == ["big1", "small"]
    load = engine.load()
    assert load.head_of_line_demand_blocks == 13
    assert load.waiting_demand_blocks == 14
    assert load.free_blocks == 10
    order: list[str] = []
    t = 0.0
    while engine.has_work():
        before = set(running_ids(engine))
        result = engine.step(t)
        t += result.duration
        order += [r for r in running_ids(engine) if r not in before]
        order += [o.request_id for o in result.outputs if o.finished and o.request_id not in before]
    assert order.index("big1") < order.index("small")


def test_arrival_time_orders_the_waiting_queue() -> None:
    engine = SimEngine("tiny", max_num_seqs=1)
    engine.add_request(spec("a", 8, arrival=2.0), 0.0)
    engine.add_request(spec("b", 8, arrival=1.0), 0.0)
    engine.add_request(spec("c", 8, arrival=2.0), 0.0)
    assert waiting_ids(engine) == ["b", "a", "c"]


def preemption_engine() -> SimEngine:
    # 8 blocks = 128 token slots; two requests growing to 92 tokens each cannot both stay.
    return SimEngine("tiny", total_blocks=8, max_model_len=128, max_num_seqs=2)


def test_preemption_by_recompute_keeps_tokens_and_counts() -> None:
    engine = preemption_engine()
    for rid in ("r0", "r1", "r2"):
        engine.add_request(spec(rid, 32, max_tokens=60), 0.0)
    tokens: dict[str, list[int]] = {}
    preempted: list[tuple[str, ...]] = []
    t = 0.0
    while engine.has_work():
        result = engine.step(t)
        t += result.duration
        collect(result, tokens)
        if result.preempted:
            preempted.append(result.preempted)
            # The victim is the most recently started request and goes back to the FRONT of the queue.
            assert waiting_ids(engine)[0] == result.preempted[-1]
            assert engine.phase(result.preempted[0]) is Phase.WAITING
            load = engine.load()
            assert load.num_preempted >= 1
            assert load.head_of_line_demand_blocks == engine.scheduler.blocks_for(
                32 + len(tokens[result.preempted[-1]])
            )
    assert preempted[0] == ("r1",)
    assert engine.load().total_preemptions == len([r for p in preempted for r in p]) >= 1
    assert engine.load().free_blocks == 8
    reference = drain_all_fresh({"r0": 60, "r1": 60, "r2": 60}, 32)
    assert tokens == reference


def drain_all_fresh(max_tokens: dict[str, int], prompt_len: int) -> dict[str, list[int]]:
    """The same requests, each alone on a roomy engine (no preemption)."""
    out: dict[str, list[int]] = {}
    for rid, n in max_tokens.items():
        engine = SimEngine("tiny")
        engine.add_request(spec(rid, prompt_len, max_tokens=n), 0.0)
        out.update(drain(engine))
    return out


def test_recompute_prefill_covers_prompt_and_generated_tokens() -> None:
    engine = preemption_engine()
    engine.add_request(spec("r0", 32, max_tokens=60), 0.0)
    engine.add_request(spec("r1", 32, max_tokens=60), 0.0)
    t = 0.0
    while True:
        result = engine.step(t)
        t += result.duration
        if result.preempted:
            break
    info = {r.request_id: r for r in engine.load().requests}["r1"]
    assert info.num_preemptions == 1
    assert info.num_blocks == 0
    assert engine.num_computed_tokens("r1") == 0
    # Readmission waits until r0 frees room; then one prefill recomputes prompt + all generated tokens.
    while True:
        result = engine.step(t)
        t += result.duration
        if any(o.request_id == "r1" for o in result.outputs):
            break
    assert result.num_prefill_tokens == 32 + info.num_output_tokens
    assert engine.num_computed_tokens("r1") == 32 + info.num_output_tokens


def test_preempting_step_only_continues_running_requests() -> None:
    engine = SimEngine("tiny", total_blocks=8, max_model_len=128, max_num_seqs=3)
    engine.add_request(spec("r0", 48, max_tokens=70), 0.0)
    engine.add_request(spec("r1", 48, max_tokens=70), 0.0)
    t = 0.0
    engine.step(t)
    engine.add_request(spec("late", 1, max_tokens=1), 0.0)
    preemptions = 0
    while engine.has_work():
        before = running_ids(engine)
        result = engine.step(t)
        t += result.duration
        if result.preempted:
            preemptions += 1
            assert all(o.request_id in before for o in result.outputs)
            assert "late" not in running_ids(engine)
    assert preemptions >= 1


def test_finished_requests_free_their_blocks() -> None:
    engine = SimEngine("tiny")
    for i in range(6):
        engine.add_request(spec(f"r{i}", 10 + 20 * i, max_tokens=5 + i), 0.0)
    tokens = drain(engine)
    assert {rid: len(t) for rid, t in tokens.items()} == {f"r{i}": 5 + i for i in range(6)}
    load = engine.load()
    assert (load.free_blocks, load.num_running, load.num_waiting, load.requests) == (64, 0, 0, ())
    assert engine.payload.num_materialized == 0


def test_idle_step_takes_no_time() -> None:
    engine = SimEngine("tiny")
    assert engine.step(0.0).duration == 0.0
    assert not engine.has_work()


def test_finish_reasons() -> None:
    engine = SimEngine("tiny")
    engine.add_request(spec("r", 8, max_tokens=20), 0.0)
    free_run = drain(engine)["r"]
    stop = free_run[5]
    first = free_run.index(stop)
    for ignore_eos, expected_len, expected_finish in ((False, first + 1, Finish.STOP), (True, 20, Finish.LENGTH)):
        engine = SimEngine("tiny")
        sampling = Sampling(max_tokens=20, stop_token_ids=(stop,), ignore_eos=ignore_eos)
        engine.add_request(RequestSpec("r", tuple(range(1, 9)), sampling), 0.0)
        finals = []
        got: list[int] = []
        t = 0.0
        while engine.has_work():
            result = engine.step(t)
            t += result.duration
            for out in result.outputs:
                got.extend(out.token_ids)
                if out.finished:
                    finals.append(out.finish)
        assert got == free_run[:expected_len]
        assert finals == [expected_finish]


def test_split_steps_prefill_alone_and_stall_every_decode() -> None:
    """vLLM 0.1.x (the paper's engine): a step prefills the admissible waiting requests and nothing else, so the
    running batch does not decode in it; with nothing admissible the step decodes only. Mixed mode (the default)
    decodes and prefills in the same step."""
    split = SimEngine("tiny", split_steps=True, max_num_batched_tokens=512, total_blocks=32)
    mixed = SimEngine("tiny", max_num_batched_tokens=512)
    for engine in (split, mixed):
        engine.add_request(spec("a", 40, max_tokens=10), 0.0)
        first = engine.step(0.0)
        assert (first.num_prefill_tokens, first.num_decode_tokens) == (40, 0)
        engine.add_request(spec("b", 40, max_tokens=10), 0.0)
    s, m = split.step(1.0), mixed.step(1.0)
    assert (m.num_prefill_tokens, m.num_decode_tokens) == (40, 1)
    assert (s.num_prefill_tokens, s.num_decode_tokens) == (40, 0)
    assert [o.request_id for o in s.outputs] == ["b"]
    assert s.duration == pytest.approx(split.profile.prefill_ms(40) / 1000)
    nxt = split.step(2.0)  # nothing waits: a decode-only step of both
    assert (nxt.num_prefill_tokens, nxt.num_decode_tokens) == (0, 2)
    assert nxt.duration == pytest.approx(split.profile.decode_ms(2, 41 + 41) / 1000)
    # a head that cannot be admitted (watermark) does not stall decodes
    split.add_request(spec("huge", 500, max_tokens=4), 0.0)
    blocked = split.step(3.0)
    assert waiting_ids(split) == ["huge"] and blocked.num_decode_tokens == 2


def test_split_steps_preempted_requests_readmit_before_decoding() -> None:
    engine = SimEngine("tiny", split_steps=True, total_blocks=8, max_model_len=128)
    engine.add_request(spec("r0", 32, max_tokens=60), 0.0)
    engine.add_request(spec("r1", 32, max_tokens=60, arrival=1.0), 0.0)
    tokens = drain(engine)
    assert engine.scheduler.total_preemptions > 0
    assert {k: len(v) for k, v in tokens.items()} == {"r0": 60, "r1": 60}
    assert engine.pool.num_free == 8
