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
import itertools

from pyllumnix.data_plane.engine.base import MigrationState, UnknownRequestError
from pyllumnix.data_plane.llumlet.migration import events as ev
from pyllumnix.data_plane.llumlet.migration import perform
from pyllumnix.data_plane.llumlet.migration.destination import DestinationMigration
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits, Stage
from pyllumnix.data_plane.llumlet.migration.source import SourceMigration
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.tools.sim.config import TransferModel
from pyllumnix.tools.sim.instance import SimInstance

Outcome = ev.Outcome  # the machines' vocabulary, re-exported for the summary and tests

__all__ = ["MigrationProcess", "Outcome"]

# Keys the migrations' slots: unique in the process (two orders for the same request and pair are two migrations).
_SERIAL = itertools.count()


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
        mid = f"{src.instance_id}>{dst.instance_id}/{request_id}#{next(_SERIAL)}"
        self.source = SourceMigration(mid, request_id, limits, src.out_slots)
        self.destination = DestinationMigration(mid, dst.in_slots)
        self._actions: list[ev.SourceAction] = self.source.step(ev.Start())
        self._state: MigrationState | None = None
        self._suspended_at = 0.0
        self._copying: Stage | None = None
        self._stage_ids: dict[int, tuple[int, ...]] = {}

    @property
    def outcome(self) -> ev.Outcome:
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
            if isinstance(action, ev.Copy):
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
        answer = self._call(ev.StageLanded(stage.index, self._stage_ids.get(stage.index, ())), now)
        event = ev.Copied(stage.index) if isinstance(answer, ev.Accept) else ev.CopyFailed(f"transfer: {answer.reason}")
        self._actions = self.source.step(event)
        if self._actions and isinstance(self._actions[0], ev.Observe):
            return False
        return self.begin_stage(now) is None

    # --- the actions ---
    def _perform(self, action: ev.SourceAction, now: float) -> ev.SourceEvent | None:
        engine = self.src.engine
        rid = self.request_id
        if isinstance(action, ev.Observe):
            return perform.observe(engine, rid)
        if isinstance(action, ev.Suspend):
            event, self._state = perform.suspend(engine, rid)
            self._suspended_at = now
            return event
        if isinstance(action, ev.Reserve):
            return self._reserve(action.stage, now)
        if isinstance(action, ev.Flush):
            return ev.Flushed()  # outputs reach the tracker as they are produced
        if isinstance(action, ev.Commit):
            ids = tuple(b for _, stage_ids in sorted(self._stage_ids.items()) for b in stage_ids)
            answer = self._call(ev.CommitAsked(ids), now)
            return ev.Committed() if isinstance(answer, ev.Accept) else ev.CommitFailed(f"commit: {answer.reason}")
        if isinstance(action, ev.TellAbort):
            self._call(ev.AbortAsked(action.reason), now)
        elif isinstance(action, ev.Resume):
            perform.resume(engine, rid)
        elif isinstance(action, ev.Release):
            engine.release_suspended(rid)
            self.downtime_s = now - self._suspended_at
        elif isinstance(action, ev.AbortHere):
            with contextlib.suppress(UnknownRequestError):
                engine.abort_request(rid)
        elif isinstance(action, ev.ForwardAbort):
            with contextlib.suppress(UnknownRequestError):
                self.dst.engine.abort_request(rid)
        elif isinstance(action, ev.Done):
            self.end_time = now
        return None

    def _reserve(self, stage: Stage, now: float) -> ev.SourceEvent:
        offer = ev.Offered(stage.index, stage.count)
        if stage.index == 0:
            state = self._state or perform.peek(self.src.engine, self.request_id)
            if isinstance(state, ev.SourceFailed):
                return state
            problem = perform.admission_problem(self.dst.engine, state)
            offer = ev.Offered(stage.index, stage.count, self.dst.state == InstanceState.ACTIVE, problem)
        answer = self._call(offer, now)
        if isinstance(answer, ev.Refuse):
            return ev.Refused(f"pre-allocate: {answer.reason}")
        self._stage_ids[stage.index] = answer.block_ids
        return ev.Reserved(stage.index, len(answer.block_ids))

    def _call(self, event: ev.DestinationEvent, now: float) -> ev.Accept | ev.Refuse:
        """One call of the source into the destination: its machine's actions performed, and its answer."""
        answer: ev.Accept | ev.Refuse = ev.Accept()
        pending: list[ev.DestinationAction] = self.destination.step(event)
        engine = self.dst.engine
        while pending:
            action = pending.pop(0)
            if isinstance(action, ev.ReserveBlocks):
                pending += self.destination.step(perform.reserve(engine, action.stage, action.count))
            elif isinstance(action, ev.Install):
                assert self._state is not None
                pending += self.destination.step(perform.install(engine, self._state, action.block_ids, now))
            elif isinstance(action, ev.Free) and action.block_ids:
                engine.free_reserved(action.block_ids)
            elif isinstance(action, (ev.Accept, ev.Refuse)):
                answer = action
        return answer
