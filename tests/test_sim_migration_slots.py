"""The simulator's migration concurrency is the machines' slots, taken where the live llumlet takes them: the
source's when the migration is ordered, the destination's at the first reservation (the old simulator flagged both at
the order, so a destination looked busy while the source was still finishing a step)."""

from __future__ import annotations

from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.tools.sim.config import TransferModel
from pyllumnix.tools.sim.instance import SimInstance
from pyllumnix.tools.sim.migration import MigrationProcess, Outcome


def held(inst: SimInstance) -> tuple[int, int]:
    """(outgoing, incoming) migrations holding a slot of ``inst``."""
    return len(inst.out_slots.held), len(inst.in_slots.held)


def test_slots_follow_the_live_llumlet() -> None:
    src = SimInstance("a", SimEngine("tiny", payload=False), 0.0)
    dst = SimInstance("b", SimEngine("tiny", payload=False), 0.0)
    src.engine.add_request(RequestSpec("r", (1,) * 100, Sampling(max_tokens=50, ignore_eos=True)), 0.0)
    now = src.engine.step(0.0).duration
    mig = MigrationProcess(src, dst, "r", MigrationLimits(), TransferModel(1.0, 1.0), now)
    assert held(src) == (1, 0) and held(dst) == (0, 0)
    other = MigrationProcess(src, dst, "r", MigrationLimits(), TransferModel(1.0, 1.0), now)
    assert other.begin_stage(now) is None and other.outcome is Outcome.ABORTED_BY_SOURCE, "max_out=1"
    duration = mig.begin_stage(now)
    assert duration is not None and held(dst) == (0, 1)
    while duration is not None:
        now += duration
        if mig.stage_done(now):
            break
        duration = mig.begin_stage(now)
    assert mig.outcome is Outcome.COMMITTED
    assert held(src) == held(dst) == (0, 0)
