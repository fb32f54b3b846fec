"""One migration process in virtual time on two real sim engines: commit, and the abort paths leave nothing behind."""

from __future__ import annotations

from pyllumnix.data_plane.engine.base import Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.tools.sim.config import TransferModel
from pyllumnix.tools.sim.instance import SimInstance
from pyllumnix.tools.sim.migration import MigrationProcess, Outcome

LINK = TransferModel(bandwidth_gbps=1.0, stage_latency_ms=1.0)


def _pair(dst_blocks: int | None = None) -> tuple[SimInstance, SimInstance]:
    src = SimInstance("a", SimEngine("tiny", payload=False), 0.0)
    dst = SimInstance("b", SimEngine("tiny", payload=False, total_blocks=dst_blocks), 0.0)
    return src, dst


def _add(engine: SimEngine, rid: str, prompt: int, out: int) -> None:
    engine.add_request(RequestSpec(rid, (1,) * prompt, Sampling(max_tokens=out, ignore_eos=True)), 0.0)


def _drive(mig: MigrationProcess, now: float, step_src: bool = True) -> float:
    """Runs stages to the end, stepping the source once per stage (the request keeps decoding)."""
    duration = mig.begin_stage(now)
    while duration is not None:
        now += duration
        if step_src and mig.src.engine.has_work():
            now += mig.src.engine.step(now).duration
        if mig.stage_done(now):
            break
        duration = mig.begin_stage(now)
    return now


def test_running_request_commits_with_short_downtime() -> None:
    src, dst = _pair()
    _add(src.engine, "r", 200, 100)
    now = src.engine.step(0.0).duration
    mig = MigrationProcess(src, dst, "r", MigrationLimits(), LINK, now)
    _drive(mig, now)
    assert mig.outcome is Outcome.COMMITTED and mig.stages >= 2
    assert "r" not in src.engine.request_ids() and dst.engine.phase("r") is Phase.RUNNING
    assert src.engine.pool.num_free == src.engine.total_blocks
    assert 0.0 < mig.downtime_s <= LINK.stage_seconds(4, src.engine.block_bytes) + 1e-9
    assert dst.engine.pool.num_reserved == 0


def test_waiting_request_moves_in_one_stage() -> None:
    src, dst = _pair()
    _add(src.engine, "w", 50, 10)
    mig = MigrationProcess(src, dst, "w", MigrationLimits(), LINK, 0.0)
    _drive(mig, 0.0, step_src=False)
    assert mig.outcome is Outcome.COMMITTED and mig.stages == 1 and mig.blocks_copied == 0
    assert dst.engine.phase("w") is Phase.WAITING


def test_refused_preallocation_aborts_and_leaves_source_running() -> None:
    src, dst = _pair(dst_blocks=40)
    _add(dst.engine, "big", 500, 10)
    dst.engine.step(0.0)  # 32 of 40 blocks in use
    _add(src.engine, "r", 300, 100)
    src.engine.step(0.0)
    mig = MigrationProcess(src, dst, "r", MigrationLimits(), LINK, 0.0)
    assert mig.begin_stage(0.0) is None
    assert mig.outcome is Outcome.ABORTED_BY_DESTINATION
    assert src.engine.phase("r") is Phase.RUNNING and dst.engine.pool.num_reserved == 0


def test_request_finishing_mid_migration_aborts_and_frees_reservation() -> None:
    src, dst = _pair()
    _add(src.engine, "r", 200, 3)
    now = src.engine.step(0.0).duration
    mig = MigrationProcess(src, dst, "r", MigrationLimits(last_stage_max_blocks=1), LINK, now)
    duration = mig.begin_stage(now)
    assert duration is not None and dst.engine.pool.num_reserved > 0
    while src.engine.has_work():
        now += src.engine.step(now).duration
    assert not mig.stage_done(now + duration)
    assert mig.begin_stage(now + duration) is None
    assert mig.outcome is Outcome.ABORTED_BY_SOURCE
    assert dst.engine.pool.num_reserved == 0 and dst.engine.pool.num_free == dst.engine.total_blocks
