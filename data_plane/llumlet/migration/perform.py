"""The engine-side halves of the migration machines' actions, shared by both drivers (the live coordinator calls
them under the engine lock, the simulator directly): each reads or changes one engine and returns the event the
machine is waiting for, so the live cluster and the simulator observe, suspend, reserve and install alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyllumnix.data_plane.engine.base import (
    Engine,
    EngineError,
    MigrationState,
    Phase,
    UnknownRequestError,
)
from pyllumnix.data_plane.engine.kv_layout import KvLayoutMismatch, check_peer_layout
from pyllumnix.data_plane.llumlet.migration.events import (
    BlocksReserved,
    Installed,
    InstallFailed,
    Observed,
    Refusal,
    Refuse,
    ReserveFailed,
    SourceFailed,
    Suspended,
)
from pyllumnix.data_plane.llumlet.migration.plan import Stage


def observe(engine: Engine, request_id: str) -> Observed:
    """Phase, block count and preemption count of the request (``export_state``: one request, not a load scan)."""
    try:
        phase = engine.phase(request_id)
        if phase is Phase.FINISHED:
            return Observed(phase)
        return Observed(phase, len(engine.block_ids(request_id)), engine.export_state(request_id).num_preemptions)
    except UnknownRequestError:
        return Observed(None)


def stage_blocks(engine: Engine, request_id: str, stage: Stage) -> list[int] | SourceFailed:
    """The source blocks ``stage`` copies, read right before the copy (under the engine lock).

    The observation that planned the stage is older: the reservation's round trip runs while the engine steps, so
    the request may have finished or lost its blocks to a preemption meanwhile. Fewer blocks than the stage reserved
    must fail the copy (the machine then tells the destination), never shrink it: the destination expects every
    reserved block's bytes and would hold the reservation until its stall timeout."""
    try:
        phase = engine.phase(request_id)
        if phase is Phase.FINISHED:
            return SourceFailed(f"request {request_id} finished during migration")
        ids = engine.block_ids(request_id)[stage.first : stage.first + stage.count]
    except UnknownRequestError:
        return SourceFailed(f"request {request_id} finished or was aborted during migration")
    if len(ids) != stage.count or (phase is Phase.WAITING and stage.count):
        return SourceFailed(f"request {request_id} was preempted during migration")
    return ids


def suspend(engine: Engine, request_id: str) -> tuple[Suspended | SourceFailed, MigrationState | None]:
    """Suspends the request; its continuation state travels with the commit."""
    try:
        state = engine.suspend(request_id)
    except UnknownRequestError:
        return SourceFailed(f"request {request_id} finished or was aborted during migration"), None
    except EngineError as exc:
        return SourceFailed(f"cannot suspend {request_id}: {exc}"), None
    return Suspended(len(engine.block_ids(request_id))), state


def peek(engine: Engine, request_id: str) -> MigrationState | SourceFailed:
    """The request's state for the first reservation (the destination validates it) without suspending it."""
    try:
        return engine.export_state(request_id)
    except UnknownRequestError:
        return SourceFailed(f"request {request_id} finished or was aborted during migration")


def resume(engine: Engine, request_id: str) -> None:
    """Puts the request back into scheduling if it is still suspended (gone or running: nothing to do)."""
    try:
        if engine.phase(request_id) is Phase.SUSPENDED:
            engine.resume(request_id)
    except UnknownRequestError:
        pass


def reserve(engine: Engine, stage: int, count: int) -> BlocksReserved | ReserveFailed:
    try:
        return BlocksReserved(stage, tuple(engine.reserve_blocks(count)))
    except EngineError as exc:
        return ReserveFailed(str(exc))


def install(engine: Engine, state: MigrationState, block_ids: Sequence[int], now: float) -> Installed | InstallFailed:
    try:
        engine.commit_incoming(state, block_ids, now)
    except EngineError as exc:
        return InstallFailed(str(exc))
    return Installed()


def layout_mismatch(engine: Engine, peer_layout: str) -> str:
    """Why the source's KV blocks (its ``KvLayout.encode()``) cannot land in this engine's: empty when they can."""
    try:
        check_peer_layout(engine.kv_layout(), peer_layout)
    except KvLayoutMismatch as exc:
        return str(exc)
    return ""


def admission_problem(engine: Engine, state: MigrationState) -> Refuse | None:
    """What keeps the destination from holding the request a first stage carries: none when it can."""
    rid = state.spec.request_id
    if not rid:
        return Refuse(Refusal.INVALID, "the first stage must carry the request")
    if rid in engine.request_ids():
        return Refuse(Refusal.DUPLICATE, f"request {rid} is already here")
    total = len(state.spec.prompt_token_ids) + state.spec.sampling.max_tokens
    if total > engine.max_model_len:
        return Refuse(Refusal.INVALID, f"request needs {total} tokens > max length {engine.max_model_len}")
    return None
