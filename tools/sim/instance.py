"""One simulated instance: a real ``SimEngine`` plus what a llumlet would know about it (state, migration slots)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.migration.events import Slots
from pyllumnix.infra.vocabulary import InstanceState


def instance_id(index: int) -> str:
    """Zero-padded so the snapshot's id order (its tie-break order) is creation order."""
    return f"inst-{index:04d}"


@dataclass(eq=False)
class SimInstance:
    instance_id: str
    engine: SimEngine
    started_at: float
    state: InstanceState = InstanceState.ACTIVE
    # Migration slots, taken and given back by the migration machines (one each way, as the llumlet's defaults).
    out_slots: Slots = field(default_factory=lambda: Slots(1))
    in_slots: Slots = field(default_factory=lambda: Slots(1))
    # A step event is queued for this instance.
    step_pending: bool = False
    # End of the step in progress (valid while step_pending): the engine's state already reflects it.
    busy_until: float = 0.0
    # The engine changed since its last load report reached the snapshot.
    dirty: bool = True
    removed_at: float | None = None
    steps: int = field(default=0)

    @property
    def migrating_out(self) -> bool:
        return bool(self.out_slots.held)

    @property
    def migrating_in(self) -> bool:
        return bool(self.in_slots.held)

    @property
    def busy_migrating(self) -> bool:
        return self.migrating_in or self.migrating_out
