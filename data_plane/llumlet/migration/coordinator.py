"""The migration coordinator of one llumlet: the driver of the migration machines (``source.py``,
``destination.py``) in both roles. It decides nothing about the protocol: it performs each action the machines ask
for (under the engine lock, over gRPC for the handshake, over the data-plane transport for the blocks) and feeds the
result back as an event; the simulator (``tools/sim/migration.py``) drives the same machines on a virtual clock.

Leak-freedom is the invariant every path keeps:
- source-side abort (request finished, aborted or preempted meanwhile; stages did not converge): the source calls
  AbortMigration and the destination frees its reservation;
- destination-side abort (pre-allocation refused, transfer failed or timed out, commit failed, destination dead): the
  source puts a suspended request back into its running queue; the destination frees what it reserved itself;
- source dead: the destination frees a reservation no call has touched for ``pending_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_before_delay, stop_when_event_set, wait_exponential

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.selection import blocks_needed, select_request
from pyllumnix.data_plane.engine.base import Finish, KvBuffer, MigrationState, TokenOutput, UnknownRequestError
from pyllumnix.data_plane.engine.device import Ready
from pyllumnix.data_plane.engine.kv_layout import LAYOUT_HOST_BYTES
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import Llumlet, RequestOwner
from pyllumnix.data_plane.llumlet.migration import events as ev
from pyllumnix.data_plane.llumlet.migration import perform
from pyllumnix.data_plane.llumlet.migration.destination import DestinationMigration, DestinationState
from pyllumnix.data_plane.llumlet.migration.order import incoming_pending_timeout_s, order_settings
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits, Stage
from pyllumnix.data_plane.llumlet.migration.source import SourceMigration, SourceState
from pyllumnix.data_plane.llumlet.output_push import FrontendUnreachableError
from pyllumnix.data_plane.llumlet.service import (
    MigrationError,
    PassedOn,
    forwarded_abort,
    forwarded_abort_metadata,
)
from pyllumnix.data_plane.llumlet.views import request_views
from pyllumnix.data_plane.transport.base import Transport, TransportError
from pyllumnix.data_plane.transport.fusion import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    ChunkBuffers,
    plan_chunks,
    receive_blocks,
    send_blocks,
)
from pyllumnix.infra import tracing, wire
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import llumlet_pb2, llumlet_pb2_grpc

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 2.0
# Seconds a llumlet remembers where a request it had migrated in went on to (``PassedOn``): a source's forwarded abort
# is one CONTROL_TIMEOUT_S call, so it arrives well within this, or never.
PASSED_ON_KEEP_S = 60.0
# Seconds ``close`` waits for cancelled migrations to settle (their shielded AbortMigration to the peer).
CLOSE_WAIT_S = 5.0
# Seconds a destination remembers how a migration ended, so a source whose commit call failed without an answer
# (deadline, lost connection) learns by asking again whether the request was installed (``_commit``).
ENDED_KEEP_S = 60.0
# Commit calls a source makes at most before it takes a migration the destination never answered for not installed.
COMMIT_ASKS = 3
# Pause before the n-th repeated commit (or take-back) ask is n times this: a lost connection fails at once, and
# asks with no pause would all land inside one short network blip.
COMMIT_RETRY_S = 0.1
# Seconds a source keeps asking an unreachable frontend to settle an unanswered commit (TakeBack) before it releases
# the request with an ERROR queued for it; the request stays suspended meanwhile.
TAKE_BACK_BUDGET_S = 10.0
# Answers that say nothing about whether the destination installed: the call may have run there, or be running.
_UNDECIDED = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


@dataclass
class MigrationSettings:
    limits: MigrationLimits = field(default_factory=MigrationLimits)
    pending_timeout_s: float = 10.0
    transfer_timeout_s: float = 10.0
    # The transport's progress watchdog: a stage fails once no chunk completed for this long (None: only the stage's
    # transfer_timeout_s bounds it).
    stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_in: int = 1
    max_out: int = 1
    # CRC-32 of every stage's bytes, checked by the destination before the commit (#13: on by default, so a corrupted
    # or tampered transfer never becomes a request's KV; zlib.crc32 ran at ~0.5 GB/s on the shared dev machine).
    verify_crc: bool = True
    # Chunk buffers as torch tensors on the engine's KV device, filled and drained by its asynchronous hooks (#17):
    # None picks them for engines whose KV cache is torch tensors (vLLM), host arrays for opaque host bytes (the
    # simulated engine, unchanged); True forces them (any engine's default hooks take CPU tensors), False host arrays.
    device_buffers: bool | None = None
    # The cluster's pending timeout as the leader's orders carried it (order.py), passed on to destinations; 0: none.
    cluster_pending_timeout_ms: int = 0


class MigrationHooks:
    """Named points of a source-side migration at which a test acts (aborts the request, stops a peer, waits for a
    preemption) so that each abort path runs at a known stage instead of after a guessed sleep. Every default does
    nothing; production passes no hooks. ``stage`` is the index of the stage the point precedes (for the commit: the
    number of stages transferred)."""

    async def before_stage(self, migration_id: str, request_id: str, stage: int) -> None:
        """Top of each stage, before the source re-reads the request (phase, blocks, preemptions)."""

    async def before_last_stage(self, migration_id: str, request_id: str, stage: int) -> None:
        """The request is suspended for the stop-and-copy stage; its blocks are not pre-allocated yet."""

    async def before_copy(self, migration_id: str, request_id: str, stage: int) -> None:
        """The stage's blocks are reserved on the destination; the source reads which blocks to send next."""

    async def before_commit(self, migration_id: str, request_id: str, stage: int) -> None:
        """Every stage is transferred, outputs flushed and the last client-abort check done; the commit RPC is next."""


@dataclass
class _Incoming:
    """Destination-side record of one migration in progress: its machine plus what the driver performs for it."""

    migration_id: str
    source_instance_id: str
    request: llumlet_pb2.MigratingRequest
    machine: DestinationMigration
    stages: dict[int, asyncio.Task[tuple[int, int]]] = field(default_factory=dict)
    last_touch: float = 0.0
    commit: llumlet_pb2.CommitMigrationRequest | None = None
    # The commit's work (install or refusal), run once: a repeated commit call waits for it instead of starting one.
    committing: asyncio.Task[tuple[ev.Accept | None, int]] | None = None
    ended_at: float = 0.0
    # One-time secret of this migration's data-plane keys (sent to the source with the first PreAllocate answer).
    transfer_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # This migration's pending timeout (the reaper frees its reservation after this long without a call): the one its
    # source passed on, clamped around this llumlet's flag, or the flag (order.py incoming_pending_timeout_s).
    pending_timeout_s: float = 10.0
    # This migration's step tasks still running (``_own_step``): the reaper never collects an entry under one it
    # has not ended itself.
    running: set[asyncio.Task[tuple[ev.Accept | None, int]]] = field(default_factory=set)
    # Blocks of a Free the driver began and did not finish (its step failed or was cancelled): the reaper frees them.
    freeing: tuple[int, ...] = ()


@dataclass
class _Outgoing:
    """Source-side record of one migration: what the actions need that the machine does not decide."""

    machine: SourceMigration
    stub: llumlet_pb2_grpc.LlumletServiceStub
    result: llumlet_pb2.MigrationResult
    frontend: str
    # The destination's LlumletService address (where a late forwarded abort goes on to, see ``PassedOn``).
    address: str = ""
    state: MigrationState | None = None
    stage_dst: list[int] = field(default_factory=list)
    dst_ids: list[int] = field(default_factory=list)
    peer: str = ""
    transfer_token: str = ""
    capability: str = ""
    stopped_at: float = 0.0
    hooked_stage: int = -1
    timings: dict[str, float] = field(default_factory=dict)
    # Tracing (None when off, or the request came without a trace): the migration's span, a child of the request's
    # context here, and the current stage's (reserve + copy), so the destination's calls join the request's trace.
    span: Any = None
    stage_span: Any = None

    def start_stage_span(self, stage: Stage) -> None:
        self.end_stage_span()
        if self.span is not None:
            self.stage_span = tracing.start_span(
                "migration.stage",
                attributes={"llumnix.stage": stage.index, "llumnix.blocks": stage.count, "llumnix.last": stage.last},
            )

    def end_stage_span(self, error: str = "", nbytes: int = 0) -> None:
        if self.stage_span is None:
            return
        if error:
            self.stage_span.set_attribute("llumnix.error", error)
        if nbytes:
            self.stage_span.set_attribute("llumnix.bytes", nbytes)
        self.stage_span.end()
        self.stage_span = None


_REFUSAL_CODES = {
    ev.Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ev.Refusal.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    ev.Refusal.UNKNOWN: grpc.StatusCode.NOT_FOUND,
    ev.Refusal.NOT_ACCEPTING: grpc.StatusCode.FAILED_PRECONDITION,
    ev.Refusal.NO_SLOT: grpc.StatusCode.ABORTED,
    ev.Refusal.NO_BLOCKS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ev.Refusal.DATA_LOST: grpc.StatusCode.DATA_LOSS,
    ev.Refusal.TIMED_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ev.Refusal.NOT_READY: grpc.StatusCode.FAILED_PRECONDITION,
    ev.Refusal.INCOMPATIBLE: grpc.StatusCode.FAILED_PRECONDITION,
}


def data_key(migration_id: str, transfer_token: str, stage: int) -> str:
    """The data-plane key prefix of one stage. It embeds the migration's one-time token (#13), so only the source the
    destination answered can name a key the destination expects; frames under any other key land nowhere."""
    return f"{migration_id}~{transfer_token}/{stage}" if transfer_token else f"{migration_id}/{stage}"


class MigrationCoordinator:
    """Implements the service's MigrationHandler protocol for one llumlet."""

    def __init__(
        self,
        llumlet: Llumlet,
        transport: Transport,
        settings: MigrationSettings | None = None,
        hooks: MigrationHooks | None = None,
    ) -> None:
        self.llumlet = llumlet
        self.transport = transport
        # The settings the llumlet was started with (its flags), kept as they are: each order's settings are derived
        # from them (order.py), so an order whose knobs are 0 gets the flags back (REVIEW10 M1).
        self.flag_settings = settings or MigrationSettings()
        self.settings = self.flag_settings
        self.hooks = hooks
        self._incoming: dict[str, _Incoming] = {}
        # Set when a reservation is taken: the reaper sleeps on it while nothing is incoming (an idle llumlet woke
        # 4 times a second only to find no reservation).
        self._incoming_added = asyncio.Event()
        # Request id -> (the source it was migrated in from, the migration, its owner entry here): a source may
        # forward its client's abort after the commit (ForwardAbort), and only for a request it handed over to this
        # instance (``migrated_from``), naming the migration (``incarnation``). Keyed to the owner object, so a later
        # incarnation of the id is not covered.
        self._migrated_in: dict[str, tuple[str, str, RequestOwner]] = {}
        # (request id, the migration that brought it here) -> where it went on to, kept PASSED_ON_KEEP_S.
        self._passed_on: dict[tuple[str, str], PassedOn] = {}
        # max_out and max_in: the machines take a slot when they start and give it back when they end.
        self._out_slots = ev.Slots(self.settings.max_out)
        self._in_slots = ev.Slots(self.settings.max_in)
        # Requests an order of this source has taken (picked or named) until its migration of them ends, each with
        # its incarnation here (``llumlet.owners``): with ``max_out`` > 1 a second order for one of them is refused up
        # front and a selection skips them (before, both migrations ran and one aborted only when it found the request
        # suspended by the other). A claim binds the incarnation: once the request left (committed), a new request
        # reusing its id is free to move while the old migration still forwards a late abort.
        self._claimed_out: dict[str, RequestOwner | None] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Set when close begins: a source settling an unanswered commit stops asking its frontend (``_taken_over``).
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        # Destination-side steps (a machine's event and its actions), owned here so that a caller's cancellation (its
        # deadline, its going away) stops only its wait: it never cuts an install, a free or a close half-way.
        self._steps: set[asyncio.Task[tuple[ev.Accept | None, int]]] = set()
        # Migrations that ended here (installed or freed), kept ENDED_KEEP_S for a source asking again.
        self._ended: dict[str, _Incoming] = {}
        self.results: list[llumlet_pb2.MigrationResult] = []
        # Warm chunk buffers, one set per concurrent transfer (taken from and returned to these pools).
        self._send_pool: list[ChunkBuffers] = []
        self._recv_pool: list[ChunkBuffers] = []
        self.chunk_device = self._chunk_device()

    def _chunk_device(self) -> str | None:
        """Where chunk buffers live (None: host numpy arrays); refuses a transport that cannot carry that memory
        now, at start-up, rather than at the first migration."""
        engine = self.llumlet.engine
        want = self.settings.device_buffers
        if want is None:
            want = engine.kv_layout().name != LAYOUT_HOST_BYTES or engine.kv_device != "cpu"
        device = engine.kv_device if want else None
        carried = getattr(self.transport, "device", None)
        if carried and carried != device:
            raise ValueError(
                f"the data-plane transport carries device memory on {carried}, but this engine's migration chunks "
                f"are {'host memory' if device is None else 'on ' + device}: create the transport for the KV device"
            )
        if device is None and engine.kv_device != "cpu":
            raise ValueError(f"the KV cache is on {engine.kv_device}: migration chunk buffers must live there too")
        return device

    def _buffers(self, pool: list[ChunkBuffers], count: int) -> ChunkBuffers:
        return pool.pop() if pool else ChunkBuffers(count, device=self.chunk_device)

    def prewarm(self) -> None:
        """Touches one set of send and receive buffers now, so the first migration pays no page faults."""
        engine = self.llumlet.engine
        blocks = plan_chunks(1, engine.block_bytes, self.settings.chunk_bytes).blocks_per_chunk
        for pool, count in ((self._send_pool, 3), (self._recv_pool, 4)):
            buffers = ChunkBuffers(count, device=self.chunk_device)
            buffers.prewarm(blocks, engine.block_bytes)
            pool.append(buffers)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_pending(), name="migration-reaper")

    async def close(self) -> None:
        """Cancels the migrations in progress and waits for them (up to CLOSE_WAIT_S) before closing the channels:
        a cancelled source still tells its destination (a shielded AbortMigration), which then frees its
        reservation at once instead of after its pending timeout."""
        self._closing.set()
        if self._reaper is not None:
            self._reaper.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        if self._steps:  # installs and frees under way end as they would have (never cut half-way)
            await asyncio.wait(list(self._steps), timeout=CLOSE_WAIT_S)
        frees = [
            asyncio.ensure_future(self._free_incoming(mid, ev.AbortAsked("llumlet shutting down")))
            for mid in list(self._incoming)
        ]
        if frees:
            # Each free takes the engine lock, which a wedged step (a hung device call in its worker thread) never
            # gives back: waiting for it unbounded kept the shutdown from ever reaching the llumlet's own stop.
            _, late = await asyncio.wait(frees, timeout=CLOSE_WAIT_S)
            for task in late:
                task.cancel()
            if late:
                log.warning(
                    "%d incoming reservation(s) not freed within %g s (the engine is busy)", len(late), CLOSE_WAIT_S
                )
        for channel in self._channels.values():
            await channel.close()

    def incoming_source(self, migration_id: str) -> str | None:
        """The source instance that holds migration ``migration_id``'s reservation here, or held it until the
        migration ended within ENDED_KEEP_S: a repeated commit is answered to that source only (None: no such
        migration)."""
        incoming = self._incoming.get(migration_id)
        if incoming is None:
            incoming = self._ended.get(migration_id)
            if incoming is None or time.monotonic() - incoming.ended_at > ENDED_KEEP_S:
                return None
        return incoming.source_instance_id

    def incoming_request(self, migration_id: str) -> llumlet_pb2.MigratingRequest | None:
        """The request a migration's first stage announced (what its commit must match)."""
        incoming = self._incoming.get(migration_id)
        return incoming.request if incoming is not None else None

    def incoming_from(self, source_instance_id: str) -> list[str]:
        """Migrations ``source_instance_id`` holds a reservation for here."""
        return [mid for mid, inc in self._incoming.items() if inc.source_instance_id == source_instance_id]

    def migrated_from(self, request_id: str) -> str | None:
        """The source instance the request living here came from by migration (None: it did not, or has ended)."""
        entry = self._migrated_in.get(request_id)
        if entry is None:
            return None
        if self.llumlet.owners.get(request_id) is not entry[2]:
            del self._migrated_in[request_id]  # ended, migrated on, or the id reused: no longer that source's
            return None
        return entry[0]

    def incarnation(self, request_id: str, migration_id: str) -> RequestOwner | None:
        """The owner entry of the request migration ``migration_id`` brought here, while it still lives here (None:
        it ended or moved on, or the id now names another request: one added later, or another migration's)."""
        if self.migrated_from(request_id) is None:
            return None
        _, mid, owner = self._migrated_in[request_id]
        return owner if mid == migration_id else None

    def passed_on(self, request_id: str, migration_id: str) -> PassedOn | None:
        """Where the request migration ``migration_id`` brought here went on to by a later migration (None: it did
        not leave by migration, or that was more than PASSED_ON_KEEP_S ago)."""
        hop = self._passed_on.get((request_id, migration_id))
        if hop is not None and time.monotonic() - hop.at > PASSED_ON_KEEP_S:
            del self._passed_on[(request_id, migration_id)]
            return None
        return hop

    def _note_passed_on(self, request_id: str, owner: RequestOwner | None, onward: str, address: str) -> None:
        """Called under the engine lock as a committed migration releases the request here, in the same critical
        section as the owner entry goes, so an abort naming the inbound migration finds either the request or this."""
        entry = self._migrated_in.get(request_id)
        if owner is None or entry is None or entry[2] is not owner:
            return  # it had not come here by migration: its frontend's and its source's aborts went elsewhere
        del self._migrated_in[request_id]
        now = time.monotonic()
        self._passed_on = {k: h for k, h in self._passed_on.items() if now - h.at <= PASSED_ON_KEEP_S}
        self._passed_on[(request_id, entry[1])] = PassedOn(entry[0], onward, address, now)

    async def forward_abort(self, request_id: str, hop: PassedOn, timeout: float) -> None:
        """Passes a forwarded abort on to where the request went (naming that migration, so it ends only that
        incarnation there); raises grpc.aio.AioRpcError with the next llumlet's answer."""
        await self._stub(hop.address).AbortRequest(
            forwarded_abort(request_id, hop.onward),
            metadata=forwarded_abort_metadata(hop.onward),  # for a peer older than the field (one release)
            timeout=timeout,
        )

    @property
    def busy(self) -> bool:
        """A migration is in progress in either role."""
        return bool(self._incoming or self._out_slots.held)

    def _stub(self, address: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, peer="llumlet")
        return llumlet_pb2_grpc.LlumletServiceStub(channel)

    # ------------------------------------------------------------------ source role
    async def migrate_out(self, request: llumlet_pb2.MigrateOutRequest) -> llumlet_pb2.MigrateOutResponse:
        me = self.llumlet.instance_id
        if not request.destination_grpc_address:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "destination_grpc_address is empty")
        if request.destination_instance_id == me:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot migrate from {me} to itself")
        if request.request_id and request.request_id not in self.llumlet.engine.request_ids():
            raise MigrationError(grpc.StatusCode.NOT_FOUND, f"request {request.request_id} is not on {me}")
        if self._out_slots.full:
            raise MigrationError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{me} is already migrating out")
        if self._claimed(request.request_id):
            raise MigrationError(
                grpc.StatusCode.FAILED_PRECONDITION, f"request {request.request_id} is already migrating out of {me}"
            )
        if request.max_blocks < 0:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "max_blocks must be >= 0 (0: no limit)")
        try:  # the cluster config's knobs the order carries (0: the llumlet's own)
            limits, self.settings = order_settings(request, self.flag_settings)
        except ValueError as exc:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        count = max(1, request.max_requests)
        migration_ids = [f"{me}-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        self._out_slots.take(migration_ids[0])  # now: a second order must find the slot taken
        # The first pick happens before the answer, so an order that moves nothing (nothing fits the destination, or
        # nothing movable is left) answers so even without ``wait``, instead of naming a migration that never runs.
        first: tuple[str, int] | None = (request.request_id, 0) if request.request_id else None
        if first is None:
            try:
                first = await self._select(request.selection, request.max_blocks)
            finally:
                if first is None:
                    self._out_slots.give(migration_ids[0])
            if first is None:
                return llumlet_pb2.MigrateOutResponse()
            first_claim = self._claimed_out.get(first[0])  # _select claimed it (no await since)
        else:
            first_claim = self._claim(first[0])
        self.llumlet.set_migrating(outgoing=True)

        started = False

        async def run_all() -> list[llumlet_pb2.MigrationResult]:
            nonlocal first, started
            started = True
            results: list[llumlet_pb2.MigrationResult] = []
            # The destination's room (0: no limit); each committed migration uses up what it took of it.
            room = request.max_blocks
            try:
                for i, mid in enumerate(migration_ids):
                    if i and not self._out_slots.take(mid):
                        break  # another order took the slot between two migrations of this one
                    if i == 0 and first is not None:
                        rid, needed = first
                        claim = first_claim
                    elif request.request_id:
                        break  # a named request moves once (the loop ends after its migration anyway)
                    else:
                        picked = await self._select(request.selection, room)
                        if picked is None:
                            break  # nothing fits the destination: no more migrations
                        rid, needed = picked
                        claim = self._claimed_out.get(rid)  # _select claimed it (no await since)
                    try:
                        result = await self._migrate_one(
                            limits, mid, rid, request.destination_instance_id, request.destination_grpc_address
                        )
                    finally:
                        self._unclaim(rid, claim)
                        if i == 0:
                            first = None
                    results.append(result)
                    if result.outcome != llumlet_pb2.MIGRATION_OUTCOME_COMMITTED or request.request_id:
                        break
                    if room:
                        room -= needed
                        if room <= 0:
                            break
            finally:
                if first is not None:  # claimed, never migrated (cancelled before its first migration ran)
                    self._unclaim(first[0], first_claim)
                    first = None
                release()
            return results

        def release() -> None:
            for mid in migration_ids:
                self._out_slots.give(mid)
            self.llumlet.set_migrating(outgoing=bool(self._out_slots.held))

        def never_ran(done: asyncio.Task[list[llumlet_pb2.MigrationResult]]) -> None:
            """A task cancelled before its first step (``close``) runs no ``finally``: its claim and slot go here."""
            if not started and first is not None:
                self._unclaim(first[0], first_claim)
                release()

        # The migration runs in its own task: a caller that goes away (a scheduler leader killed while waiting) must
        # not cancel it halfway, with the request suspended and a reservation held on the destination.
        task = asyncio.get_running_loop().create_task(run_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(never_ran)
        if request.wait:
            return llumlet_pb2.MigrateOutResponse(results=await asyncio.shield(task))
        return llumlet_pb2.MigrateOutResponse(migration_ids=migration_ids[:1])

    async def _select(self, selection: int, max_blocks: int) -> tuple[str, int] | None:
        """The request the order's selection picks among those that fit ``max_blocks`` (0: any) and no other order
        took, with the destination blocks it takes; None when none does. The pick is claimed for the caller (released
        when its migration ends)."""
        async with self.llumlet.engine_lock.light():
            snap = self.llumlet.engine.load()
        selected = Selection(selection) if selection in Selection._value2member_map_ else Selection.SR
        views = [v for v in request_views(snap.requests) if not self._claimed(v.request_id)]
        rid = select_request(views, selected, max_blocks=max_blocks)
        if rid is None:
            return None
        self._claim(rid)  # no await since the filter: no other order can pick it in between
        return rid, next(blocks_needed(v) for v in views if v.request_id == rid)

    def _claimed(self, request_id: str) -> bool:
        """Whether an order of this source is migrating this incarnation of ``request_id`` out."""
        return request_id in self._claimed_out and self._claimed_out[request_id] is self.llumlet.owners.get(request_id)

    def _claim(self, request_id: str) -> RequestOwner | None:
        owner = self._claimed_out[request_id] = self.llumlet.owners.get(request_id)
        return owner

    def _unclaim(self, request_id: str, owner: RequestOwner | None) -> None:
        """Ends a claim, unless a newer incarnation of the id was claimed meanwhile (its claim is not this one's)."""
        if request_id in self._claimed_out and self._claimed_out[request_id] is owner:
            del self._claimed_out[request_id]

    async def _migrate_one(
        self, limits: MigrationLimits, mid: str, rid: str, dst_id: str, dst_address: str
    ) -> llumlet_pb2.MigrationResult:
        """Runs one migration to its end; never raises for protocol failures (they become the result's outcome)."""
        result = llumlet_pb2.MigrationResult(
            migration_id=mid,
            request_id=rid,
            source_instance_id=self.llumlet.instance_id,
            destination_instance_id=dst_id,
        )
        t0 = time.monotonic()
        owner = self.llumlet.owners.get(rid)
        out = _Outgoing(
            SourceMigration(mid, rid, limits, self._out_slots),
            self._stub(dst_address),
            result,
            owner.frontend_address if owner else "",
            dst_address,
        )
        if owner is not None and owner.trace is not None:
            out.span = tracing.start_span(
                "migration",
                owner.trace,
                {"llumnix.request_id": rid, "llumnix.migration_id": mid, "llumnix.source": result.source_instance_id,
                 "llumnix.destination": dst_id},
            )  # fmt: skip
        try:
            with tracing.activated(out.span):
                await self._drive(out)
        finally:  # also when cancelled (the llumlet shuts down): the result says how the migration ended
            result.total_ms = (time.monotonic() - t0) * 1000
            out.end_stage_span(result.reason or "migration ended")
            if out.span is not None:
                out.span.set_attributes(
                    {
                        "llumnix.outcome": llumlet_pb2.MigrationOutcome.Name(result.outcome),
                        "llumnix.reason": result.reason,
                        "llumnix.stages": result.stages,
                        "llumnix.bytes": result.bytes_sent,
                        "llumnix.downtime_ms": result.downtime_ms,
                    }
                )
                out.span.end()
            self.llumlet.stats.record_migration(result)
            self.results.append(result)
            del self.results[:-100]
        return result

    async def _drive(self, out: _Outgoing) -> None:
        """Performs the machine's actions and feeds their results back until it is done. A client abort of the
        suspended request (the llumlet only marks it in ``pending_aborts``) is fed in before every step and once more
        after the end, so the machine settles it whenever it came."""
        machine = out.machine
        rid = machine.request_id
        actions = machine.step(ev.Start())
        while actions:
            action = actions.pop(0)
            committing: asyncio.Task[ev.SourceEvent | None] | None = None
            try:
                if isinstance(action, ev.Commit):
                    committing = asyncio.get_running_loop().create_task(self._perform(out, action))
                    event = await asyncio.shield(committing)
                else:
                    event = await self._perform(out, action)
            except asyncio.CancelledError:  # shutting down: free the destination's reservation, keep the request
                if committing is not None:
                    # The commit is decided by the destination: wait for its answer, so a request it installed is
                    # released here rather than also resumed (and ended by the shutdown) on this instance.
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([committing], timeout=CLOSE_WAIT_S)
                    if not committing.done():
                        committing.cancel()
                    elif not committing.cancelled() and committing.exception() is None:
                        answer = committing.result()
                        if answer is not None:
                            actions += machine.step(answer)
                # An ending's clean-up already under way goes on (the rest of its actions), else the machine ends now.
                ending = actions + machine.step(ev.SourceFailed("source shutting down"))
                await asyncio.shield(self._settle(out, ending))
                raise
            except Exception as exc:  # a bug must not lose the request: restore it and report
                log.exception("migration %s failed", machine.migration_id)
                event = ev.SourceFailed(f"internal error: {exc!r}")
            if rid in self.llumlet.pending_aborts:
                actions += machine.step(ev.ClientAborted())
            if event is not None:
                actions += machine.step(event)
            if not actions and rid in self.llumlet.pending_aborts:
                actions += machine.step(ev.ClientAborted())

    async def _settle(self, out: _Outgoing, actions: list[ev.SourceAction]) -> None:
        """Performs the clean-up actions of an ending that interrupted the loop."""
        for action in actions:
            with contextlib.suppress(Exception):
                await self._perform(out, action)

    async def _perform(self, out: _Outgoing, action: ev.SourceAction) -> ev.SourceEvent | None:
        """One action of the source machine; returns the event answering it (None for actions without one)."""
        machine = out.machine
        mid, rid = machine.migration_id, machine.request_id
        engine = self.llumlet.engine
        if isinstance(action, ev.Observe):
            if machine.state is SourceState.OBSERVING:
                await self._hook_stage(out, machine.stages)
            async with self.llumlet.engine_lock.light():
                return perform.observe(engine, rid)
        if isinstance(action, ev.Suspend):
            async with self.llumlet.engine_lock:
                event, out.state = perform.suspend(engine, rid)
            out.stopped_at = time.monotonic()
            return event
        if isinstance(action, ev.Reserve):
            return await self._reserve(out, action)
        if isinstance(action, ev.Copy):
            return await self._copy(out, action)
        if isinstance(action, ev.Flush):
            # Every token produced here must reach the frontend before the destination's first one.
            if out.frontend:
                pusher = self.llumlet.pusher
                try:
                    await pusher.flush(out.frontend)
                except TimeoutError:  # documented outcomes of a slow or lost frontend, not a bug: no traceback
                    return ev.SourceFailed(
                        f"frontend {out.frontend} did not acknowledge outputs within "
                        f"{pusher.settings.flush_timeout_s:g} s"
                    )
                except FrontendUnreachableError as exc:
                    return ev.SourceFailed(f"flush to frontend {out.frontend}: {exc}")
            return ev.Flushed()
        if isinstance(action, ev.Commit):
            return await self._commit(out)
        if isinstance(action, ev.TellAbort):
            log.debug("migration %s of %s: telling the destination to free its reservation", mid, rid)
            await self._tell_abort(out.stub, mid, action.reason)
        elif isinstance(action, ev.Resume):
            async with self.llumlet.engine_lock:
                perform.resume(engine, rid)
            self.llumlet.wake()
        elif isinstance(action, ev.Release):
            async with self.llumlet.engine_lock:
                engine.release_suspended(rid)
                self._note_passed_on(rid, self.llumlet.owners.pop(rid, None), mid, out.address)
            self.llumlet.stats.migrations_out += 1
            self.llumlet.wake()
        elif isinstance(action, ev.AbortHere):
            self.llumlet.pending_aborts.pop(rid, None)
            with contextlib.suppress(UnknownRequestError):
                await self.llumlet.abort_request(rid)
            self.llumlet.wake()
        elif isinstance(action, ev.ForwardAbort):
            # The client aborted while the commit was in flight: the request lives on the destination now. The call
            # names this migration, so it ends only the request this migration moved there, never a later request
            # that reuses the id (it may arrive late, after that request ended and the client reused the id).
            self.llumlet.pending_aborts.pop(rid, None)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await out.stub.AbortRequest(
                    forwarded_abort(rid, mid),
                    metadata=forwarded_abort_metadata(mid),  # for a peer older than the field (one release)
                    timeout=CONTROL_TIMEOUT_S,
                )
        elif isinstance(action, ev.Done):
            out.result.outcome = wire.outcome_to_pb(action.outcome)
            out.result.reason = action.reason
            if action.outcome is not ev.Outcome.COMMITTED:
                # The source's view of every ending (a destination logs only its own side): what the destination
                # was asked to reserve and why the migration stopped.
                log.info(
                    "migration %s of %s to %s: %s after %d stages (%s): %s",
                    mid,
                    rid,
                    out.result.destination_instance_id,
                    action.outcome.label,
                    machine.stages,
                    "destination told to free its reservation" if machine.asked_reserve else "nothing reserved",
                    action.reason,
                )
        return None

    async def _hook_stage(self, out: _Outgoing, stage: int) -> None:
        """``before_stage`` once per stage: at its observation, or (suspended at the start) at its reservation."""
        if self.hooks is not None and stage > out.hooked_stage:
            out.hooked_stage = stage
            await self.hooks.before_stage(out.machine.migration_id, out.machine.request_id, stage)

    async def _reserve(self, out: _Outgoing, action: ev.Reserve) -> ev.SourceEvent:
        machine, stage = out.machine, action.stage
        mid, rid = machine.migration_id, machine.request_id
        await self._hook_stage(out, stage.index)
        if stage.last and self.hooks is not None:
            await self.hooks.before_last_stage(mid, rid, stage.index)
        pre = llumlet_pb2.PreAllocateRequest(
            migration_id=mid,
            source_instance_id=self.llumlet.instance_id,
            stage=stage.index,
            num_blocks=stage.count,
            source_data_plane_address=self.transport.address,
            pending_timeout_ms=self.settings.cluster_pending_timeout_ms if stage.index == 0 else 0,
        )
        if stage.index == 0:
            state = out.state
            if state is None:  # the destination validates the request before reserving
                async with self.llumlet.engine_lock.light():
                    peeked = perform.peek(self.llumlet.engine, rid)
                if isinstance(peeked, ev.SourceFailed):
                    return peeked
                state = peeked
            pre.request.CopyFrom(convert.migration_state_to_pb(state, out.frontend))
            pre.kv_layout = self.llumlet.engine.kv_layout().encode()
        out.start_stage_span(stage)
        with tracing.activated(out.stage_span):
            reply, error = await self._rpc(
                out.stub.PreAllocate(pre, timeout=self.settings.transfer_timeout_s), "pre-allocate"
            )
        if not isinstance(reply, llumlet_pb2.PreAllocateResponse):
            out.end_stage_span(error)
            return ev.Refused(error)
        out.stage_dst = list(reply.block_ids)
        out.peer = reply.data_plane_address
        if stage.index == 0 and len(out.stage_dst) == stage.count:
            out.transfer_token = reply.transfer_token
            # Outside the downtime: the source's own token stays valid until the destination's first output.
            try:
                out.capability = await self.llumlet.hand_over(
                    rid, out.result.destination_instance_id, timeout=self.settings.transfer_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                return ev.SourceFailed(f"the frontend refused the hand-over: {exc.code().name}: {exc.details()}")
        out.timings["reserved"] = time.monotonic()
        return ev.Reserved(stage.index, len(out.stage_dst))

    async def _copy(self, out: _Outgoing, action: ev.Copy) -> ev.SourceEvent:
        with tracing.activated(out.stage_span):
            event = await self._copy_stage(out, action)
        out.end_stage_span(
            event.reason if isinstance(event, (ev.SourceFailed, ev.CopyFailed)) else "",
            int(out.timings.get("stage_bytes", 0)),
        )
        return event

    async def _copy_stage(self, out: _Outgoing, action: ev.Copy) -> ev.SourceEvent:
        machine, stage = out.machine, action.stage
        mid, rid = machine.migration_id, machine.request_id
        if self.hooks is not None:
            await self.hooks.before_copy(mid, rid, stage.index)
        async with self.llumlet.engine_lock.light():
            src_ids = perform.stage_blocks(self.llumlet.engine, rid, stage)
        if isinstance(src_ids, ev.SourceFailed):
            return src_ids
        try:
            nbytes, crc = await self._send_stage(data_key(mid, out.transfer_token, stage.index), out.peer, src_ids)
        except (KeyError, IndexError) as exc:  # blocks freed under us: the request was preempted or aborted
            return ev.SourceFailed(f"source blocks vanished during the copy: {exc!r}")
        except TransportError as exc:
            return ev.CopyFailed(f"data plane: {exc}")
        out.timings["sent"] = time.monotonic()
        out.timings["stage_bytes"] = nbytes
        out.result.bytes_sent += nbytes
        notice = llumlet_pb2.TransferStageRequest(
            migration_id=mid, stage=stage.index, block_ids=out.stage_dst, num_bytes=nbytes, crc32=crc, last=stage.last
        )
        reply, error = await self._rpc(
            out.stub.TransferStage(notice, timeout=self.settings.transfer_timeout_s), "transfer"
        )
        if reply is None:
            return ev.CopyFailed(error)
        out.timings["acked"] = time.monotonic()
        out.timings["blocks"] = len(src_ids)
        out.dst_ids.extend(out.stage_dst)
        out.result.stages = stage.index + 1
        return ev.Copied(stage.index)

    async def _commit(self, out: _Outgoing) -> ev.SourceEvent:
        machine = out.machine
        mid, rid = machine.migration_id, machine.request_id
        assert out.state is not None
        commit = llumlet_pb2.CommitMigrationRequest(
            migration_id=mid,
            request=convert.migration_state_to_pb(out.state, out.frontend),
            block_ids=out.dst_ids,
            capability=out.capability,
        )
        if self.hooks is not None:
            await self.hooks.before_commit(mid, rid, machine.stages)
        t_flushed = time.monotonic()
        span = None
        if out.span is not None:
            span = tracing.start_span("migration.commit", attributes={"llumnix.blocks": len(out.dst_ids)})
        with tracing.activated(span):
            reply, error, unanswered = await self._ask_commit(out.stub, commit)
            released = await self._taken_over(out, error) if reply is None and unanswered else None
        if reply is None and released is None:  # released: it runs elsewhere (or nowhere, with an error queued)
            if span is not None:
                span.set_attribute("llumnix.error", error)
                span.end()
            return ev.CommitFailed(error)
        done = time.monotonic()
        out.result.downtime_ms = (done - out.stopped_at) * 1000
        if span is not None:
            span.set_attributes({"llumnix.downtime_ms": out.result.downtime_ms, "llumnix.bytes": out.result.bytes_sent})
            span.end()
        t = out.timings
        log.info(
            "migration %s of %s committed: %d stages, downtime %.1f ms = reserve %.1f + send %d blocks %.1f + "
            "transfer ack %.1f + flush %.1f + commit %.1f",
            mid,
            rid,
            out.result.stages,
            out.result.downtime_ms,
            (t.get("reserved", done) - out.stopped_at) * 1000,
            int(t.get("blocks", 0)),
            (t.get("sent", done) - t.get("reserved", done)) * 1000,
            (t.get("acked", done) - t.get("sent", done)) * 1000,
            (t_flushed - t.get("acked", done)) * 1000,
            (done - t_flushed) * 1000,
        )
        return ev.Committed(released or "")

    async def _ask_commit(
        self, stub: llumlet_pb2_grpc.LlumletServiceStub, commit: llumlet_pb2.CommitMigrationRequest
    ) -> tuple[object | None, str, bool]:
        """The destination's decision on the commit: (its reply, "", False) when it installed, (None, why, False)
        when it did not, (None, why, True) when no ask got an answer (it may have installed: ``_taken_over``).
        A call that ends without an answer (deadline, lost connection) may still have installed there, so the same
        commit is sent again (the destination answers a repeated commit with its one decision) up to COMMIT_ASKS
        times; only a refusal, or no answer to any of them, counts as not installed (ATTACK10 F1b: the source
        resumed while the destination ran the request too)."""
        error = ""
        for ask in range(COMMIT_ASKS):
            call = stub.CommitMigration(commit, timeout=self.settings.transfer_timeout_s)
            try:
                return await asyncio.wait_for(call, self.settings.transfer_timeout_s), "", False
            except grpc.aio.AioRpcError as exc:
                if ask and exc.code() is grpc.StatusCode.NOT_FOUND:
                    # Not known there any more: freed (a repeated commit of an installed one answers success).
                    return None, f"{error}; asked again: {exc.details()}", False
                error = f"commit: {exc.code().name}: {exc.details()}"
                if exc.code() not in _UNDECIDED:
                    return None, error, False
            except TimeoutError:
                error = f"commit: no answer within {self.settings.transfer_timeout_s:g} s"
            log.warning("migration %s: %s (ask %d of %d)", commit.migration_id, error, ask + 1, COMMIT_ASKS)
            if ask + 1 < COMMIT_ASKS:
                await asyncio.sleep(COMMIT_RETRY_S * (ask + 1))
        return None, f"{error} ({COMMIT_ASKS} times)", True

    async def _taken_over(self, out: _Outgoing, error: str) -> str | None:
        """After a commit nobody answered: None when the request stays here (resume it), else why this side releases
        it. The request's frontend decides (TakeBack), as the one place that knows whether the destination pushed for
        it; resuming without asking let both instances run it and splice two continuations into one stream
        (REVIEW12). A frontend that cannot be asked is asked again (backing off) for TAKE_BACK_BUDGET_S; if it still
        cannot, this side releases the request and queues an ERROR for it (delivered only if the destination has not
        pushed first: a clear error, or the request goes on there; never two instances, never silence)."""
        machine = out.machine
        mid, rid, dst = machine.migration_id, machine.request_id, out.result.destination_instance_id
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, grpc.aio.AioRpcError) and e.code() in _UNDECIDED),
            # Within the budget (no attempt starts past it), and no longer once this llumlet closes: an undecided
            # commit must end released with its ERROR, not resumed by the close's cancellation.
            stop=stop_before_delay(TAKE_BACK_BUDGET_S) | stop_when_event_set(self._closing),  # type: ignore[arg-type]
            wait=wait_exponential(multiplier=COMMIT_RETRY_S, max=2.0),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.llumlet.take_back(rid, dst, timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            why = f"{exc.code().name}: {exc.details()}"
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:  # a frontend that cannot arbitrate: as before
                log.warning("migration %s: %s; take-back: %s: resuming %s here", mid, error, why, rid)
                return None
            if exc.code() is grpc.StatusCode.NOT_FOUND:  # ended there: nothing to resume (the destination stops too)
                verdict = f"{error}; the request ended at its frontend ({why})"
            elif exc.code() in _UNDECIDED:
                waited = "this llumlet is closing" if self._closing.is_set() else f"within {TAKE_BACK_BUDGET_S:g} s"
                verdict = f"{error}; its frontend did not answer {waited} ({why})"
                self._queue_error(rid, f"migration to {dst}: neither {dst} nor the frontend answered ({why})")
            else:  # FAILED_PRECONDITION: the destination pushed for it, so it runs there
                verdict = f"{error}; the destination holds it ({why})"
            if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                # It may never have installed: its reservation goes now, not at its pending timeout (an installed
                # request ignores this and stops once the frontend refuses its outputs).
                await self._tell_abort(out.stub, mid, verdict)
            log.warning("migration %s: %s: %s released here", mid, verdict, rid)
            return verdict
        log.warning("migration %s: %s; the frontend gave %s back: resuming it here", mid, error, rid)
        return None

    def _queue_error(self, request_id: str, error: str) -> None:
        """Queues a final ERROR for a request this side releases without knowing where it runs: the frontend takes it
        only while this side's grant is current (the destination never pushed), so the client learns of the failure
        instead of waiting for the idle timeout."""
        owner = self.llumlet.owners.get(request_id)
        if owner is None or not owner.frontend_address:
            return
        notice = TokenOutput(request_id, (), owner.next_index, finished=True, finish=Finish.ERROR, error=error)
        queued = convert.queued_output(notice, owner.num_prompt_tokens, owner.capability)
        self.llumlet.pusher.submit(owner.frontend_address, [queued])

    async def _tell_abort(self, stub: llumlet_pb2_grpc.LlumletServiceStub, mid: str, reason: str) -> None:
        try:
            await stub.AbortMigration(
                llumlet_pb2.AbortMigrationRequest(migration_id=mid, reason=reason), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            # Not fatal (the destination's pending timeout frees what it holds), but a reservation then lingers.
            log.warning("migration %s: AbortMigration failed (%s: %s)", mid, exc.code().name, exc.details())

    async def _rpc(self, call: Awaitable[object], what: str) -> tuple[object | None, str]:
        """A call to the destination: (its reply, "") or (None, why it failed)."""
        try:
            return await asyncio.wait_for(call, self.settings.transfer_timeout_s), ""
        except grpc.aio.AioRpcError as exc:
            return None, f"{what}: {exc.code().name}: {exc.details()}"
        except TimeoutError:
            return None, f"{what}: no answer within {self.settings.transfer_timeout_s:g} s"

    async def _send_stage(self, key: str, peer: str, src_ids: Sequence[int]) -> tuple[int, int]:
        if not src_ids:
            return 0, 0
        engine = self.llumlet.engine
        buffers = self._buffers(self._send_pool, 3)
        device = self.chunk_device is not None

        def read(ids: Sequence[int]) -> KvBuffer | tuple[KvBuffer, Ready]:
            # send_blocks gathers one chunk ahead of the one in flight: three buffers in turn never overlap
            out = buffers.rotate(len(ids), engine.block_bytes)
            if device:  # a kernel on the KV device; send_blocks waits for its handle before sending
                return engine.read_blocks_async(ids, out)
            return engine.read_blocks(ids, out)

        # The buffers go back to the pool only after a success: a gather still running in its thread after a failure
        # may write into them.
        sent = await send_blocks(
            self.transport,
            peer,
            key,
            read,
            list(src_ids),
            engine.block_bytes,
            chunk_bytes=self.settings.chunk_bytes,
            timeout=self.settings.transfer_timeout_s,
            stall_timeout=self.settings.stall_timeout_s,
            checksum=self.settings.verify_crc,
            staging=buffers if device else None,
        )
        self._send_pool.append(buffers)
        return sent.nbytes, sent.crc32 or 0

    # ------------------------------------------------------------------ destination role
    async def pre_allocate(self, request: llumlet_pb2.PreAllocateRequest) -> llumlet_pb2.PreAllocateResponse:
        mid = request.migration_id
        if not mid:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "migration_id is empty")
        incoming = self._incoming.get(mid)
        ended = self._ended.get(mid)
        recently_ended = ended is not None and time.monotonic() - ended.ended_at <= ENDED_KEEP_S
        if incoming is None and request.stage == 0 and recently_ended:  # kept for its source's repeated commit
            raise MigrationError(
                grpc.StatusCode.ALREADY_EXISTS, f"migration {mid} ended here; a new migration needs a new id"
            )
        if incoming is None:
            try:  # the cluster's pending timeout as the source passed it on, for this migration only (order.py)
                pending_s = incoming_pending_timeout_s(request, self.flag_settings.pending_timeout_s)
            except ValueError as exc:
                raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            machine = DestinationMigration(mid, self._in_slots, self.llumlet.instance_id)
            incoming = _Incoming(mid, request.source_instance_id, request.request, machine, pending_timeout_s=pending_s)
            accepting = self.llumlet.state == InstanceState.ACTIVE
            problem, mismatch = None, ""
            if request.stage == 0:
                mismatch = perform.layout_mismatch(self.llumlet.engine, request.kv_layout)
            if request.stage == 0 and request.num_blocks >= 0 and accepting and not mismatch:
                problem = perform.admission_problem(
                    self.llumlet.engine, convert.migration_state_from_pb(request.request)
                )
            offer = ev.Offered(request.stage, request.num_blocks, accepting, problem, mismatch)
            self._incoming[mid] = incoming
            self._incoming_added.set()
            self.llumlet.set_migrating(incoming=True)
        else:
            offer = ev.Offered(request.stage, request.num_blocks)
        incoming.last_touch = time.monotonic()
        answer = await self._answer(incoming, offer)
        return llumlet_pb2.PreAllocateResponse(
            block_ids=answer.block_ids,
            data_plane_address=self.transport.address,
            transfer_token=incoming.transfer_token,
        )

    async def _answer(self, incoming: _Incoming, event: ev.DestinationEvent) -> ev.Accept:
        """The answer to one call of the source (a refusal raises MigrationError)."""
        return self._answered(incoming, await asyncio.shield(self._own_step(incoming, event)))

    @staticmethod
    def _answered(incoming: _Incoming, result: tuple[ev.Accept | None, int]) -> ev.Accept:
        answer, _ = result
        if answer is None:  # the migration ended meanwhile (aborted or reaped while this call waited)
            raise MigrationError(grpc.StatusCode.NOT_FOUND, f"unknown migration {incoming.migration_id}")
        return answer

    def _own_step(self, incoming: _Incoming, event: ev.DestinationEvent) -> asyncio.Task[tuple[ev.Accept | None, int]]:
        """Runs one step of a destination machine in a task owned here (ATTACK10 F1/F3): the gRPC handler awaits it
        shielded, so the caller's deadline or departure cancels only the handler's wait, never the engine work
        (install, free) nor the close that gives the slot back, which would otherwise leak for good."""
        task = asyncio.get_running_loop().create_task(self._step_incoming(incoming, event))
        self._steps.add(task)
        incoming.running.add(task)
        task.add_done_callback(incoming.running.discard)
        task.add_done_callback(self._step_done)
        return task

    def _step_done(self, task: asyncio.Task[tuple[ev.Accept | None, int]]) -> None:
        self._steps.discard(task)
        if not task.cancelled() and isinstance(task.exception(), MigrationError):
            return  # a refusal nobody waits for any more (the caller went away): it did its clean-up already
        if not task.cancelled() and task.exception() is not None:
            log.error("migration step failed", exc_info=task.exception())

    async def _step_incoming(self, incoming: _Incoming, event: ev.DestinationEvent) -> tuple[ev.Accept | None, int]:
        """Feeds one event to a destination machine and performs its actions: its answer, if any (a refusal raises
        MigrationError), and how many reserved blocks were freed."""
        engine = self.llumlet.engine
        answer: ev.Accept | None = None
        refusal: ev.Refuse | None = None
        freed = 0
        pending = incoming.machine.step(event)
        while pending:
            action = pending.pop(0)
            if isinstance(action, ev.ReserveBlocks):
                async with self.llumlet.engine_lock.light():
                    reserved = perform.reserve(engine, action.stage, action.count)
                pending += incoming.machine.step(reserved)
            elif isinstance(action, ev.Receive):
                task = asyncio.get_running_loop().create_task(
                    self._receive_stage(incoming.migration_id, action.stage, list(action.block_ids))
                )
                incoming.stages[action.stage] = task
            elif isinstance(action, ev.Install):
                pending += incoming.machine.step(await self._install(incoming, action.block_ids))
            elif isinstance(action, ev.Free):
                freed += await self._free(incoming, action)
            elif isinstance(action, ev.Closed):
                if self._incoming.get(incoming.migration_id) is incoming:
                    del self._incoming[incoming.migration_id]
                self._remember_ended(incoming)
                self.llumlet.set_migrating(incoming=bool(self._incoming))
                if action.installed:
                    self.llumlet.stats.migrations_in += 1
                    self.llumlet.wake()
            elif isinstance(action, ev.Accept):
                answer = action
            elif isinstance(action, ev.Refuse):
                refusal = action
        if refusal is not None:
            raise MigrationError(_REFUSAL_CODES[refusal.kind], refusal.reason)
        return answer, freed

    def _remember_ended(self, incoming: _Incoming) -> None:
        """Keeps an ended migration ENDED_KEEP_S, so a repeated commit is answered by what happened (bounded map)."""
        now = time.monotonic()
        incoming.ended_at = now
        incoming.stages.clear()
        self._ended = {m: i for m, i in self._ended.items() if now - i.ended_at <= ENDED_KEEP_S}
        self._ended[incoming.migration_id] = incoming

    async def _install(self, incoming: _Incoming, block_ids: Sequence[int]) -> ev.Installed | ev.InstallFailed:
        commit = incoming.commit
        assert commit is not None
        state = convert.migration_state_from_pb(commit.request)
        lock = self.llumlet.engine_lock
        async with lock.light():
            if state.spec.request_id not in self.llumlet.owners:
                return self._install_now(incoming, state, block_ids)
        # An earlier request of this id is still owned here: it may have ended in the step in flight, whose outputs
        # (its final one among them) must go out under its owner entry before this request takes the id.
        async with lock:
            return self._install_now(incoming, state, block_ids)

    def _install_now(
        self, incoming: _Incoming, state: MigrationState, block_ids: Sequence[int]
    ) -> ev.Installed | ev.InstallFailed:
        """The install itself (under the engine lock, light or full; no await)."""
        commit = incoming.commit
        assert commit is not None
        abandoned = incoming.machine.install_abandoned
        if abandoned:  # the source gave up on its commit while this waited for the engine, and resumed
            return ev.InstallFailed(abandoned)
        done = perform.install(self.llumlet.engine, state, block_ids, time.time())
        if isinstance(done, ev.Installed):
            self.llumlet.adopt(state, commit.request.request.frontend_address, commit.capability)
            owners = self.llumlet.owners
            # Entries of requests that ended (or moved on) since the last install go now: the map stays bounded.
            self._migrated_in = {r: e for r, e in self._migrated_in.items() if owners.get(r) is e[2]}
            rid = state.spec.request_id
            self._migrated_in[rid] = (incoming.source_instance_id, incoming.migration_id, owners[rid])
        return done

    async def _free(self, incoming: _Incoming, action: ev.Free) -> int:
        incoming.freeing = tuple(action.block_ids)  # until they are back: a step ended here leaves them to the reaper
        for task in incoming.stages.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        incoming.stages.clear()
        if action.block_ids:
            async with self.llumlet.engine_lock.light():
                self.llumlet.engine.free_reserved(action.block_ids)
        incoming.freeing = ()
        log.info("migration %s in: freed %d blocks (%s)", incoming.migration_id, len(action.block_ids), action.reason)
        return len(action.block_ids)

    async def _receive_stage(self, mid: str, stage: int, ids: list[int]) -> tuple[int, int]:
        engine = self.llumlet.engine

        device = self.chunk_device is not None

        def write(block_ids: Sequence[int], data: KvBuffer) -> Ready | None:
            ready: Ready | None = None
            if device:  # a kernel on the KV device; receive_blocks waits for it before reusing the ring slot
                ready = engine.write_blocks_async(block_ids, data)
            else:
                engine.write_blocks(block_ids, data)
            incoming = self._incoming.get(mid)
            if incoming is not None:  # bytes arriving: the source is alive, the reaper must not free a live stage
                incoming.last_touch = time.monotonic()
            return ready

        incoming = self._incoming.get(mid)
        if incoming is None:  # freed before this stage's receive began
            raise TransportError(f"migration {mid} is no longer expected here")
        token = incoming.transfer_token
        buffers = self._buffers(self._recv_pool, 4)
        # The buffers go back to the pool only after a success: a late byte of a failed transfer may still land in them
        # (a TCP frame already being read, a posted UCX receive), and a healthy migration reusing them failed its CRC
        # (or, unchecked, took corrupt KV).
        got = await receive_blocks(
            self.transport,
            data_key(mid, token, stage),
            ids,
            engine.block_bytes,
            write,
            chunk_bytes=self.settings.chunk_bytes,
            timeout=self.settings.transfer_timeout_s,
            stall_timeout=self.settings.stall_timeout_s,
            checksum=self.settings.verify_crc,
            buffers=buffers,
        )
        self._recv_pool.append(buffers)
        return got.nbytes, got.crc32 or 0

    async def transfer_stage(self, request: llumlet_pb2.TransferStageRequest) -> llumlet_pb2.TransferStageResponse:
        incoming = self._incoming.get(request.migration_id)
        if incoming is None:
            raise MigrationError(grpc.StatusCode.NOT_FOUND, f"unknown migration {request.migration_id}")
        incoming.last_touch = time.monotonic()
        block_ids = tuple(request.block_ids)
        task = incoming.stages.get(request.stage)
        nbytes, crc, error, timed_out = 0, 0, "", False
        expected = len(block_ids) * self.llumlet.engine.block_bytes
        if task is not None and incoming.machine.stage_blocks.get(request.stage) == block_ids:
            if request.num_bytes != expected:
                # The source sent all it will: waiting for the rest would only hold the reservation until the stall
                # timeout. The refusal frees it (and cancels the receive) now.
                error = (
                    f"stage {request.stage}: the source sent {request.num_bytes} bytes for {len(block_ids)} reserved "
                    f"blocks of {self.llumlet.engine.block_bytes}"
                )
            else:
                try:
                    nbytes, crc = await task
                except (TransportError, TimeoutError) as exc:
                    error, timed_out = str(exc), True
        # With verification on, a stage without a CRC (or with a wrong one) is refused: the check cannot be skipped.
        checked = self.settings.verify_crc or bool(request.crc32)
        if not error and (nbytes != request.num_bytes or (checked and crc != request.crc32)):
            error = (
                f"stage {request.stage}: got {nbytes} bytes crc {crc}, expected {request.num_bytes} crc {request.crc32}"
            )
        await self._answer(incoming, ev.StageLanded(request.stage, block_ids, error, timed_out))
        incoming.last_touch = time.monotonic()
        return llumlet_pb2.TransferStageResponse(bytes_received=nbytes)

    async def commit(self, request: llumlet_pb2.CommitMigrationRequest) -> llumlet_pb2.CommitMigrationResponse:
        """Idempotent (ATTACK10 F1b): a source whose commit call failed without an answer asks again and gets the one
        decision: a commit under way is waited for, an ended migration answers how it ended."""
        mid = request.migration_id
        incoming = self._incoming.get(mid)
        if incoming is None:
            ended = self._ended.get(mid)
            if ended is None or time.monotonic() - ended.ended_at > ENDED_KEEP_S:
                raise MigrationError(grpc.StatusCode.NOT_FOUND, f"unknown migration {mid}")
            await self._answer(ended, ev.CommitAsked(tuple(request.block_ids)))
        elif incoming.committing is not None:
            incoming.last_touch = time.monotonic()
            self._answered(incoming, await asyncio.shield(incoming.committing))
        else:
            incoming.commit = request
            incoming.committing = self._own_step(incoming, ev.CommitAsked(tuple(request.block_ids)))
            self._answered(incoming, await asyncio.shield(incoming.committing))
        return llumlet_pb2.CommitMigrationResponse(instance_id=self.llumlet.instance_id)

    async def abort(self, request: llumlet_pb2.AbortMigrationRequest) -> llumlet_pb2.AbortMigrationResponse:
        return llumlet_pb2.AbortMigrationResponse(
            freed_blocks=await self._free_incoming(
                request.migration_id, ev.AbortAsked(request.reason or "aborted by source")
            )
        )

    async def _free_incoming(self, mid: str, event: ev.AbortAsked | ev.SourceSilent) -> int:
        incoming = self._incoming.get(mid)
        if incoming is None:
            return 0
        _, freed = await asyncio.shield(self._own_step(incoming, event))
        return freed

    async def _reap_pending(self) -> None:
        """Frees reservations whose source went silent (presumed dead)."""
        while True:
            if not self._incoming:
                self._incoming_added.clear()
                await self._incoming_added.wait()
                continue  # (re-checked: woken by a reservation already gone, it sleeps again)
            # Each migration's own pending timeout (REVIEW10 M2); polled at a quarter of the shortest one.
            shortest = min((i.pending_timeout_s for i in self._incoming.values()), default=1.0)
            await asyncio.sleep(min(1.0, self.flag_settings.pending_timeout_s / 4, shortest / 4))
            now = time.monotonic()
            for mid, incoming in list(self._incoming.items()):
                if now - incoming.last_touch > incoming.pending_timeout_s:
                    await self._free_incoming(
                        mid, ev.SourceSilent(f"source silent for {incoming.pending_timeout_s:g} s")
                    )
                if now - incoming.last_touch > incoming.pending_timeout_s + self.flag_settings.transfer_timeout_s:
                    await self._reap_stuck(mid, incoming)

    async def _reap_stuck(self, mid: str, incoming: _Incoming) -> None:
        """Collects an entry that a source's silence cannot end (FIXD): one stuck INSTALLING (its install raised, or
        still waits for the engine past any commit's deadline) or CLOSED with its entry left (a step that failed or
        was cancelled between its close and the entry's removal, maybe with blocks not freed yet). Without this the
        reservation, the ``max_in`` slot and the migrating flag leaked for good. A running install is first told not
        to run (the source gave up on it long ago) and cancelled, never raced: an install happens under the engine
        lock without a pause, so a cancelled one never began."""
        machine = incoming.machine
        if machine.state is not DestinationState.INSTALLING and not machine.closed:
            return
        running = [t for t in incoming.running if not t.done()]
        if running and machine.closed:
            return  # a close still under way (a Free waiting for the engine) ends the entry itself
        age = time.monotonic() - incoming.last_touch
        reason = f"stuck {machine.state.value} for {age:.1f} s"
        if running:
            if not machine.install_abandoned:
                machine.step(ev.AbortAsked(reason))  # an install not begun must not run any more
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=CLOSE_WAIT_S)
            if any(not t.done() for t in running) or self._incoming.get(mid) is not incoming:
                return  # not settled yet (the next pass tries again), or it ended the entry itself
        log.warning(
            "migration %s in (from %s): %s; freeing its %d reserved blocks and its slot",
            mid,
            incoming.source_instance_id,
            reason,
            len(machine.block_ids) + len(incoming.freeing),
        )
        if machine.state is DestinationState.INSTALLING:
            with contextlib.suppress(MigrationError):  # its refusal: nobody waits for it
                await asyncio.shield(self._own_step(incoming, ev.InstallFailed(reason)))
            return
        if incoming.freeing:
            await self._free(incoming, ev.Free(incoming.freeing, reason))
        self._in_slots.give(mid)
        if self._incoming.get(mid) is incoming:
            del self._incoming[mid]
            self._remember_ended(incoming)
            self.llumlet.set_migrating(incoming=bool(self._incoming))
