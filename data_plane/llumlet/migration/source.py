"""The source side of one migration as a pure state machine: ``step(event) -> actions``, no I/O, no clock.

The plan (``plan.next_stage``) says which blocks each stage copies; this machine sequences the stages around it and
owns every decision a driver used to take inline: when to observe and suspend, when the request changed under the
migration (finished, aborted, preempted), what a refusal or failure aborts, when a client's abort stops the
migration, and what each ending leaves to clean up. The live coordinator performs its actions over gRPC and the
transport, the simulator on a virtual clock; both therefore run one protocol.

Per stage: observe (the request must still run and not have been preempted since the start), plan; a last stage
suspends the request first; reserve the stage's blocks on the destination; copy them. After the last stage: flush
the source's outputs, check for a client abort, commit, release. A request that waits (no KV) is suspended at once
and moves in one stage. Every abort tells the destination (when it was asked to reserve), resumes a suspended
request and applies a client abort deferred meanwhile.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyllumnix.data_plane.engine.base import Phase
from pyllumnix.data_plane.llumlet.migration.events import (
    AbortHere,
    ClientAborted,
    Commit,
    CommitFailed,
    Committed,
    Copied,
    Copy,
    CopyFailed,
    Done,
    Flush,
    Flushed,
    ForwardAbort,
    Observe,
    Observed,
    Outcome,
    Refused,
    Release,
    Reserve,
    Reserved,
    Resume,
    Slots,
    SourceAction,
    SourceEvent,
    SourceFailed,
    Start,
    Suspend,
    Suspended,
    TellAbort,
)
from pyllumnix.data_plane.llumlet.migration.plan import GiveUp, MigrationLimits, Stage, next_stage


class SourceState(enum.Enum):
    NEW = "new"
    FIRST_LOOK = "first_look"  # waiting for the first observation
    OBSERVING = "observing"  # top of a pre-copy stage
    SUSPENDING = "suspending"
    RESERVING = "reserving"
    COPYING = "copying"
    FLUSHING = "flushing"
    COMMITTING = "committing"
    DONE = "done"


class ProtocolError(Exception):
    """A driver fed an event the machine cannot be waiting for: a bug in the driver, never a protocol outcome."""


class SourceMigration:
    """One outgoing migration of ``request_id`` (``migration_id`` keys its slot in ``slots``, the source's
    ``max_out``)."""

    def __init__(self, migration_id: str, request_id: str, limits: MigrationLimits, slots: Slots) -> None:
        self.migration_id = migration_id
        self.request_id = request_id
        self.limits = limits
        self.slots = slots
        self.state = SourceState.NEW
        self.outcome = Outcome.RUNNING
        self.reason = ""
        # Stages whose blocks the destination acknowledged, and how many leading blocks they covered.
        self.stages = 0
        self.blocks_copied = 0
        self.stage: Stage | None = None
        self.suspended = False
        self.client_aborted = False
        self._preemptions0 = 0
        self._asked_reserve = False
        self._asked_suspend = False

    @property
    def done(self) -> bool:
        return self.state is SourceState.DONE

    @property
    def asked_reserve(self) -> bool:
        """The destination was asked to reserve blocks: an abort tells it (``TellAbort``) to free them."""
        return self._asked_reserve

    def step(self, event: SourceEvent) -> list[SourceAction]:
        if isinstance(event, ClientAborted):
            return self._client_aborted()
        if isinstance(event, SourceFailed) and self.state not in (SourceState.NEW, SourceState.DONE):
            return self._abort_by_source(event.reason)  # also while waiting for another answer (shutdown, a bug)
        handler = _HANDLERS.get((self.state, type(event)))
        if handler is None:
            if self.state is SourceState.DONE:
                return []  # a late answer to an action the ending made moot
            raise ProtocolError(f"{type(event).__name__} while {self.state.value}")
        return handler(self, event)

    # ------------------------------------------------------------------ transitions
    def _start(self, _: Start) -> list[SourceAction]:
        if not self.slots.take(self.migration_id):
            return self._end(Outcome.ABORTED_BY_SOURCE, "the source is already migrating out (no free slot)")
        self.state = SourceState.FIRST_LOOK
        return [Observe()]

    def _vanished(self, event: Observed) -> str | None:
        rid = self.request_id
        if event.phase is None:
            return f"request {rid} finished or was aborted during migration"
        if event.phase is Phase.FINISHED:
            return f"request {rid} finished during migration"
        return None

    def _first_look(self, event: Observed) -> list[SourceAction]:
        gone = self._vanished(event)
        if gone is not None:
            return self._abort_by_source(gone)
        if event.phase is Phase.SUSPENDED:
            return self._abort_by_source(f"request {self.request_id} is already migrating")
        self._preemptions0 = event.preemptions
        if event.phase is Phase.WAITING:
            return self._suspend()
        return self._observe()

    def _observed(self, event: Observed) -> list[SourceAction]:
        gone = self._vanished(event)
        if gone is not None:
            return self._abort_by_source(gone)
        if event.phase is Phase.SUSPENDED and event.preemptions == self._preemptions0:
            # Only a migration suspends a request: another one of it (``--max-out`` > 1) reached its last stage.
            return self._abort_by_source(f"request {self.request_id} is already migrating (another migration took it)")
        if event.phase is not Phase.RUNNING or event.preemptions != self._preemptions0:
            return self._abort_by_source(f"request {self.request_id} was preempted during migration")
        plan = next_stage(self.limits, self.stages, self.blocks_copied, event.blocks)
        if isinstance(plan, GiveUp):
            return self._abort_by_source(plan.reason)
        if plan.last:
            return self._suspend()
        return self._reserve(plan)

    def _suspended(self, event: Suspended) -> list[SourceAction]:
        self.suspended = True
        # Suspended, nothing changes any more: whatever is left goes in one (last) stage.
        limits = replace(self.limits, last_stage_max_blocks=max(1, event.blocks - self.blocks_copied))
        plan = next_stage(limits, self.stages, self.blocks_copied, event.blocks)
        if isinstance(plan, GiveUp):
            return self._abort_by_source(plan.reason)
        return self._reserve(plan)

    def _reserved(self, event: Reserved) -> list[SourceAction]:
        stage = self.stage
        assert stage is not None
        if event.stage != stage.index:
            raise ProtocolError(f"reserved stage {event.stage}, asked {stage.index}")
        if event.count != stage.count:
            return self._abort_by_destination(f"destination reserved {event.count} blocks, asked {stage.count}")
        return self._copy(stage)

    def _copied(self, event: Copied) -> list[SourceAction]:
        stage = self.stage
        assert stage is not None
        if event.stage != stage.index:
            raise ProtocolError(f"copied stage {event.stage}, sending {stage.index}")
        self.blocks_copied += stage.count
        self.stages = stage.index + 1
        return self._observe() if not stage.last else self._flush()

    def _flushed(self, _: Flushed) -> list[SourceAction]:
        # The last check before the commit: a client abort that came during the migration stops it here (the stages
        # run to the end first; only a suspended request's abort is deferred, and it is suspended for the last one).
        if self.client_aborted:
            return self._abort_by_source(f"request {self.request_id} was aborted by its client during migration")
        return self._commit()

    def _committed(self, event: Committed) -> list[SourceAction]:
        actions: list[SourceAction] = [Release()]
        if self.client_aborted:
            actions.append(ForwardAbort())  # the request lives on the destination now
        return actions + self._finish(Outcome.COMMITTED, event.note)

    def _destination_failed(self, event: Refused | CopyFailed | CommitFailed) -> list[SourceAction]:
        return self._abort_by_destination(event.reason)

    def _client_aborted(self) -> list[SourceAction]:
        if self.client_aborted:
            return []
        self.client_aborted = True
        if self.outcome is Outcome.COMMITTED:
            return [ForwardAbort()]
        if self.state is SourceState.DONE:
            return [AbortHere()]
        # Acted on before the commit (a commit in flight is settled by its answer).
        return []

    # ------------------------------------------------------------------ helpers
    def _observe(self) -> list[SourceAction]:
        self.state = SourceState.OBSERVING
        return [Observe()]

    def _suspend(self) -> list[SourceAction]:
        self.state = SourceState.SUSPENDING
        self._asked_suspend = True
        return [Suspend()]

    def _reserve(self, plan: Stage) -> list[SourceAction]:
        self.stage = plan
        self.state = SourceState.RESERVING
        self._asked_reserve = True
        return [Reserve(plan)]

    def _copy(self, stage: Stage) -> list[SourceAction]:
        self.state = SourceState.COPYING
        return [Copy(stage)]

    def _flush(self) -> list[SourceAction]:
        self.state = SourceState.FLUSHING
        return [Flush()]

    def _commit(self) -> list[SourceAction]:
        self.state = SourceState.COMMITTING
        return [Commit()]

    def _abort_by_source(self, reason: str) -> list[SourceAction]:
        return self._end(Outcome.ABORTED_BY_SOURCE, reason)

    def _abort_by_destination(self, reason: str) -> list[SourceAction]:
        return self._end(Outcome.ABORTED_BY_DESTINATION, reason)

    def _end(self, outcome: Outcome, reason: str) -> list[SourceAction]:
        """Leak-free either way: the destination frees its reservation, a suspended request runs again here."""
        actions: list[SourceAction] = []
        if self._asked_reserve:
            actions.append(TellAbort(reason))
        if self._asked_suspend:
            actions.append(Resume())
        if self.client_aborted:
            actions.append(AbortHere())
        return actions + self._finish(outcome, reason)

    def _finish(self, outcome: Outcome, reason: str) -> list[SourceAction]:
        self.state = SourceState.DONE
        self.outcome = outcome
        self.reason = reason
        self.slots.give(self.migration_id)
        return [Done(outcome, reason)]


_HANDLERS: dict[tuple[SourceState, type], Callable[[SourceMigration, Any], list[SourceAction]]] = {
    (SourceState.NEW, Start): SourceMigration._start,
    (SourceState.FIRST_LOOK, Observed): SourceMigration._first_look,
    (SourceState.OBSERVING, Observed): SourceMigration._observed,
    (SourceState.SUSPENDING, Suspended): SourceMigration._suspended,
    (SourceState.RESERVING, Reserved): SourceMigration._reserved,
    (SourceState.RESERVING, Refused): SourceMigration._destination_failed,
    (SourceState.COPYING, Copied): SourceMigration._copied,
    (SourceState.COPYING, CopyFailed): SourceMigration._destination_failed,
    (SourceState.FLUSHING, Flushed): SourceMigration._flushed,
    (SourceState.COMMITTING, Committed): SourceMigration._committed,
    (SourceState.COMMITTING, CommitFailed): SourceMigration._destination_failed,
}
