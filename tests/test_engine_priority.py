"""The engine scheduler serves high-priority requests first (as vLLM V1's ``priority`` policy): they queue ahead of
normal requests, a high-priority head short of blocks preempts normal running requests when that makes it fit, and a
preemption picks the most recently started normal request before any high-priority one.

Why: with a strictly FCFS engine (the paper's), normal requests placed on an instance holding high-priority work in a
burst made the high-priority requests arriving there queue behind them, and a 384-block high-priority prompt waited
~100 s for the long-lived high-priority batch of a full instance (Fig. 13, docs/sim/REPORT.md). Each test below fails
on the FCFS engine (checked against the previous scheduler.py)."""

from __future__ import annotations

import pytest

from pyllumnix.data_plane.engine.base import MigrationState, OutOfBlocksError, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.infra.vocabulary import Priority


def spec(rid: str, prompt_len: int, priority: Priority = Priority.NORMAL, max_tokens: int = 20) -> RequestSpec:
    return RequestSpec(
        rid, tuple(range(1, prompt_len + 1)), Sampling(max_tokens=max_tokens, ignore_eos=True), priority=priority
    )


def engine(blocks: int) -> SimEngine:
    """``tiny``: 16-token blocks, no watermark; mixed steps."""
    return SimEngine("tiny", payload=False, total_blocks=blocks, max_model_len=16 * blocks)


def running(e: SimEngine) -> list[str]:
    return [r.request_id for r in e.scheduler.running]


def waiting(e: SimEngine) -> list[str]:
    return [r.request_id for r in e.scheduler.waiting]


def test_a_high_priority_request_queues_ahead_of_an_earlier_normal_one() -> None:
    e = engine(8)
    e.add_request(spec("n0", 96), 0.0)  # 6 blocks
    e.step(0.0)
    e.add_request(spec("n1", 48), 0.1)  # 3 blocks: 2 free, waits
    e.add_request(spec("h", 16, Priority.HIGH), 0.2)  # 1 block: fits, but FCFS kept it behind n1
    e.step(0.2)
    assert running(e) == ["n0", "h"]
    assert waiting(e) == ["n1"]


def test_a_high_priority_head_preempts_normal_requests_to_fit() -> None:
    e = engine(8)
    e.add_request(spec("n0", 96), 0.0)  # 6 blocks
    e.step(0.0)
    e.add_request(spec("h", 64, Priority.HIGH), 0.1)  # 4 blocks, 2 free
    result = e.step(0.1)
    assert list(result.preempted) == ["n0"]
    assert running(e) == ["h"]
    assert waiting(e) == ["n0"]
    assert e.pool.num_free == 4


def test_no_preemption_that_would_not_make_the_high_priority_head_fit() -> None:
    e = engine(8)
    e.add_request(spec("h0", 90, Priority.HIGH), 0.0)  # 6 blocks (room to grow to 96 tokens)
    e.add_request(spec("n1", 10), 0.0)  # 1 block
    e.step(0.0)
    e.add_request(spec("h2", 64, Priority.HIGH), 0.1)  # 4 blocks: 1 free + n1's 1 is not enough
    result = e.step(0.1)
    assert list(result.preempted) == []
    assert running(e) == ["h0", "n1"]
    assert waiting(e) == ["h2"]


def test_a_growing_high_priority_request_preempts_an_older_normal_one_not_itself() -> None:
    """4 blocks: n0 (20 tokens, 2 blocks) started first, h (31 tokens, 2 blocks) second. When h needs its third block
    nothing is free: FCFS preempted the most recently started request, h itself; now n0 goes, though it was already
    scheduled in that step (it is taken out of the step and its budget given back)."""
    e = engine(4)
    e.add_request(spec("n0", 20), 0.0)
    e.step(0.0)
    e.add_request(spec("h", 31, Priority.HIGH), 0.1)
    e.step(0.1)  # n0 decodes, h prefills (32 tokens after its first output)
    e.step(0.2)  # both decode; h now has 33 tokens: the next step needs a third block
    result = e.step(0.3)
    assert list(result.preempted) == ["n0"]
    assert [o.request_id for o in result.outputs] == ["h"]
    assert running(e) == ["h"]
    assert waiting(e) == ["n0"]


def test_the_victim_is_the_most_recently_started_normal_request() -> None:
    """6 blocks: n0 and n2 (20 tokens, 2 blocks each) started first, h1 (31 tokens) last. When h1 needs a third block,
    FCFS preempted h1 (the most recently started); now n2, the most recently started normal request."""
    e = engine(6)
    e.add_request(spec("n0", 20), 0.0)
    e.add_request(spec("n2", 20), 0.0)
    e.step(0.0)
    e.add_request(spec("h1", 31, Priority.HIGH), 0.1)
    e.step(0.1)
    e.step(0.2)
    result = e.step(0.3)
    assert list(result.preempted) == ["n2"]
    assert running(e) == ["n0", "h1"]


def test_a_victim_preempted_for_a_high_priority_head_gives_its_scheduled_tokens_back_to_the_budget() -> None:
    """Review 6: ``_make_room`` dropped the budget ``_unschedule`` returned. Budget 129: n0 and n1 decode (2 tokens),
    h1 (80 tokens, 5 blocks, 4 free) preempts n1, whose decode token goes back: 129 - 2 - 80 + 1 = 48 admits the
    48-token h2 in the same step. Old: 47 left, h2 waited a step although the step ran only 128 tokens."""
    e = SimEngine("tiny", payload=False, total_blocks=12, max_model_len=128, max_num_batched_tokens=129)
    e.add_request(spec("n0", 60), 0.0)  # 4 blocks each, with room for 4 more tokens
    e.add_request(spec("n1", 60), 0.0)
    e.step(0.0)
    assert running(e) == ["n0", "n1"] and e.pool.num_free == 4
    e.add_request(spec("h1", 80, Priority.HIGH), 0.1)
    e.add_request(spec("h2", 48, Priority.HIGH), 0.2)  # 3 blocks: the 3 left after h1
    plan = e.scheduler.schedule()  # the step's plan itself, to check the tokens it runs
    assert [r.spec.request_id for r in plan.preempted] == ["n1"]
    assert [(item.request.spec.request_id, item.num_new_tokens) for item in plan.scheduled] == [
        ("n0", 1),
        ("h1", 80),
        ("h2", 48),
    ]
    assert sum(item.num_new_tokens for item in plan.scheduled) == 129
    assert running(e) == ["n0", "h1", "h2"]
    assert waiting(e) == ["n1"]


def test_a_migrated_in_high_priority_waiting_request_counts_only_the_demand_queued_ahead_of_it() -> None:
    """Review 6: ``commit_incoming`` counted every waiting normal request as queued ahead, although a high-priority
    request is queued ahead of them (``waiting_demand_ahead`` was never given the priority). 9 blocks: n0 holds 7,
    n1 waits for 3; a 2-block high-priority waiting request fits the 2 free blocks ahead of n1. Old: refused
    (2 - 3 - 2 < 0); a normal one is still refused behind n1."""
    e = engine(9)
    e.add_request(spec("n0", 96), 0.0)
    e.step(0.0)
    e.add_request(spec("n1", 48), 0.1)
    e.step(0.1)
    assert waiting(e) == ["n1"]
    with pytest.raises(OutOfBlocksError):
        e.commit_incoming(MigrationState(spec("m", 32), (), 0), [], 0.2)
    e.commit_incoming(MigrationState(spec("h", 32, Priority.HIGH), (), 0), [], 0.2)
    assert waiting(e) == ["h", "n1"]


def test_split_steps_a_high_priority_head_preempts_in_its_prefill_only_step() -> None:
    """vLLM 0.1.x-style split steps admit before the running batch and run a prefill-only step when they admit: the
    high-priority head preempts the latest normal request there, and nothing else runs in that step (the review
    found this path untested)."""
    e = SimEngine("tiny", payload=False, total_blocks=8, max_model_len=16 * 8, split_steps=True)
    e.add_request(spec("n0", 40), 0.0)  # 3 blocks each, with room to grow
    e.add_request(spec("n1", 44), 0.0)
    e.step(0.0)
    e.step(0.0)  # a decode step
    assert running(e) == ["n0", "n1"] and e.pool.num_free == 2
    e.add_request(spec("h", 64, Priority.HIGH), 0.1)  # 4 blocks
    plan = e.scheduler.schedule()
    assert [r.spec.request_id for r in plan.preempted] == ["n1"]
    assert [(item.request.spec.request_id, item.num_new_tokens) for item in plan.scheduled] == [("h", 64)]
    assert running(e) == ["n0", "h"] and waiting(e) == ["n1"] and e.pool.num_free == 1
