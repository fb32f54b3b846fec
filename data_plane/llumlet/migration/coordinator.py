"""The migration coordinator of one llumlet: source role (runs the stages) and destination role (reserves, receives,
commits), over gRPC for the handshake and a data-plane transport for the blocks.

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
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.selection import select_request
from pyllumnix.control_plane.policy.snapshot import RequestView
from pyllumnix.data_plane.engine.base import (
    BlockBuffer,
    DuplicateRequestError,
    EngineError,
    InvalidRequestError,
    MigrationState,
    Phase,
    UnknownRequestError,
)
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.plan import GiveUp, MigrationLimits, next_stage
from pyllumnix.data_plane.llumlet.service import MigrationError
from pyllumnix.data_plane.transport.base import Transport, TransportError
from pyllumnix.data_plane.transport.fusion import (
    DEFAULT_CHUNK_BYTES,
    ChunkBuffers,
    plan_chunks,
    receive_blocks,
    send_blocks,
)
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 2.0


@dataclass
class MigrationSettings:
    limits: MigrationLimits = field(default_factory=MigrationLimits)
    pending_timeout_s: float = 10.0
    transfer_timeout_s: float = 10.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_in: int = 1
    max_out: int = 1
    # CRC-32 of every stage's bytes, checked by the destination before the commit (#13: on by default, so a corrupted
    # or tampered transfer never becomes a request's KV; zlib.crc32 ran at ~0.5 GB/s on the shared dev machine).
    verify_crc: bool = True


class MigrationHooks:
    """Named points of a source-side migration at which a test acts (aborts the request, stops a peer, waits for a
    preemption) so that each abort path runs at a known stage instead of after a guessed sleep. Every default does
    nothing; production passes no hooks. ``stage`` is the index of the stage the point precedes (for the commit: the
    number of stages transferred)."""

    async def before_stage(self, migration_id: str, request_id: str, stage: int) -> None:
        """Top of each stage, before the source re-reads the request (phase, blocks, preemptions)."""

    async def before_last_stage(self, migration_id: str, request_id: str, stage: int) -> None:
        """The request is suspended for the stop-and-copy stage; its blocks are not pre-allocated yet."""

    async def before_commit(self, migration_id: str, request_id: str, stage: int) -> None:
        """Every stage is transferred, outputs flushed and the last client-abort check done; the commit RPC is next."""


class _SourceAbort(Exception):
    """The source gives up (the request changed under the migration)."""


class _DestinationAbort(Exception):
    """The destination refused or failed; carries the gRPC status when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Incoming:
    """Destination-side record of one migration in progress."""

    migration_id: str
    source_instance_id: str
    request: llumlet_pb2.MigratingRequest
    block_ids: list[int] = field(default_factory=list)
    stages: dict[int, asyncio.Task[tuple[int, int]]] = field(default_factory=dict)
    stage_blocks: dict[int, list[int]] = field(default_factory=dict)
    completed_stages: set[int] = field(default_factory=set)
    last_touch: float = 0.0
    # One-time secret of this migration's data-plane keys (sent to the source with the first PreAllocate answer).
    transfer_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))


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
        self.settings = settings or MigrationSettings()
        self.hooks = hooks
        self._incoming: dict[str, _Incoming] = {}
        self._outgoing: set[str] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.results: list[llumlet_pb2.MigrationResult] = []
        # Warm chunk buffers, one set per concurrent transfer (taken from and returned to these pools).
        self._send_pool: list[ChunkBuffers] = []
        self._recv_pool: list[ChunkBuffers] = []

    def prewarm(self) -> None:
        """Touches one set of send and receive buffers now, so the first migration pays no page faults."""
        engine = self.llumlet.engine
        blocks = plan_chunks(1, engine.block_bytes, self.settings.chunk_bytes).blocks_per_chunk
        for pool, count in ((self._send_pool, 3), (self._recv_pool, 4)):
            buffers = ChunkBuffers(count)
            buffers.prewarm(blocks, engine.block_bytes)
            pool.append(buffers)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_pending(), name="migration-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for mid in list(self._incoming):
            await self._free_incoming(mid, "llumlet shutting down")
        for channel in self._channels.values():
            await channel.close()

    def incoming_source(self, migration_id: str) -> str | None:
        """The source instance that holds migration ``migration_id``'s reservation here (None: no such migration)."""
        incoming = self._incoming.get(migration_id)
        return incoming.source_instance_id if incoming is not None else None

    def incoming_request(self, migration_id: str) -> llumlet_pb2.MigratingRequest | None:
        """The request a migration's first stage announced (what its commit must match)."""
        incoming = self._incoming.get(migration_id)
        return incoming.request if incoming is not None else None

    def incoming_from(self, source_instance_id: str) -> list[str]:
        """Migrations ``source_instance_id`` holds a reservation for here."""
        return [mid for mid, inc in self._incoming.items() if inc.source_instance_id == source_instance_id]

    @property
    def busy(self) -> bool:
        """A migration is in progress in either role."""
        return bool(self._incoming or self._outgoing)

    def _stub(self, address: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
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
        if len(self._outgoing) >= self.settings.max_out:
            raise MigrationError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{me} is already migrating out")
        if request.last_stage_max_blocks < 0:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "last_stage_max_blocks must be >= 0")
        limits = self.settings.limits
        if request.last_stage_max_blocks:
            limits = MigrationLimits(request.last_stage_max_blocks, limits.max_stages)
        count = max(1, request.max_requests)
        migration_ids = [f"{me}-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        self._outgoing.add(migration_ids[0])
        self.llumlet.set_migrating(outgoing=True)

        async def run_all() -> list[llumlet_pb2.MigrationResult]:
            results: list[llumlet_pb2.MigrationResult] = []
            try:
                for i, mid in enumerate(migration_ids):
                    rid = request.request_id if request.request_id else await self._select(request.selection)
                    if rid is None:
                        break
                    result = await self._migrate_one(
                        limits, mid, rid, request.destination_instance_id, request.destination_grpc_address
                    )
                    results.append(result)
                    if result.outcome != llumlet_pb2.MIGRATION_OUTCOME_COMMITTED or request.request_id:
                        break
                    if i + 1 < len(migration_ids):
                        self._outgoing.add(migration_ids[i + 1])
                    self._outgoing.discard(mid)
            finally:
                for mid in migration_ids:
                    self._outgoing.discard(mid)
                self.llumlet.set_migrating(outgoing=bool(self._outgoing))
            return results

        # The migration runs in its own task: a caller that goes away (a scheduler leader killed while waiting) must
        # not cancel it halfway, with the request suspended and a reservation held on the destination.
        task = asyncio.get_running_loop().create_task(run_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if request.wait:
            return llumlet_pb2.MigrateOutResponse(results=await asyncio.shield(task))
        return llumlet_pb2.MigrateOutResponse(migration_ids=migration_ids[:1])

    async def _select(self, selection: int) -> str | None:
        async with self.llumlet.engine_lock:
            snap = self.llumlet.engine.load()
        selected = Selection(selection) if selection in Selection._value2member_map_ else Selection.SR
        return select_request([RequestView.from_engine(r) for r in snap.requests], selected)

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
        stub = self._stub(dst_address)
        suspended = False
        try:
            suspended = await self._run_stages(limits, mid, rid, stub, result)
            result.outcome = llumlet_pb2.MIGRATION_OUTCOME_COMMITTED
            self.llumlet.stats.migrations_out += 1
        except _SourceAbort as exc:
            result.outcome = llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
            result.reason = str(exc)
            await self._tell_abort(stub, mid, str(exc))
        except _DestinationAbort as exc:
            result.outcome = llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
            result.reason = str(exc)
            await self._tell_abort(stub, mid, str(exc))
        except Exception as exc:  # a bug must not lose the request: restore it and report
            log.exception("migration %s failed", mid)
            result.outcome = llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
            result.reason = f"internal error: {exc!r}"
            await self._tell_abort(stub, mid, result.reason)
        except asyncio.CancelledError:  # llumlet shutting down: free the destination's reservation, keep the request
            result.outcome = llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_SOURCE
            result.reason = "source shutting down"
            await asyncio.shield(self._tell_abort(stub, mid, result.reason))
            raise
        finally:
            if result.outcome != llumlet_pb2.MIGRATION_OUTCOME_COMMITTED:
                await self._restore(rid)
            elif suspended:
                async with self.llumlet.engine_lock:
                    self.llumlet.engine.release_suspended(rid)
                    self.llumlet.owners.pop(rid, None)
                if self.llumlet.pending_aborts.pop(rid, None) is not None:
                    # The client aborted while the commit was in flight: the request lives on the destination now.
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.AbortRequest(
                            llumlet_pb2.AbortRequestRequest(request_id=rid), timeout=CONTROL_TIMEOUT_S
                        )
                self.llumlet.wake()
        result.total_ms = (time.monotonic() - t0) * 1000
        self.llumlet.stats.record_migration(result)
        self.results.append(result)
        del self.results[:-100]
        return result

    async def _restore(self, rid: str) -> None:
        async with self.llumlet.engine_lock:
            with contextlib.suppress(UnknownRequestError):
                if self.llumlet.engine.phase(rid) is Phase.SUSPENDED:
                    self.llumlet.engine.resume(rid)
        if self.llumlet.pending_aborts.pop(rid, None) is not None:
            with contextlib.suppress(UnknownRequestError):
                await self.llumlet.abort_request(rid)
        self.llumlet.wake()

    async def _tell_abort(self, stub: llumlet_pb2_grpc.LlumletServiceStub, mid: str, reason: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.AbortMigration(
                llumlet_pb2.AbortMigrationRequest(migration_id=mid, reason=reason), timeout=CONTROL_TIMEOUT_S
            )

    async def _call(self, coro: object, what: str) -> object:
        try:
            return await asyncio.wait_for(coro, self.settings.transfer_timeout_s)  # type: ignore[arg-type]
        except grpc.aio.AioRpcError as exc:
            raise _DestinationAbort(f"{what}: {exc.code().name}: {exc.details()}", exc.code()) from exc
        except TimeoutError as exc:
            raise _DestinationAbort(f"{what}: no answer within {self.settings.transfer_timeout_s:g} s") from exc

    async def _snapshot(self, rid: str) -> tuple[Phase, list[int], int]:
        """Phase, block ids and preemption count of the request, read between steps."""
        engine = self.llumlet.engine
        async with self.llumlet.engine_lock:
            try:
                phase = engine.phase(rid)
            except UnknownRequestError as exc:
                raise _SourceAbort(f"request {rid} finished or was aborted during migration") from exc
            if phase is Phase.FINISHED:
                raise _SourceAbort(f"request {rid} finished during migration")
            preemptions = next((r.num_preemptions for r in engine.load().requests if r.request_id == rid), 0)
            return phase, engine.block_ids(rid), preemptions

    async def _run_stages(
        self,
        limits: MigrationLimits,
        mid: str,
        rid: str,
        stub: llumlet_pb2_grpc.LlumletServiceStub,
        result: llumlet_pb2.MigrationResult,
    ) -> bool:
        """Returns True once committed (the request is suspended here and must be released)."""
        engine = self.llumlet.engine
        owner = self.llumlet.owners.get(rid)
        frontend = owner.frontend_address if owner else ""
        phase, block_ids, preemptions0 = await self._snapshot(rid)
        if phase is Phase.SUSPENDED:
            raise _SourceAbort(f"request {rid} is already migrating")
        state = await self._suspend_if(phase is Phase.WAITING, rid)
        stopped_at = time.monotonic()
        first_pb = convert.migration_state_to_pb(state, frontend) if state else await self._peek_state(rid, frontend)
        dst_ids: list[int] = []
        copied = 0
        capability = ""  # the destination's capability token, from the frontend (once stage 0 is reserved)
        transfer_token = ""  # the destination's one-time data-plane token (its first PreAllocate answer)
        for stage_index in itertools.count():
            if self.hooks is not None:
                await self.hooks.before_stage(mid, rid, stage_index)
            if state is None:
                phase, block_ids, preemptions = await self._snapshot(rid)
                if phase is not Phase.RUNNING or preemptions != preemptions0:
                    raise _SourceAbort(f"request {rid} was preempted during migration")
                plan = next_stage(limits, stage_index, copied, len(block_ids))
                if isinstance(plan, GiveUp):
                    raise _SourceAbort(plan.reason)
                if plan.last:
                    state = await self._suspend_if(True, rid)
                    assert state is not None
                    block_ids = engine.block_ids(rid)
                    plan = next_stage(limits, stage_index, copied, len(block_ids))
                    assert not isinstance(plan, GiveUp)
                    stopped_at = time.monotonic()
            else:  # suspended: whatever is left goes in one (last) stage
                block_ids = engine.block_ids(rid)
                plan = next_stage(
                    MigrationLimits(max(1, len(block_ids) - copied), limits.max_stages),
                    stage_index,
                    copied,
                    len(block_ids),
                )
                assert not isinstance(plan, GiveUp)
            if plan.last and self.hooks is not None:
                await self.hooks.before_last_stage(mid, rid, plan.index)
            src_ids = block_ids[plan.first : plan.first + plan.count]
            pre = llumlet_pb2.PreAllocateRequest(
                migration_id=mid,
                source_instance_id=self.llumlet.instance_id,
                stage=plan.index,
                num_blocks=plan.count,
                source_data_plane_address=self.transport.address,
            )
            if plan.index == 0:
                pre.request.CopyFrom(first_pb)
            reply = await self._call(stub.PreAllocate(pre, timeout=self.settings.transfer_timeout_s), "pre-allocate")
            assert isinstance(reply, llumlet_pb2.PreAllocateResponse)
            stage_dst = list(reply.block_ids)
            if len(stage_dst) != plan.count:
                raise _DestinationAbort(f"destination reserved {len(stage_dst)} blocks, asked {plan.count}")
            if plan.index == 0:
                transfer_token = reply.transfer_token
                # Outside the downtime: the source's own token stays valid until the destination's first output.
                capability = await self._hand_over(rid, result.destination_instance_id)
            t_reserved = time.monotonic()
            key = data_key(mid, transfer_token, plan.index)
            nbytes, crc = await self._send_stage(key, reply.data_plane_address, src_ids)
            t_sent = time.monotonic()
            result.bytes_sent += nbytes
            notice = llumlet_pb2.TransferStageRequest(
                migration_id=mid, stage=plan.index, block_ids=stage_dst, num_bytes=nbytes, crc32=crc, last=plan.last
            )
            await self._call(stub.TransferStage(notice, timeout=self.settings.transfer_timeout_s), "transfer")
            t_acked = time.monotonic()
            dst_ids.extend(stage_dst)
            copied += plan.count
            result.stages = plan.index + 1
            if plan.last:
                break
        assert state is not None
        # Every token produced here must reach the frontend before the destination's first one.
        if frontend:
            await self.llumlet.pusher.flush(frontend)
        if rid in self.llumlet.pending_aborts:
            raise _SourceAbort(f"request {rid} was aborted by its client during migration")
        commit = llumlet_pb2.CommitMigrationRequest(
            migration_id=mid,
            request=convert.migration_state_to_pb(state, frontend),
            block_ids=dst_ids,
            capability=capability,
        )
        if self.hooks is not None:
            await self.hooks.before_commit(mid, rid, result.stages)
        t_flushed = time.monotonic()
        await self._call(stub.CommitMigration(commit, timeout=self.settings.transfer_timeout_s), "commit")
        done = time.monotonic()
        result.downtime_ms = (done - stopped_at) * 1000
        log.info(
            "migration %s of %s committed: %d stages, downtime %.1f ms = reserve %.1f + send %d blocks %.1f + "
            "transfer ack %.1f + flush %.1f + commit %.1f",
            mid,
            rid,
            result.stages,
            result.downtime_ms,
            (t_reserved - stopped_at) * 1000,
            len(src_ids),
            (t_sent - t_reserved) * 1000,
            (t_acked - t_sent) * 1000,
            (t_flushed - t_acked) * 1000,
            (done - t_flushed) * 1000,
        )
        return True

    async def _hand_over(self, rid: str, dst_id: str) -> str:
        """The destination's capability token from the request's frontend; a refusal aborts the migration (the
        destination could not push the request's outputs)."""
        try:
            return await self.llumlet.hand_over(rid, dst_id, timeout=self.settings.transfer_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _SourceAbort(f"the frontend refused the hand-over: {exc.code().name}: {exc.details()}") from exc

    async def _suspend_if(self, condition: bool, rid: str) -> MigrationState | None:
        if not condition:
            return None
        async with self.llumlet.engine_lock:
            try:
                return self.llumlet.engine.suspend(rid)
            except UnknownRequestError as exc:
                raise _SourceAbort(f"request {rid} finished or was aborted during migration") from exc
            except EngineError as exc:
                raise _SourceAbort(f"cannot suspend {rid}: {exc}") from exc

    async def _peek_state(self, rid: str, frontend: str) -> llumlet_pb2.MigratingRequest:
        """Request metadata for the first pre-allocation (the destination validates it before reserving)."""
        async with self.llumlet.engine_lock:
            try:
                state = self.llumlet.engine.export_state(rid)
            except UnknownRequestError as exc:
                raise _SourceAbort(f"request {rid} finished or was aborted during migration") from exc
        return convert.migration_state_to_pb(state, frontend)

    async def _send_stage(self, key: str, peer: str, src_ids: Sequence[int]) -> tuple[int, int]:
        if not src_ids:
            return 0, 0
        engine = self.llumlet.engine
        buffers = self._send_pool.pop() if self._send_pool else ChunkBuffers(3)

        def read(ids: Sequence[int]) -> BlockBuffer:
            # send_blocks gathers one chunk ahead of the one in flight: three buffers in turn never overlap
            return engine.read_blocks(ids, buffers.rotate(len(ids), engine.block_bytes))

        try:
            sent = await send_blocks(
                self.transport,
                peer,
                key,
                read,
                list(src_ids),
                engine.block_bytes,
                chunk_bytes=self.settings.chunk_bytes,
                timeout=self.settings.transfer_timeout_s,
                checksum=self.settings.verify_crc,
            )
        except (KeyError, IndexError) as exc:  # blocks freed under us: the request was preempted or aborted
            raise _SourceAbort(f"source blocks vanished during the copy: {exc!r}") from exc
        except TransportError as exc:
            raise _DestinationAbort(f"data plane: {exc}") from exc
        finally:
            self._send_pool.append(buffers)
        return sent.nbytes, sent.crc32 or 0

    # ------------------------------------------------------------------ destination role
    async def pre_allocate(self, request: llumlet_pb2.PreAllocateRequest) -> llumlet_pb2.PreAllocateResponse:
        engine = self.llumlet.engine
        mid = request.migration_id
        if not mid:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "migration_id is empty")
        if request.num_blocks < 0:
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "num_blocks must be >= 0")
        incoming = self._incoming.get(mid)
        if incoming is None:
            if request.stage != 0:
                raise MigrationError(grpc.StatusCode.NOT_FOUND, f"unknown migration {mid} (timed out?)")
            if self.llumlet.state != common_pb2.INSTANCE_STATE_ACTIVE:
                raise MigrationError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"{self.llumlet.instance_id} takes no requests"
                )
            if len(self._incoming) >= self.settings.max_in:
                raise MigrationError(grpc.StatusCode.ABORTED, f"{self.llumlet.instance_id} has no free migration slot")
            rid = request.request.request.request_id
            if not rid:
                raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "the first stage must carry the request")
            if rid in engine.request_ids():
                raise MigrationError(grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already here")
            state = convert.migration_state_from_pb(request.request)
            total = len(state.spec.prompt_token_ids) + state.spec.sampling.max_tokens
            if total > engine.max_model_len:
                raise MigrationError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request needs {total} tokens > max length {engine.max_model_len}",
                )
            incoming = _Incoming(mid, request.source_instance_id, request.request)
            self._incoming[mid] = incoming
            self.llumlet.set_migrating(incoming=True)
        incoming.last_touch = time.monotonic()
        try:
            async with self.llumlet.engine_lock:
                ids = engine.reserve_blocks(request.num_blocks) if request.num_blocks else []
        except EngineError:
            await self._free_incoming(mid, "pre-allocation refused")
            raise
        incoming.block_ids.extend(ids)
        incoming.stage_blocks[request.stage] = ids
        if ids:
            task = asyncio.get_running_loop().create_task(self._receive_stage(mid, request.stage, ids))
            incoming.stages[request.stage] = task
        return llumlet_pb2.PreAllocateResponse(
            block_ids=ids, data_plane_address=self.transport.address, transfer_token=incoming.transfer_token
        )

    async def _receive_stage(self, mid: str, stage: int, ids: list[int]) -> tuple[int, int]:
        engine = self.llumlet.engine

        def write(block_ids: Sequence[int], data: BlockBuffer) -> None:
            engine.write_blocks(block_ids, data)
            incoming = self._incoming.get(mid)
            if incoming is not None:  # bytes arriving: the source is alive, the reaper must not free a live stage
                incoming.last_touch = time.monotonic()

        incoming = self._incoming.get(mid)
        if incoming is None:  # freed before this stage's receive began
            raise TransportError(f"migration {mid} is no longer expected here")
        token = incoming.transfer_token
        buffers = self._recv_pool.pop() if self._recv_pool else ChunkBuffers(4)
        try:
            got = await receive_blocks(
                self.transport,
                data_key(mid, token, stage),
                ids,
                engine.block_bytes,
                write,
                chunk_bytes=self.settings.chunk_bytes,
                timeout=self.settings.transfer_timeout_s,
                checksum=self.settings.verify_crc,
                buffers=buffers,
            )
        finally:
            self._recv_pool.append(buffers)
        return got.nbytes, got.crc32 or 0

    async def transfer_stage(self, request: llumlet_pb2.TransferStageRequest) -> llumlet_pb2.TransferStageResponse:
        incoming = self._incoming.get(request.migration_id)
        if incoming is None:
            raise MigrationError(grpc.StatusCode.NOT_FOUND, f"unknown migration {request.migration_id}")
        incoming.last_touch = time.monotonic()
        if list(request.block_ids) != incoming.stage_blocks.get(request.stage):
            await self._free_incoming(request.migration_id, "stage block ids do not match the reservation")
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "stage block ids do not match the reservation")
        task = incoming.stages.get(request.stage)
        nbytes, crc = 0, 0
        if task is not None:
            try:
                nbytes, crc = await task
            except (TransportError, TimeoutError) as exc:
                await self._free_incoming(request.migration_id, f"transfer failed: {exc}")
                raise MigrationError(grpc.StatusCode.DEADLINE_EXCEEDED, f"stage bytes did not arrive: {exc}") from exc
        # With verification on, a stage without a CRC (or with a wrong one) is refused: the check cannot be skipped.
        checked = self.settings.verify_crc or bool(request.crc32)
        if nbytes != request.num_bytes or (checked and crc != request.crc32):
            await self._free_incoming(request.migration_id, "data mismatch")
            raise MigrationError(
                grpc.StatusCode.DATA_LOSS,
                f"stage {request.stage}: got {nbytes} bytes crc {crc}, "
                f"expected {request.num_bytes} crc {request.crc32}",
            )
        incoming.completed_stages.add(request.stage)
        incoming.last_touch = time.monotonic()
        return llumlet_pb2.TransferStageResponse(bytes_received=nbytes)

    async def commit(self, request: llumlet_pb2.CommitMigrationRequest) -> llumlet_pb2.CommitMigrationResponse:
        mid = request.migration_id
        incoming = self._incoming.get(mid)
        if incoming is None:
            raise MigrationError(grpc.StatusCode.NOT_FOUND, f"unknown migration {mid}")
        if (
            set(incoming.stage_blocks)
            - incoming.completed_stages
            - {s for s, b in incoming.stage_blocks.items() if not b}
        ):
            await self._free_incoming(mid, "commit before every stage completed")
            raise MigrationError(grpc.StatusCode.FAILED_PRECONDITION, "not every stage was transferred")
        if list(request.block_ids) != incoming.block_ids:
            await self._free_incoming(mid, "commit block ids do not match the reservation")
            raise MigrationError(grpc.StatusCode.INVALID_ARGUMENT, "block ids do not match the reservation")
        state = convert.migration_state_from_pb(request.request)
        try:
            async with self.llumlet.engine_lock:
                self.llumlet.engine.commit_incoming(state, incoming.block_ids, time.time())
                self.llumlet.adopt(state, request.request.request.frontend_address, request.capability)
        except (DuplicateRequestError, InvalidRequestError, EngineError) as exc:
            await self._free_incoming(mid, f"commit failed: {exc}")
            raise MigrationError(grpc.StatusCode.FAILED_PRECONDITION, f"commit failed: {exc}") from exc
        del self._incoming[mid]
        self.llumlet.set_migrating(incoming=bool(self._incoming))
        self.llumlet.stats.migrations_in += 1
        self.llumlet.wake()
        return llumlet_pb2.CommitMigrationResponse(instance_id=self.llumlet.instance_id)

    async def abort(self, request: llumlet_pb2.AbortMigrationRequest) -> llumlet_pb2.AbortMigrationResponse:
        freed = await self._free_incoming(request.migration_id, request.reason or "aborted by source")
        return llumlet_pb2.AbortMigrationResponse(freed_blocks=freed)

    async def _free_incoming(self, mid: str, reason: str) -> int:
        incoming = self._incoming.pop(mid, None)
        if incoming is None:
            return 0
        for task in incoming.stages.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        async with self.llumlet.engine_lock:
            self.llumlet.engine.free_reserved(incoming.block_ids)
        self.llumlet.set_migrating(incoming=bool(self._incoming))
        log.info("migration %s in: freed %d blocks (%s)", mid, len(incoming.block_ids), reason)
        return len(incoming.block_ids)

    async def _reap_pending(self) -> None:
        """Frees reservations whose source went silent (presumed dead)."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.pending_timeout_s / 4))
            now = time.monotonic()
            for mid, incoming in list(self._incoming.items()):
                if now - incoming.last_touch > self.settings.pending_timeout_s:
                    await self._free_incoming(mid, f"source silent for {self.settings.pending_timeout_s:g} s")
