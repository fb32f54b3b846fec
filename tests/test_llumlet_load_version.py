"""The load version: an idle or steadily decoding llumlet's 20 Hz load report skips building a snapshot that cannot
have changed. Sound means: whenever the version stays, the report's change key (the load without seq, timestamp and
output-token counters) stays too; useful means: it stays for most decode steps."""

from __future__ import annotations

import random
from typing import Any

from pyllumnix.data_plane.engine.base import EngineError, Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.reporter import LoadReporter, load_change_key, load_key, only_grew
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import common_pb2


def engine_key(engine: SimEngine) -> bytes:
    return load_change_key(convert.load_to_pb(engine.load(), "i", 1, 0.0))


def spec(rid: str, prompt: int, max_tokens: int, arrival: float) -> RequestSpec:
    return RequestSpec(
        rid, tuple(range(1, prompt + 1)), Sampling(max_tokens=max_tokens, ignore_eos=True), arrival_time=arrival
    )


def test_the_sim_engines_load_version_stays_only_while_its_load_key_does() -> None:
    """Random adds, steps (with preemptions: few blocks), aborts, suspends, resumes, releases and reservations. The
    pair stays only while the key does; its first part stays only while the key at most grew (``only_grew``: what
    the reporter may hold back without building the snapshot)."""
    rng = random.Random(7)
    engine = SimEngine("tiny", total_blocks=24, payload=False)
    unchanged_steps = steps = growth_only = 0
    for i in range(3000):
        version, key = engine.load_version(), engine_key(engine)
        grown_from = load_key(convert.load_to_pb(engine.load(), "i", 1, 0.0))
        ids = engine.request_ids()
        op = rng.random()
        try:
            if op < 0.12:
                engine.add_request(spec(f"r{i}", rng.randint(1, 60), rng.randint(1, 80), float(i)), float(i))
            elif op < 0.8:
                engine.step(float(i))
                steps += 1
            elif op < 0.85 and ids:
                engine.abort_request(rng.choice(ids))
            elif op < 0.9 and ids:
                rid = rng.choice(ids)
                if engine.phase(rid) is Phase.SUSPENDED:
                    (engine.resume if rng.random() < 0.7 else engine.release_suspended)(rid)
                else:
                    engine.suspend(rid)
            elif op < 0.95:
                engine.free_reserved(engine.reserve_blocks(rng.randint(1, 3)))
            else:
                engine.reserve_blocks(1)  # kept: reserved blocks are part of the load
        except EngineError:
            pass
        if engine.load_version() == version:
            assert engine_key(engine) == key, f"operation {i} changed the load without changing its version"
            unchanged_steps += op >= 0.12 and op < 0.8
        elif engine.load_version()[0] == version[0]:
            now = load_key(convert.load_to_pb(engine.load(), "i", 1, 0.0))
            assert only_grew(grown_from, now), f"operation {i} changed more than growth but only its growth version"
            growth_only += 1
    assert steps > 1000 and unchanged_steps > 0 and growth_only > 50


def test_a_steady_decode_keeps_the_version_between_block_boundaries() -> None:
    engine = SimEngine("tiny", payload=False)
    engine.add_request(spec("r", 5, 200, 0.0), 0.0)
    engine.step(0.0)  # the prefill: a change
    versions = []
    for t in range(64):
        engine.step(float(t))
        versions.append(engine.load_version())
    # 16-token blocks: the version moves about twice per block (a block is needed, then taken), not every step.
    assert len(set(versions)) <= 64 // 16 * 2 + 1
    # Both moves are growth: the first part stays (the reporter need not build the snapshot for them).
    assert len({v[0] for v in versions}) == 1


async def test_an_idle_llumlets_report_loop_builds_its_load_once_and_sees_a_new_request() -> None:
    llumlet = Llumlet(SimEngine("tiny", payload=False), "i-1")
    built = 0
    load_pb = llumlet.load_pb

    def counting() -> common_pb2.InstanceLoad:
        nonlocal built
        built += 1
        return load_pb()

    llumlet.load_pb = counting  # type: ignore[method-assign]
    reporter = LoadReporter(llumlet, _no_etcd(), KeyLayout("c1"), 0.0)
    stream = reporter._reports()
    first = await anext(stream)
    assert first.WhichOneof("report") == "load"
    for _ in range(5):
        assert (await anext(stream)).WhichOneof("report") == "keep_alive"
    # Before: a snapshot built and serialized every interval (16 here); now only the first.
    assert built == 1
    await llumlet.add_request(
        common_pb2.EngineRequest(
            request_id="r1",
            prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(max_tokens=4),
            frontend_address="127.0.0.1:1",
        )
    )
    changed = await anext(stream)
    assert changed.WhichOneof("report") == "load"
    assert [(r.request_id, r.frontend_address) for r in changed.load.requests] == [("r1", "127.0.0.1:1")]
    llumlet.set_migrating(outgoing=True)  # llumlet-level state is part of the version too
    moved = await anext(stream)
    assert moved.WhichOneof("report") == "load" and moved.load.migrating_out
    await stream.aclose()


def _no_etcd() -> Any:
    """The reporter's etcd client is used only to follow the leader, which these tests do not start."""
    return object()
