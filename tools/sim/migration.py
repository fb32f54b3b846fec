"""One live migration in virtual time: the migration machines (``SourceMigration``, ``DestinationMigration``) decide
every step, as they do in the live llumlet; this module only performs their actions on two real sim engines, with
the data plane replaced by the transfer model (a copy takes ``TransferModel.stage_seconds``; nothing else takes
virtual time).

The cluster drives it: ``begin_stage`` only between two steps of the source (it observes and may suspend the
request there), ``stage_done`` when a copy's time has passed (the destination checks what landed; after the last
stage the commit, release and downtime follow at once).
"""

from __future__ import annotations

import contextlib

from pyllumnix.control_plane.policy.snapshot import InstanceState
from pyllumnix.data_plane.engine.base import MigrationState, UnknownRequestError
from pyllumnix.data_plane.llumlet.migration import perform
from pyllumnix.data_plane.llumlet.migration.destination import DestinationMigration
from pyllumnix.data_plane.llumlet.migration.events import (
    AbortAsked,
    AbortHere,
    Accept,
    Commit,
    CommitAsked,
    CommitFailed,
    Committed,
    Copied,
    Copy,
    CopyFailed,
    DestinationAction,
    DestinationEvent,
    Done,
    Flush,
    Flushed,
    ForwardAbort,
    Free,
    Install,
    Observe,
    Offered,
    Outcome,
    Refuse,
    Refused,
    Release,
    Reserve,
    ReserveBlocks,
    Reserved,
    Resume,
    SourceAction,
    SourceEvent,
    SourceFailed,
    StageLanded,
    Start,
    Suspend,
    TellAbort,
)
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits, Stage
from pyllumnix.data_plane.llumlet.migration.source import SourceMigration
from pyllumnix.tools.sim.config import TransferModel
from pyllumnix.tools.sim.instance import SimInstance

__all__ = ["MigrationProcess", "Outcome"]


class MigrationProcess:
    """Performs one migration's actions on ``src`` and ``dst``; the outgoing slot is taken at once (as the live
    MigrateOut call does), the incoming one by the destination at the first reservation."""

    def __init__(
        self,
        src: SimInstance,
        dst: SimInstance,
        request_id: str,
        limits: MigrationLimits,
        transfer: TransferModel,
        start_time: float,
    ) -> None:
        self.src = src
        self.dst = dst
        self.request_id = request_id
        self.transfer = transfer
        self.start_time = start_time
        self.end_time = 0.0
        self.downtime_s = 0.0
        mid = f"{src.instance_id}>{dst.instance_id}@{start_time!r}/{request_id}"
        self.source = SourceMigration(mid, request_id, limits, src.out_slots)
        self.destination = DestinationMigration(mid, dst.in_slots)
        self._actions: list[SourceAction] = self.source.step(Start())
        self._state: MigrationState | None = None
        self._suspended_at = 0.0
        self._copying: Stage | None = None
        self._stage_ids: dict[int, tuple[int, ...]] = {}

    @property
    def outcome(self) -> Outcome:
        return self.source.outcome

    @property
    def reason(self) -> str:
        return self.source.reason

    @property
    def stages(self) -> int:
        return self.source.stages

    @property
    def blocks_copied(self) -> int:
        return self.source.blocks_copied

    # --- driven by the simulator, which calls begin_stage only between two steps of the source ---
    def begin_stage(self, now: float) -> float | None:
        """Performs actions up to the next copy: its duration, or None when the migration ended."""
        while self._actions:
            action = self._actions.pop(0)
            if isinstance(action, Copy):
                self._copying = action.stage
                return self.transfer.stage_seconds(action.stage.count, self.src.engine.block_bytes)
            event = self._perform(action, now)
            if event is not None:
                self._actions += self.source.step(event)
        return None

    def stage_done(self, now: float) -> bool:
        """The current copy's time passed; True when the migration ended, False when another stage should begin
        (at the source's next step boundary)."""
        stage = self._copying
        assert stage is not None
        self._copying = None
        answer = self._call(StageLanded(stage.index, self._stage_ids.get(stage.index, ())), now)
        event = Copied(stage.index) if isinstance(answer, Accept) else CopyFailed(f"transfer: {answer.reason}")
        self._actions = self.source.step(event)
        if self._actions and isinstance(self._actions[0], Observe):
            return False
        return self.begin_stage(now) is None

    # --- the actions ---
    def _perform(self, action: SourceAction, now: float) -> SourceEvent | None:
        engine = self.src.engine
        rid = self.request_id
        if isinstance(action, Observe):
            return perform.observe(engine, rid)
        if isinstance(action, Suspend):
            event, self._state = perform.suspend(engine, rid)
            self._suspended_at = now
            return event
        if isinstance(action, Reserve):
            return self._reserve(action.stage, now)
        if isinstance(action, Flush):
            return Flushed()  # outputs reach the tracker as they are produced
        if isinstance(action, Commit):
            ids = tuple(b for _, stage_ids in sorted(self._stage_ids.items()) for b in stage_ids)
            answer = self._call(CommitAsked(ids), now)
            return Committed() if isinstance(answer, Accept) else CommitFailed(f"commit: {answer.reason}")
        if isinstance(action, TellAbort):
            self._call(AbortAsked(action.reason), now)
        elif isinstance(action, Resume):
            perform.resume(engine, rid)
        elif isinstance(action, Release):
            engine.release_suspended(rid)
            self.downtime_s = now - self._suspended_at
        elif isinstance(action, AbortHere):
            with contextlib.suppress(UnknownRequestError):
                engine.abort_request(rid)
        elif isinstance(action, ForwardAbort):
            with contextlib.suppress(UnknownRequestError):
                self.dst.engine.abort_request(rid)
        elif isinstance(action, Done):
            self.end_time = now
        return None

    def _reserve(self, stage: Stage, now: float) -> SourceEvent:
        offer = Offered(stage.index, stage.count)
        if stage.index == 0:
            state = self._state or perform.peek(self.src.engine, self.request_id)
            if isinstance(state, SourceFailed):
                return state
            problem = perform.admission_problem(self.dst.engine, state)
            offer = Offered(stage.index, stage.count, self.dst.state == InstanceState.ACTIVE, problem)
        answer = self._call(offer, now)
        if isinstance(answer, Refuse):
            return Refused(f"pre-allocate: {answer.reason}")
        self._stage_ids[stage.index] = answer.block_ids
        return Reserved(stage.index, len(answer.block_ids))

    def _call(self, event: DestinationEvent, now: float) -> Accept | Refuse:
        """One call of the source into the destination: its machine's actions performed, and its answer."""
        answer: Accept | Refuse = Accept()
        pending: list[DestinationAction] = self.destination.step(event)
        engine = self.dst.engine
        while pending:
            action = pending.pop(0)
            if isinstance(action, ReserveBlocks):
                pending += self.destination.step(perform.reserve(engine, action.stage, action.count))
            elif isinstance(action, Install):
                assert self._state is not None
                pending += self.destination.step(perform.install(engine, self._state, action.block_ids, now))
            elif isinstance(action, Free) and action.block_ids:
                engine.free_reserved(action.block_ids)
            elif isinstance(action, (Accept, Refuse)):
                answer = action
        return answer
