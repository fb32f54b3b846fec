"""The destination side of one migration as a pure state machine: ``step(event) -> actions``, no I/O, no clock.

It admits the first stage (a KV layout byte-compatible with the source's, instance accepting, a free ``max_in``
slot, a request it can hold), reserves each stage's
blocks, checks that what the source says it sent is what arrived, installs the request on commit and frees every
reserved block on any other ending: a refusal, a failed stage, a failed install, the source's abort, or a source
silent for the pending timeout. A reservation that completes after the migration ended is freed at once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from pyllumnix.data_plane.llumlet.migration.events import (
    AbortAsked,
    Accept,
    BlocksReserved,
    Closed,
    CommitAsked,
    DestinationAction,
    DestinationEvent,
    Free,
    Install,
    Installed,
    InstallFailed,
    Offered,
    Receive,
    Refusal,
    Refuse,
    ReserveBlocks,
    ReserveFailed,
    Slots,
    SourceSilent,
    StageLanded,
)


class DestinationState(enum.Enum):
    NEW = "new"
    RESERVING = "reserving"
    OPEN = "open"  # between calls of the source
    INSTALLING = "installing"
    CLOSED = "closed"


class DestinationMigration:
    """One incoming migration (``migration_id`` keys its slot in ``slots``, the destination's ``max_in``;
    ``instance`` names the destination in refusals)."""

    def __init__(self, migration_id: str, slots: Slots, instance: str = "this instance") -> None:
        self.migration_id = migration_id
        self.slots = slots
        self.instance = instance
        self.state = DestinationState.NEW
        self.block_ids: list[int] = []
        self.stage_blocks: dict[int, tuple[int, ...]] = {}
        self.landed: set[int] = set()
        self.installed = False
        # Set when the source aborts while the install waits for the engine: the source resumes the request, so the
        # driver must not install it any more (``install_abandoned``); an install already done stays.
        self.abort_reason = ""

    @property
    def install_abandoned(self) -> str:
        """Why the install the machine asked for must not run any more ("" : it may): asked by the driver under the
        engine lock, just before it installs."""
        return f"the source aborted the migration: {self.abort_reason}" if self.abort_reason else ""

    @property
    def closed(self) -> bool:
        return self.state is DestinationState.CLOSED

    def step(self, event: DestinationEvent) -> list[DestinationAction]:
        if self.state is DestinationState.CLOSED:
            return self._after_close(event)
        if isinstance(event, (AbortAsked, SourceSilent)):
            if self.state is DestinationState.INSTALLING:
                # The install decides: freeing its blocks under it would corrupt an installed request. A source that
                # aborts here got no answer to its commit and resumes the request: an install not begun must not run.
                if isinstance(event, AbortAsked):
                    self.abort_reason = event.reason
                    return [Accept()]
                return []
            closing = self._close(event.reason)
            return [*closing, Accept()] if isinstance(event, AbortAsked) else closing
        handler = _HANDLERS.get((self.state, type(event)))
        if handler is None and self.state is DestinationState.INSTALLING:
            # Never close under a running install (its blocks become the request's): refuse only this call.
            return [Refuse(Refusal.INVALID, f"{type(event).__name__} while installing")]
        if handler is None:
            # A call out of order (e.g. a second stage while one is being reserved): the source is confused.
            return self._refuse(Refusal.INVALID, f"{type(event).__name__} while {self.state.value}")
        return handler(self, event)

    # ------------------------------------------------------------------ transitions
    def _first_offer(self, event: Offered) -> list[DestinationAction]:
        if event.stage != 0:
            return self._refuse(Refusal.UNKNOWN, f"unknown migration {self.migration_id} (timed out?)")
        if event.num_blocks < 0:
            return self._refuse(Refusal.INVALID, "num_blocks must be >= 0")
        if event.layout_mismatch:
            return self._refuse(Refusal.INCOMPATIBLE, event.layout_mismatch)
        if not event.accepting:
            return self._refuse(Refusal.NOT_ACCEPTING, f"{self.instance} takes no requests")
        if event.invalid is not None:
            return self._refuse(event.invalid.kind, event.invalid.reason)
        if not self.slots.take(self.migration_id):
            return self._refuse(Refusal.NO_SLOT, f"{self.instance} has no free migration slot")
        return self._offer(event)

    def _offer(self, event: Offered) -> list[DestinationAction]:
        if event.num_blocks < 0:
            return self._refuse(Refusal.INVALID, "num_blocks must be >= 0")
        if event.stage in self.stage_blocks:
            return self._refuse(Refusal.INVALID, f"stage {event.stage} was already reserved")
        self.state = DestinationState.RESERVING
        if event.num_blocks == 0:
            return self._reserved(BlocksReserved(event.stage, ()))
        return [ReserveBlocks(event.stage, event.num_blocks)]

    def _reserved(self, event: BlocksReserved) -> list[DestinationAction]:
        self.state = DestinationState.OPEN
        self.block_ids.extend(event.block_ids)
        self.stage_blocks[event.stage] = event.block_ids
        if not event.block_ids:
            self.landed.add(event.stage)  # nothing to receive
            return [Accept(())]
        return [Receive(event.stage, event.block_ids), Accept(event.block_ids)]

    def _reserve_failed(self, event: ReserveFailed) -> list[DestinationAction]:
        return self._refuse(Refusal.NO_BLOCKS, event.reason, free_reason="pre-allocation refused")

    def _landed(self, event: StageLanded) -> list[DestinationAction]:
        if self.stage_blocks.get(event.stage) != event.block_ids:
            return self._refuse(Refusal.INVALID, "stage block ids do not match the reservation")
        if event.timed_out:
            return self._refuse(Refusal.TIMED_OUT, f"stage bytes did not arrive: {event.error}")
        if event.error:
            return self._refuse(Refusal.DATA_LOST, event.error)
        self.landed.add(event.stage)
        return [Accept()]

    def _commit(self, event: CommitAsked) -> list[DestinationAction]:
        if set(self.stage_blocks) - self.landed:
            return self._refuse(
                Refusal.NOT_READY, "not every stage was transferred", free_reason="commit before every stage completed"
            )
        if list(event.block_ids) != self.block_ids:
            return self._refuse(Refusal.INVALID, "block ids do not match the reservation")
        self.state = DestinationState.INSTALLING
        return [Install(tuple(self.block_ids))]

    def _installed(self, _: Installed) -> list[DestinationAction]:
        self.installed = True
        self.block_ids = []  # they belong to the request now
        return [Accept(), *self._close("committed")]

    def _install_failed(self, event: InstallFailed) -> list[DestinationAction]:
        return self._refuse(Refusal.NOT_READY, f"commit failed: {event.reason}")

    def _after_close(self, event: DestinationEvent) -> list[DestinationAction]:
        if isinstance(event, BlocksReserved) and event.block_ids:
            return [Free(event.block_ids, "the migration ended while its blocks were being reserved")]
        if isinstance(event, AbortAsked):
            return [Accept()]
        if isinstance(event, CommitAsked) and self.installed:
            # A source whose commit call failed without an answer asks again: the commit is decided here, once, and
            # a repeated commit learns that decision (installed: success; freed: the migration is unknown now).
            return [Accept()]
        if isinstance(event, (Offered, StageLanded, CommitAsked)):
            return [Refuse(Refusal.UNKNOWN, f"unknown migration {self.migration_id}")]
        return []

    # ------------------------------------------------------------------ endings
    def _refuse(self, kind: Refusal, reason: str, free_reason: str = "") -> list[DestinationAction]:
        return [*self._close(free_reason or reason), Refuse(kind, reason)]

    def _close(self, reason: str) -> list[DestinationAction]:
        actions: list[DestinationAction] = []
        if self.state is not DestinationState.NEW and not self.installed:
            actions.append(Free(tuple(self.block_ids), reason))
        self.block_ids = []
        self.state = DestinationState.CLOSED
        self.slots.give(self.migration_id)
        actions.append(Closed(self.installed, reason))
        return actions


_HANDLERS: dict[tuple[DestinationState, type], Callable[[DestinationMigration, Any], list[DestinationAction]]] = {
    (DestinationState.NEW, Offered): DestinationMigration._first_offer,
    (DestinationState.OPEN, Offered): DestinationMigration._offer,
    (DestinationState.RESERVING, BlocksReserved): DestinationMigration._reserved,
    (DestinationState.RESERVING, ReserveFailed): DestinationMigration._reserve_failed,
    (DestinationState.OPEN, StageLanded): DestinationMigration._landed,
    (DestinationState.OPEN, CommitAsked): DestinationMigration._commit,
    (DestinationState.INSTALLING, Installed): DestinationMigration._installed,
    (DestinationState.INSTALLING, InstallFailed): DestinationMigration._install_failed,
}
