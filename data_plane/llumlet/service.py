"""The LlumletService gRPC servicer: validates input, maps engine errors to status codes, delegates migration.

Authorization beyond the role table (checked from the caller's certificate identity; skipped, with one warning, on a
plaintext connection, which only a llumlet started with ``--insecure`` has):

- orders (MigrateOut, SetInstanceState) come from the scheduler leader only: each carries the leader's term
  (``llumnix-term`` metadata, see ``infra.security.fencing``); an order without a term is refused (PERMISSION_DENIED),
  one from an older term than the newest seen here FAILED_PRECONDITION; a newer term only once etcd proves it is the
  current leader's and the caller is that leader (``election_leader``; PERMISSION_DENIED otherwise, UNAVAILABLE while
  etcd cannot answer), so a follower's made-up term cannot lock the leader out;
- MigrateOut sends only to an instance of the registry whose registered address is the one given (``registry``);
- the destination side of a migration is bound to its source: PreAllocate's ``source_instance_id`` is the caller,
  one reservation per source at a time, and TransferStage/CommitMigration/AbortMigration only from that source;
  a commit must name the request and frontend address its first stage announced;
- AbortRequest from a llumlet only for a request that llumlet migrated here (a client's abort that raced the commit,
  forwarded by the source), naming that migration, PERMISSION_DENIED otherwise; frontends and the scheduler may abort
  any request.

A forwarded abort names its migration (``AbortRequestRequest.migration_id``; older sources: the ``llumnix-migration-id``
metadata entry, still read for one release) on any connection, plaintext included, and ends only the request that
migration installed here: it may arrive after that request ended and its client reused the id (NOT_FOUND then, and the
later request runs on). If that request left again by a later migration before the
abort came, the abort follows it, naming that migration (``PassedOn``), however many hops on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from pyllumnix.data_plane.engine.base import (
    DuplicateRequestError,
    EngineError,
    InvalidRequestError,
    InvalidStateError,
    OutOfBlocksError,
    UnknownRequestError,
)
from pyllumnix.data_plane.llumlet.convert import request_load_to_pb
from pyllumnix.data_plane.llumlet.late_adds import (
    AbortedBeforeArrivalError,
    CallerGaveUpError,
    Tombstones,
    check_deadline,
    check_tombstone,
)
from pyllumnix.data_plane.llumlet.llumlet import InstanceNotAcceptingError, Llumlet, QueueFullError, RequestOwner
from pyllumnix.infra import wire
from pyllumnix.infra.etcd.errors import EtcdError
from pyllumnix.infra.framed_calls import CallServer, Method
from pyllumnix.infra.security.authz import authenticated_caller, is_plaintext
from pyllumnix.infra.security.ca import Identity
from pyllumnix.infra.security.fencing import (
    LeaderOf,
    StaleTermError,
    TermFence,
    TermUnverifiableError,
    UnprovenTermError,
    term_from_metadata,
)
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import admin_pb2, common_pb2, llumlet_pb2, llumlet_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "llumnix.v1.LlumletService"
# Served as framed calls too, once a gRPC reply named the listener (``AddRequestResponse.call_address``).
ADD_REQUEST_METHOD = f"/{SERVICE_NAME}/AddRequest"
_R = TypeVar("_R")
MIN_STREAM_INTERVAL_MS = 5
# Concurrent StreamLoad streams one caller (certificate identity; not counted without TLS) may hold: with the
# interval floor this bounds the snapshots per second any caller can make this llumlet build.
MAX_STREAMS_PER_CALLER = 4

# The metadata entry a forwarded abort named its migration by before AbortRequestRequest.migration_id existed: still
# sent alongside the field and still read, for one release, so a peer on either side of the upgrade understands it.
MIGRATION_METADATA_KEY = "llumnix-migration-id"
# Deadline of a forwarded abort passed on along a chain of migrations (the caller's remaining time, if shorter).
FORWARD_ABORT_TIMEOUT_S = 2.0


def forwarded_abort_metadata(migration_id: str) -> tuple[tuple[str, str], ...]:
    """The older peers' form of a forwarded abort's migration (see MIGRATION_METADATA_KEY): sent with the field."""
    return ((MIGRATION_METADATA_KEY, migration_id),)


def forwarded_abort(request_id: str, migration_id: str) -> llumlet_pb2.AbortRequestRequest:
    """A source's forwarded AbortRequest: the request, and the migration that moved it to the callee."""
    return llumlet_pb2.AbortRequestRequest(request_id=request_id, migration_id=migration_id)


def forwarded_migration(
    request: llumlet_pb2.AbortRequestRequest, metadata: Iterable[tuple[str, str | bytes]] | None
) -> str:
    """The migration a forwarded abort names ("" for any other abort): the field, else (an older source) the
    metadata entry."""
    if request.migration_id:
        return request.migration_id
    for key, value in metadata or ():
        if key == MIGRATION_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return ""


_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (UnknownRequestError, grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OutOfBlocksError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (InstanceNotAcceptingError, grpc.StatusCode.FAILED_PRECONDITION),
    # The waiting queue is full: the frontend answers HTTP 429 (or tries another instance).
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # An AddRequest its caller gave up on (see late_adds): refused rather than added for nobody.
    (CallerGaveUpError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (AbortedBeforeArrivalError, grpc.StatusCode.ABORTED),
)


def status_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    await context.abort(status_for(exc), str(exc) or type(exc).__name__)
    raise AssertionError("unreachable")  # context.abort raises


Registry = Callable[[str], Awaitable[str | None]]
"""Instance id -> its registered gRPC address (None: not registered); see :func:`registry_resolver`."""


def registry_resolver(registry: Any) -> Registry:
    """A :data:`Registry` over an ``InstanceRegistry`` (etcd): reads the instance's entry at each order."""

    async def address_of(instance_id: str) -> str | None:
        value = await registry.get(instance_id)
        if value is None:
            return None
        info = common_pb2.InstanceInfo()
        info.ParseFromString(value)
        return str(info.grpc_address)

    return address_of


def election_leader(election: Any) -> LeaderOf:
    """A ``LeaderOf`` over the scheduler's ``Election`` (etcd): the current leader's term (its key's
    create_revision) and the replica id its value names ("" for a value that is not a SchedulerReplica)."""

    async def leader_of() -> tuple[int, str] | None:
        info = await election.leader()
        if info is None:
            return None
        replica = admin_pb2.SchedulerReplica()
        try:
            replica.ParseFromString(info.value)
        except DecodeError:
            return int(info.create_revision), ""
        return int(info.create_revision), str(replica.replica_id)

    return leader_of


@dataclass(frozen=True)
class PassedOn:
    """A request that came here by a migration from ``source`` and left again by migration ``onward`` to the llumlet
    at ``address`` (at ``time.monotonic()`` ``at``): the source's abort, forwarded late (the client aborted while that
    first commit was in flight, and the forward was overtaken by the second migration), goes on along the chain,
    naming ``onward``, instead of being lost (the request would run on to its end with nobody waiting)."""

    source: str
    onward: str
    address: str
    at: float


class MigrationHandler(Protocol):
    """The migration coordinator's gRPC-facing side (source and destination roles)."""

    def incoming_source(self, migration_id: str) -> str | None: ...
    def incoming_request(self, migration_id: str) -> llumlet_pb2.MigratingRequest | None: ...
    def incoming_from(self, source_instance_id: str) -> list[str]: ...
    def migrated_from(self, request_id: str) -> str | None: ...
    def incarnation(self, request_id: str, migration_id: str) -> RequestOwner | None: ...
    def passed_on(self, request_id: str, migration_id: str) -> PassedOn | None: ...
    async def forward_abort(self, request_id: str, hop: PassedOn, timeout: float) -> None: ...

    async def migrate_out(self, request: llumlet_pb2.MigrateOutRequest) -> llumlet_pb2.MigrateOutResponse: ...
    async def pre_allocate(self, request: llumlet_pb2.PreAllocateRequest) -> llumlet_pb2.PreAllocateResponse: ...
    async def transfer_stage(self, request: llumlet_pb2.TransferStageRequest) -> llumlet_pb2.TransferStageResponse: ...
    async def commit(self, request: llumlet_pb2.CommitMigrationRequest) -> llumlet_pb2.CommitMigrationResponse: ...
    async def abort(self, request: llumlet_pb2.AbortMigrationRequest) -> llumlet_pb2.AbortMigrationResponse: ...


class MigrationError(Exception):
    """A migration call failed with a specific status (raised by the coordinator)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class LlumletServicer(llumlet_pb2_grpc.LlumletServiceServicer):
    """``registry``: where MigrateOut checks its destination (None: unchecked, with a warning; a llumlet that runs
    without etcd has no registry to ask). ``leaders``: where a new leader term is proven (None: terms are taken as
    written, with a warning; likewise without etcd)."""

    def __init__(
        self,
        llumlet: Llumlet,
        migration: MigrationHandler | None = None,
        stream_interval_ms: int = 50,
        *,
        registry: Registry | None = None,
        leaders: LeaderOf | None = None,
    ):
        self.llumlet = llumlet
        self.migration = migration
        self.stream_interval_ms = stream_interval_ms
        self.registry = registry
        self.fence = TermFence(leader_of=leaders)
        self._warned: set[str] = set()
        self._streams: dict[str, int] = {}
        # Ids aborted here before their AddRequest arrived (late_adds): that AddRequest is refused.
        self.tombstones = Tombstones()
        self.late_adds_refused = 0  # AddRequests refused because their caller had given up (either check)
        # AddRequest as framed calls too (``infra.framed_calls``), on the listener ``call_address`` names ("": none);
        # its callers checked as members of ``framed_cluster`` (None: a plaintext listener).
        self.call_address = ""
        self.framed_cluster: str | None = None
        self.framed_calls = CallServer(
            {ADD_REQUEST_METHOD: Method(llumlet_pb2.AddRequestRequest, self.AddRequest)}, lambda: self.framed_cluster
        )

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any], what: str) -> Identity | None:
        caller = await authenticated_caller(context, what)
        if caller is None:
            self._warn_once("insecure", f"llumlet {self.llumlet.instance_id}: plaintext calls (--insecure) unchecked")
        return caller

    async def _admit_order(self, context: grpc.aio.ServicerContext[Any, Any], what: str) -> None:
        """A leader's order: from role scheduler with a term not older than the newest seen here, and a newer term
        only once etcd names the caller as its leader (``TermFence.admit_proven``)."""
        caller = await self._caller(context, what)
        term = term_from_metadata(context.invocation_metadata())
        if caller is None and term is None:
            return
        if caller is not None and caller.role != "scheduler":
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{what}: caller {caller.role} {caller.id} is not the scheduler"
            )
        if term is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what}: the order carries no leader term")
        if self.fence.leader_of is None:
            self._warn_once("terms", "leader terms are taken as written: this llumlet has no etcd to prove them")
        try:
            await self.fence.admit_proven(term, caller.id if caller is not None else None)
        except StaleTermError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{what}: {exc}")
        except UnprovenTermError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what}: {exc}")
        except TermUnverifiableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{what}: {exc}")

    async def _check_destination(
        self, context: grpc.aio.ServicerContext[Any, Any], request: llumlet_pb2.MigrateOutRequest
    ) -> None:
        if self.registry is None:
            self._warn_once("registry", "MigrateOut destinations are not checked: this llumlet has no registry")
            return
        dst = request.destination_instance_id
        try:
            registered = await self.registry(dst) if dst else None
        except EtcdError as exc:  # the leader retries at its next pass; UNKNOWN would read as a fault of this llumlet
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"MigrateOut: cannot check destination {dst!r} in the registry: {exc}"
            )
        if registered is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"MigrateOut: destination {dst!r} is not a registered instance"
            )
        if registered != request.destination_grpc_address:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"MigrateOut: destination {dst} is registered at {registered}, not {request.destination_grpc_address}",
            )

    async def AddRequest(
        self, request: llumlet_pb2.AddRequestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.AddRequestResponse:
        request_id, instance_id = request.request.request_id, self.llumlet.instance_id
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")

        def admit() -> None:
            """Right before the add, after any wait for the engine lock: is anyone still waiting for this add?"""
            check_tombstone(self.tombstones, request_id, instance_id)
            check_deadline(context.time_remaining(), request_id, instance_id)

        try:
            await self.llumlet.add_request(request.request, admit)
        except (EngineError, InstanceNotAcceptingError, QueueFullError) as exc:
            await abort_with(context, exc)
        except (CallerGaveUpError, AbortedBeforeArrivalError) as exc:
            self.late_adds_refused += 1
            log.info("%s", exc)  # its caller has moved on (placed the request elsewhere); nothing to alarm anyone
            await abort_with(context, exc)
        return llumlet_pb2.AddRequestResponse(instance_id=instance_id, call_address=self.call_address)

    async def AbortRequest(
        self, request: llumlet_pb2.AbortRequestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.AbortRequestResponse:
        caller = await self._caller(context, "AbortRequest")
        request_id = request.request_id
        migration_id = forwarded_migration(request, context.invocation_metadata())
        if caller is not None and caller.role == "llumlet":
            await self._forwarded_abort(context, caller, request_id, migration_id)
        incarnation = None
        if migration_id:
            incarnation = self.migration.incarnation(request_id, migration_id) if self.migration is not None else None
            if incarnation is None:
                await self._pass_abort_on(context, request_id, migration_id)
                return llumlet_pb2.AbortRequestResponse()
        elif request.capability:
            # A frontend's abort names its grant: a request with the id holding another token is not this abort's
            # (another frontend's, whose client chose the same id; before, any frontend could end it by its id).
            owner = self.llumlet.owners.get(request_id)
            if owner is not None and owner.capability and not _same(owner.capability, request.capability):
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"AbortRequest: the request {request_id!r} on {self.llumlet.instance_id} carries another "
                    "capability (not the caller's request)",
                )
            incarnation = owner
        try:
            await self.llumlet.abort_request(request_id, incarnation=incarnation)
        except EngineError as exc:
            if isinstance(exc, UnknownRequestError) and migration_id:
                # It migrated on between the check above and the engine lock: the abort follows it.
                await self._pass_abort_on(context, request_id, migration_id)
                return llumlet_pb2.AbortRequestResponse()
            if isinstance(exc, UnknownRequestError) and request_id:
                # It may not have arrived yet (the AddRequest overtaken by this abort): its add must not happen. (A
                # forwarded abort is for a request already here: it plants nothing.)
                self.tombstones.add(request_id)
            await abort_with(context, exc)
        return llumlet_pb2.AbortRequestResponse()

    async def _pass_abort_on(self, context: grpc.aio.ServicerContext[Any, Any], request_id: str, mid: str) -> None:
        """A forwarded abort of a request migration ``mid`` brought here, which is no longer here: if it went on by
        a later migration, the abort follows it there (naming that one), so a client's abort that raced two
        migrations in a row still ends the request and frees its blocks; NOT_FOUND if it ended here (a later request
        with that id is not this abort's). The next llumlet's answer is this call's."""
        hop = self.migration.passed_on(request_id, mid) if self.migration is not None else None
        if hop is None or self.migration is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"AbortRequest: the request {request_id!r} that migration {mid} brought to "
                f"{self.llumlet.instance_id} is no longer here (a later request with that id is not this abort's)",
            )
            return
        remaining = context.time_remaining()
        timeout = FORWARD_ABORT_TIMEOUT_S if remaining is None else min(FORWARD_ABORT_TIMEOUT_S, remaining)
        log.info("abort of %s (migration %s) passed on to %s (migration %s)", request_id, mid, hop.address, hop.onward)
        try:
            await self.migration.forward_abort(request_id, hop, timeout)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"AbortRequest passed on to {hop.address}: {exc.details()}")

    async def _forwarded_abort(
        self, context: grpc.aio.ServicerContext[Any, Any], caller: Identity, request_id: str, migration_id: str
    ) -> None:
        """A llumlet may abort only a request it migrated here (its client's abort that raced the commit, see the
        coordinator's ForwardAbort), naming the migration; any other request id is none of its business, and an
        abort naming no migration could hit a later request of the same id: PERMISSION_DENIED."""
        source = self.migration.migrated_from(request_id) if self.migration is not None else None
        if source != caller.id and migration_id and self.migration is not None:
            hop = self.migration.passed_on(request_id, migration_id)  # it came from the caller and went on
            source = hop.source if hop is not None else source
        if source != caller.id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"AbortRequest: llumlet {caller.id} may abort only a request it migrated to "
                f"{self.llumlet.instance_id}; {request_id!r} did not come from it",
            )
        if not migration_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"AbortRequest: llumlet {caller.id}'s abort of {request_id!r} names no migration "
                "(AbortRequestRequest.migration_id)",
            )

    async def GetLoad(
        self, request: llumlet_pb2.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.GetLoadResponse:
        return llumlet_pb2.GetLoadResponse(load=self.llumlet.load_pb())

    async def StreamLoad(
        self, request: llumlet_pb2.StreamLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llumlet_pb2.StreamLoadResponse]:
        interval_ms = request.interval_ms or self.stream_interval_ms
        if interval_ms < MIN_STREAM_INTERVAL_MS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"interval_ms must be >= {MIN_STREAM_INTERVAL_MS}")
        caller = await self._caller(context, "StreamLoad")
        who = f"{caller.role}/{caller.id}" if caller is not None else ""  # insecure: no identity to count by
        if who and self._streams.get(who, 0) >= MAX_STREAMS_PER_CALLER:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who} already holds {MAX_STREAMS_PER_CALLER} load streams on {self.llumlet.instance_id}",
            )
        self._streams[who] = self._streams.get(who, 0) + 1
        try:
            while True:
                yield llumlet_pb2.StreamLoadResponse(load=self.llumlet.load_pb())
                await asyncio.sleep(interval_ms / 1000)
        finally:
            self._streams[who] -= 1
            if not self._streams[who]:
                del self._streams[who]

    async def ListRequests(
        self, request: llumlet_pb2.ListRequestsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.ListRequestsResponse:
        snap = self.llumlet.engine.load()
        return llumlet_pb2.ListRequestsResponse(requests=[request_load_to_pb(r) for r in snap.requests])

    async def SetInstanceState(
        self, request: llumlet_pb2.SetInstanceStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.SetInstanceStateResponse:
        allowed = (InstanceState.ACTIVE, InstanceState.CORDONED, InstanceState.DRAINING)
        await self._admit_order(context, "SetInstanceState")
        state = wire.state_from_pb(request.state)
        if state not in allowed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "state must be ACTIVE, CORDONED or DRAINING")
        self.llumlet.state = state
        return llumlet_pb2.SetInstanceStateResponse(state=wire.state_to_pb(self.llumlet.state))

    # --- migration ---
    async def _migration(self, context: grpc.aio.ServicerContext[Any, Any]) -> MigrationHandler:
        if self.migration is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this llumlet has no migration coordinator")
        assert self.migration is not None
        return self.migration

    async def _delegate(self, context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[_R]) -> _R:
        try:
            return await call
        except MigrationError as exc:
            code, message = exc.code, str(exc)
        except EngineError as exc:
            code, message = status_for(exc), str(exc) or type(exc).__name__
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    async def MigrateOut(
        self, request: llumlet_pb2.MigrateOutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.MigrateOutResponse:
        await self._admit_order(context, "MigrateOut")
        if not is_plaintext(context):
            await self._check_destination(context, request)
        handler = await self._migration(context)
        return await self._delegate(context, handler.migrate_out(request))

    async def PreAllocate(
        self, request: llumlet_pb2.PreAllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.PreAllocateResponse:
        handler = await self._migration(context)
        caller = await self._caller(context, "PreAllocate")
        if caller is not None:
            if caller.role != "llumlet" or caller.id != request.source_instance_id:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"PreAllocate: caller {caller.role} {caller.id} may not reserve for source "
                    f"{request.source_instance_id!r}",
                )
            source = handler.incoming_source(request.migration_id)
            if source is not None and source != caller.id:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"PreAllocate: migration {request.migration_id} belongs to source {source}, not {caller.id}",
                )
            live = handler.incoming_from(caller.id)
            held = [m for m in live if m != request.migration_id]
            if request.migration_id not in live and held:  # a new reservation (an ended id's source is known too)
                await context.abort(
                    grpc.StatusCode.ABORTED, f"PreAllocate: source {caller.id} already holds reservation {held[0]}"
                )
        return await self._delegate(context, handler.pre_allocate(request))

    async def TransferStage(
        self, request: llumlet_pb2.TransferStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.TransferStageResponse:
        handler = await self._migration(context)
        await self._from_source(context, handler, request.migration_id, "TransferStage")
        return await self._delegate(context, handler.transfer_stage(request))

    async def CommitMigration(
        self, request: llumlet_pb2.CommitMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.CommitMigrationResponse:
        handler = await self._migration(context)
        await self._from_source(context, handler, request.migration_id, "CommitMigration")
        announced = handler.incoming_request(request.migration_id)
        if announced is not None:
            got, want = request.request.request, announced.request
            if got.request_id != want.request_id or got.frontend_address != want.frontend_address:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"CommitMigration: migration {request.migration_id} announced request {want.request_id} of "
                    f"frontend {want.frontend_address}; the commit names {got.request_id} of {got.frontend_address}",
                )
        return await self._delegate(context, handler.commit(request))

    async def AbortMigration(
        self, request: llumlet_pb2.AbortMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.AbortMigrationResponse:
        handler = await self._migration(context)
        await self._from_source(context, handler, request.migration_id, "AbortMigration")
        return await handler.abort(request)

    async def _from_source(
        self, context: grpc.aio.ServicerContext[Any, Any], handler: MigrationHandler, migration_id: str, what: str
    ) -> None:
        """Only the source holding a migration's reservation may drive it (unknown migrations fall through to the
        handler, which answers NOT_FOUND, or success for an idempotent abort)."""
        caller = await self._caller(context, what)
        source = handler.incoming_source(migration_id)
        if caller is not None and source is not None and (caller.role != "llumlet" or caller.id != source):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what}: migration {migration_id} belongs to source {source}, not {caller.role} {caller.id}",
            )


def _same(a: str, b: str) -> bool:
    """Two capability tokens are the same (compared in constant time)."""
    return hmac.compare_digest(a.encode(), b.encode())
