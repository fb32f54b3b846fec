"""One live migration in virtual time: the live coordinator's protocol decisions on real engines, with the data
plane replaced by the transfer model.

Per stage (``plan.next_stage`` decides): re-check the request on the source (finished or preempted -> source abort);
on the last stage suspend it first (downtime starts); pre-allocate the stage's blocks on the destination
(``OutOfBlocksError`` or a destination that no longer takes requests -> destination abort); the copy takes
``TransferModel.stage_seconds``; after the last stage ``commit_incoming`` on the destination and
``release_suspended`` on the source (downtime ends). Any abort frees the destination's reservation and resumes a
suspended request on the source. A waiting request is suspended at once and moves in one stage without KV.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from pyllumnix.control_plane.policy.snapshot import InstanceState
from pyllumnix.data_plane.engine.base import EngineError, MigrationState, OutOfBlocksError, Phase, UnknownRequestError
from pyllumnix.data_plane.llumlet.migration.plan import GiveUp, MigrationLimits, Stage, next_stage
from pyllumnix.tools.sim.config import TransferModel
from pyllumnix.tools.sim.instance import SimInstance


class Outcome(enum.Enum):
    RUNNING = "running"
    COMMITTED = "committed"
    ABORTED_BY_SOURCE = "aborted_by_source"
    ABORTED_BY_DESTINATION = "aborted_by_destination"


class _Abort(Exception):
    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


@dataclass
class MigrationProcess:
    src: SimInstance
    dst: SimInstance
    request_id: str
    limits: MigrationLimits
    transfer: TransferModel
    start_time: float
    outcome: Outcome = Outcome.RUNNING
    reason: str = ""
    end_time: float = 0.0
    downtime_s: float = 0.0
    stages: int = 0
    blocks_copied: int = 0

    def __post_init__(self) -> None:
        self._state: MigrationState | None = None
        self._suspended_at = 0.0
        self._preemptions0 = 0
        self._reserved: list[int] = []
        self._stage_index = 0
        self._plan: Stage | None = None
        self._started = False

    # --- driven by the simulator, which calls begin_stage only between two steps of the source ---
    def begin_stage(self, now: float) -> float | None:
        """Starts the next stage (the first call also starts the migration): its copy time, or None if it ended."""
        try:
            if not self._started:
                self._started = True
                phase = self._phase()
                if phase is Phase.SUSPENDED:
                    raise _Abort(Outcome.ABORTED_BY_SOURCE, "request is already migrating")
                self._preemptions0 = self.src.engine.export_state(self.request_id).num_preemptions
                if phase is Phase.WAITING:
                    self._suspend(now)
            return self._begin_stage(now)
        except _Abort as exc:
            self._abort(exc, now)
            return None

    def stage_done(self, now: float) -> bool:
        """The current stage's copy finished; True when the migration ended (committed after the last stage, or
        aborted), False when another stage should begin."""
        plan = self._plan
        assert plan is not None
        self.blocks_copied += plan.count
        self.stages = plan.index + 1
        self._stage_index = plan.index + 1
        if not plan.last:
            return False
        assert self._state is not None
        try:
            self.dst.engine.commit_incoming(self._state, self._reserved, now)
        except EngineError as exc:
            self._abort(_Abort(Outcome.ABORTED_BY_DESTINATION, f"commit failed: {exc}"), now)
            return True
        self._reserved = []
        self.src.engine.release_suspended(self.request_id)
        self.outcome = Outcome.COMMITTED
        self.downtime_s = now - self._suspended_at
        self.end_time = now
        return True

    # --- steps of the protocol ---
    def _phase(self) -> Phase:
        try:
            phase = self.src.engine.phase(self.request_id)
        except UnknownRequestError as exc:
            raise _Abort(Outcome.ABORTED_BY_SOURCE, "request finished or was aborted during migration") from exc
        if phase is Phase.FINISHED:
            raise _Abort(Outcome.ABORTED_BY_SOURCE, "request finished during migration")
        return phase

    def _suspend(self, now: float) -> None:
        try:
            self._state = self.src.engine.suspend(self.request_id)
        except EngineError as exc:
            raise _Abort(Outcome.ABORTED_BY_SOURCE, f"cannot suspend: {exc}") from exc
        self._suspended_at = now

    def _begin_stage(self, now: float) -> float:
        engine = self.src.engine
        rid = self.request_id
        if self._state is None:
            phase = self._phase()
            if phase is not Phase.RUNNING or engine.export_state(rid).num_preemptions != self._preemptions0:
                raise _Abort(Outcome.ABORTED_BY_SOURCE, "request was preempted during migration")
            plan = next_stage(self.limits, self._stage_index, self.blocks_copied, len(engine.block_ids(rid)))
            if isinstance(plan, GiveUp):
                raise _Abort(Outcome.ABORTED_BY_SOURCE, plan.reason)
            if plan.last:
                self._suspend(now)
                plan = next_stage(self.limits, self._stage_index, self.blocks_copied, len(engine.block_ids(rid)))
        else:  # suspended: whatever is left goes in one (last) stage
            total = len(engine.block_ids(rid))
            limits = replace(self.limits, last_stage_max_blocks=max(1, total - self.blocks_copied))
            plan = next_stage(limits, self._stage_index, self.blocks_copied, total)
        assert isinstance(plan, Stage)
        if plan.index == 0 and self.dst.state != InstanceState.ACTIVE:
            raise _Abort(Outcome.ABORTED_BY_DESTINATION, f"{self.dst.instance_id} takes no requests")
        try:
            self._reserved.extend(self.dst.engine.reserve_blocks(plan.count) if plan.count else [])
        except OutOfBlocksError as exc:
            raise _Abort(Outcome.ABORTED_BY_DESTINATION, f"pre-allocation refused: {exc}") from exc
        self._plan = plan
        return self.transfer.stage_seconds(plan.count, engine.block_bytes)

    def _abort(self, exc: _Abort, now: float) -> None:
        """Leak-free either way: the destination frees its reservation, a suspended request goes back to running."""
        if self._reserved:
            self.dst.engine.free_reserved(self._reserved)
            self._reserved = []
        if self._state is not None:
            try:
                if self.src.engine.phase(self.request_id) is Phase.SUSPENDED:
                    self.src.engine.resume(self.request_id)
            except UnknownRequestError:
                pass
        self.outcome = exc.outcome
        self.reason = str(exc)
        self.end_time = now
