"""``Llumlet.load_changed``: set whenever the llumlet's load version (``load_version().rest``) may have moved, so a
load reader can sleep on it instead of polling an idle llumlet (#20, idle cost). Checked: every operation that moves
``rest`` sets it (random sequences of adds, aborts, steps, state changes, migration flags and records), and the engine
loop's steps set it."""

from __future__ import annotations

import asyncio
import random

from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2


def request(rid: str, max_tokens: int = 5) -> common_pb2.EngineRequest:
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        frontend_address="",
    )


async def test_every_move_of_the_load_version_sets_load_changed() -> None:
    for seed in range(4):
        rng = random.Random(seed)
        engine = SimEngine("tiny", payload=False, total_blocks=64)
        llumlet = Llumlet(engine, "i")
        n = 0
        moved = 0
        for _ in range(300):
            before = llumlet.load_version()
            llumlet.load_changed.clear()
            op = rng.choice(["add", "add", "abort", "step", "step", "step", "state", "migrating", "record", "read"])
            if op == "add" and llumlet.state is InstanceState.ACTIVE:
                n += 1
                await llumlet.add_request(request(f"r{n}", max_tokens=rng.randint(1, 20)))
            elif op == "abort" and engine.request_ids():
                await llumlet.abort_request(rng.choice(engine.request_ids()))
            elif op == "step":
                async with llumlet.engine_lock:
                    result = engine.step(0.0)
                    llumlet._emit(result.outputs)
            elif op == "state":
                llumlet.state = rng.choice([InstanceState.ACTIVE, InstanceState.ACTIVE, InstanceState.DRAINING])
            elif op == "migrating":
                llumlet.set_migrating(incoming=rng.random() < 0.5, outgoing=rng.random() < 0.5)
            elif op == "record":
                llumlet.stats.record_migration(
                    llumlet_pb2.MigrationResult(outcome=llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, downtime_ms=3.0)
                )
            after = llumlet.load_version()
            assert before is not None and after is not None
            if after.rest != before.rest:
                moved += 1
                assert llumlet.load_changed.is_set(), f"seed {seed}: {op} moved the load version silently"
        assert moved > 50, f"seed {seed}: only {moved} moves: the sequence tested little"


async def test_the_engine_loop_sets_load_changed_at_its_steps() -> None:
    llumlet = Llumlet(SimEngine("tiny", payload=False), "i")
    llumlet.start()
    try:
        await llumlet.add_request(request("r", max_tokens=50))
        for _ in range(3):
            llumlet.load_changed.clear()
            steps = llumlet.stats.steps
            async with asyncio.timeout(10):
                while llumlet.stats.steps == steps:  # (a step counts itself and releases the lock without an await)
                    await asyncio.sleep(0.001)
            assert llumlet.load_changed.is_set(), "a step left load_changed unset"
    finally:
        await llumlet.stop()
