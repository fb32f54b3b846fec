"""SchedulerService and AdminService servicers over a SchedulerReplica.

A follower answers every call but GetLeader with FAILED_PRECONDITION and the leader's address in the trailing
metadata key ``llumnix-leader``, so a client retries there and a write is never applied twice.

ReportLoad: a llumlet streams full loads when its load changed and keep-alives otherwise (``cluster.py`` has the
staleness rule they keep); a keep-alive naming a snapshot this leader does not hold ends the stream with
FAILED_PRECONDITION, and the llumlet's next stream starts with its full load. A llumlet reports only its own load
(each message's ``instance_id`` is the caller's certificate id, else PERMISSION_DENIED), and reports of one instance
closer together than ``min_report_interval`` are dropped (not counted as accepted), so no caller can make the leader
do more than a bounded amount of work. Both checks are skipped on a plaintext (``--insecure``) connection, which has
no identity; the floor still applies per reported instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc

from pyllumnix.control_plane.scheduler.cluster import StaleKeepAliveError
from pyllumnix.control_plane.scheduler.config_wire import config_to_pb
from pyllumnix.control_plane.scheduler.replica import (
    FIRST_VIEW_WAIT_S,
    NotLeaderError,
    SchedulerReplica,
    SchedulingError,
)
from pyllumnix.infra.framed import (
    CALL,
    FramedContext,
    FramedServerStream,
    drop_connections,
    framed_caller,
    serve_connection,
)
from pyllumnix.infra.framed_calls import CallServer, Method, first_frame
from pyllumnix.infra.security.authz import authenticated_caller, require_self
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import admin_pb2, admin_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

LEADER_METADATA_KEY = "llumnix-leader"
SCHEDULER_SERVICE = "llumnix.v1.SchedulerService"
# The framed load stream is ReportLoad in other frames: the role table's rule for that method decides its callers.
REPORT_LOAD_METHOD = f"/{SCHEDULER_SERVICE}/ReportLoad"
# Served as framed calls too (a frontend's dispatches, once a gRPC reply named the listener: ``dispatch_address``).
DISPATCH_METHOD = f"/{SCHEDULER_SERVICE}/Dispatch"
ADMIN_SERVICE = "llumnix.v1.AdminService"

# Reports of one instance closer together than this are dropped (a llumlet reports every 50 ms by default).
MIN_REPORT_INTERVAL_S = 0.005
_R = TypeVar("_R")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


async def _fail(context: Context, exc: Exception) -> NoReturn:
    if isinstance(exc, NotLeaderError):
        context.set_trailing_metadata(((LEADER_METADATA_KEY, exc.leader_address),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    elif isinstance(exc, SchedulingError):
        await context.abort(exc.code, str(exc))
    elif isinstance(exc, grpc.aio.AioRpcError):
        await context.abort(exc.code(), exc.details() or exc.code().name)
    raise exc


async def _guard(context: Context, call: Callable[[], Awaitable[_R]]) -> _R:
    try:
        return await call()
    except (NotLeaderError, SchedulingError, grpc.aio.AioRpcError) as exc:
        await _fail(context, exc)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, replica: SchedulerReplica, *, min_report_interval: float = MIN_REPORT_INTERVAL_S) -> None:
        self.replica = replica
        self.min_report_interval = min_report_interval
        # instance id -> time.monotonic() of its latest accepted report; reports dropped by the floor.
        self._last_report: dict[str, float] = {}
        self.reports_throttled = 0
        self.keepalives_received = 0
        # instance id -> its latest full load dropped by the floor, applied when a keep-alive confirms it (else a
        # llumlet that then only confirms it would have its stream ended for a load the leader threw away).
        self._held: dict[str, common_pb2.InstanceLoad] = {}
        # The trust domain of framed load streams' peers (None: a plaintext listener, as on an --insecure scheduler).
        self.framed_cluster: str | None = None
        self.framed_connections: set[asyncio.StreamWriter] = set()
        self.framed_calls = CallServer(
            {DISPATCH_METHOD: Method(scheduler_pb2.DispatchRequest, self.Dispatch)}, lambda: self.framed_cluster
        )

    async def Dispatch(
        self, request: scheduler_pb2.DispatchRequest, context: Context
    ) -> scheduler_pb2.DispatchResponse:
        # The hot path: no closure, no extra coroutine.
        if self.replica.view_pending():  # a new leader not yet heard from every instance (replica.FIRST_VIEW_WAIT_S)
            remaining = context.time_remaining()
            await self.replica.wait_for_first_view(FIRST_VIEW_WAIT_S if remaining is None else remaining - 0.05)
        try:
            iid, address = self.replica.dispatch(
                request.request_id, request.priority, request.num_prompt_tokens, request.max_tokens
            )
        except (NotLeaderError, SchedulingError) as exc:
            await _fail(context, exc)
        return scheduler_pb2.DispatchResponse(
            instance_id=iid, grpc_address=address, dispatch_address=self.replica.report_address
        )

    async def ReportLoad(
        self, request_iterator: AsyncIterator[scheduler_pb2.ReportLoadRequest], context: Context
    ) -> scheduler_pb2.ReportLoadResponse:
        accepted = 0
        caller = await authenticated_caller(context, "ReportLoad")
        try:
            self.replica.require_leader()
            async for report in request_iterator:
                keep_alive = report.HasField("keep_alive")
                iid = report.keep_alive.instance_id if keep_alive else report.load.instance_id
                if caller is not None:
                    await require_self(context, iid)
                self.replica.require_leader()
                accepted += self.take(report, iid, keep_alive)
        except NotLeaderError as exc:
            await _fail(context, exc)
        except StaleKeepAliveError as exc:  # the llumlet's next stream starts with its full load
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return scheduler_pb2.ReportLoadResponse(reports_accepted=accepted)

    async def serve_framed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection to the framed listener (the replica's ``report_address``): framed Dispatch calls when its
        first frame is a call, else a llumlet's load stream."""
        self.framed_connections.add(writer)  # (from its start: a stop drops it even before its first frame)
        try:
            first = await first_frame(reader, writer)
            if first is None:
                return
            if first[0] == CALL:
                await self.framed_calls.serve(reader, writer, first)
            else:
                await self.serve_framed_reports(reader, writer, first=first)
        finally:
            self.framed_connections.discard(writer)

    async def serve_framed_reports(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, first: tuple[int, bytes] | None = None
    ) -> None:
        """A llumlet's load stream over ``infra.framed`` frames: the caller is the connection's TLS peer, checked as
        the role table checks ReportLoad; then ``ReportLoad`` itself serves it, its refusals ending the stream with the
        same status."""

        async def run(stream: FramedServerStream[scheduler_pb2.ReportLoadRequest]) -> None:
            context = FramedContext(framed_caller(writer, self.framed_cluster, REPORT_LOAD_METHOD))
            await stream.send(await self.ReportLoad(stream.messages(), context))

        await serve_connection(
            reader, writer, scheduler_pb2.ReportLoadRequest, run, connections=self.framed_connections, first=first
        )

    def close_framed(self) -> None:
        """Drops every open framed connection (the replica is stopping; their llumlets follow the next leader, their
        frontends dispatch over gRPC until a reply names the next leader's listener)."""
        drop_connections(self.framed_connections)
        self.framed_calls.close()

    def take(self, report: scheduler_pb2.ReportLoadRequest, instance_id: str, keep_alive: bool) -> bool:
        """One streamed message of ``instance_id``, past the identity check: the per-instance floor, then the load or
        keep-alive applied. True if taken. (``llumnix bench dispatch`` feeds its synthetic reports through here.)"""
        now = time.monotonic()
        last = self._last_report.get(instance_id)
        if last is not None and now - last < self.min_report_interval:
            self.reports_throttled += 1
            if not keep_alive:  # kept (the latest only): the keep-alives that follow confirm this load
                self._held[instance_id] = report.load
                # Its keep-alives now come at this load's period (a quiet load's are 1 s apart): wait for them so.
                self.replica.cluster.note_cadence(report.load)
            return False
        held = self._held.pop(instance_id, None) if self._held else None
        if keep_alive:
            self.keepalives_received += 1
            if held is not None and held.seq == report.keep_alive.seq:
                taken = self.replica.report(held, now)  # one load for the two messages: still one per floor interval
            else:
                taken = self.replica.keepalive(instance_id, report.keep_alive.seq, now)
        else:
            taken = self.replica.report(report.load, now)
        if taken:
            self._last_report[instance_id] = now
        return taken

    async def GetMembership(
        self, request: scheduler_pb2.GetMembershipRequest, context: Context
    ) -> scheduler_pb2.GetMembershipResponse:
        async def call() -> scheduler_pb2.GetMembershipResponse:
            self.replica.require_leader()
            return scheduler_pb2.GetMembershipResponse(
                instances=self.replica.cluster.statuses(self.replica.core.config, time.monotonic())
            )

        return await _guard(context, call)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, replica: SchedulerReplica) -> None:
        self.replica = replica

    def _status(self, instance_id: str) -> Any:
        return self.replica.cluster.status(instance_id, self.replica.core.config, time.monotonic())

    async def ListInstances(
        self, request: admin_pb2.ListInstancesRequest, context: Context
    ) -> admin_pb2.ListInstancesResponse:
        async def call() -> admin_pb2.ListInstancesResponse:
            self.replica.require_leader()
            return admin_pb2.ListInstancesResponse(
                instances=self.replica.cluster.statuses(self.replica.core.config, time.monotonic())
            )

        return await _guard(context, call)

    async def ListClusterRequests(
        self, request: admin_pb2.ListClusterRequestsRequest, context: Context
    ) -> admin_pb2.ListClusterRequestsResponse:
        async def call() -> admin_pb2.ListClusterRequestsResponse:
            self.replica.require_leader()
            if request.instance_id:
                self.replica.known(request.instance_id)
            reply = admin_pb2.ListClusterRequestsResponse()
            for iid, load in sorted(self.replica.cluster.loads.items()):
                if request.instance_id and iid != request.instance_id:
                    continue
                for r in load.requests:
                    reply.requests.add(instance_id=iid, request=r)
            return reply

        return await _guard(context, call)

    async def MigrateRequest(
        self, request: admin_pb2.MigrateRequestRequest, context: Context
    ) -> admin_pb2.MigrateRequestResponse:
        async def call() -> admin_pb2.MigrateRequestResponse:
            result = await self.replica.migrate_request(request.request_id, request.destination_instance_id)
            return admin_pb2.MigrateRequestResponse(result=result)

        return await _guard(context, call)

    async def _set_state(self, instance_id: str, state: InstanceState) -> Any:
        await self.replica.set_instance_state(instance_id, state)
        return self._status(instance_id)

    async def DrainInstance(
        self, request: admin_pb2.DrainInstanceRequest, context: Context
    ) -> admin_pb2.DrainInstanceResponse:
        async def call() -> admin_pb2.DrainInstanceResponse:
            status = await self._set_state(request.instance_id, InstanceState.DRAINING)
            return admin_pb2.DrainInstanceResponse(instance=status)

        return await _guard(context, call)

    async def CordonInstance(
        self, request: admin_pb2.CordonInstanceRequest, context: Context
    ) -> admin_pb2.CordonInstanceResponse:
        async def call() -> admin_pb2.CordonInstanceResponse:
            status = await self._set_state(request.instance_id, InstanceState.CORDONED)
            return admin_pb2.CordonInstanceResponse(instance=status)

        return await _guard(context, call)

    async def UncordonInstance(
        self, request: admin_pb2.UncordonInstanceRequest, context: Context
    ) -> admin_pb2.UncordonInstanceResponse:
        async def call() -> admin_pb2.UncordonInstanceResponse:
            status = await self._set_state(request.instance_id, InstanceState.ACTIVE)
            return admin_pb2.UncordonInstanceResponse(instance=status)

        return await _guard(context, call)

    async def Scale(self, request: admin_pb2.ScaleRequest, context: Context) -> admin_pb2.ScaleResponse:
        async def call() -> admin_pb2.ScaleResponse:
            current, target = await self.replica.scale_to(request.target_instances)
            return admin_pb2.ScaleResponse(current_instances=current, target_instances=target)

        return await _guard(context, call)

    async def GetConfig(self, request: admin_pb2.GetConfigRequest, context: Context) -> admin_pb2.GetConfigResponse:
        async def call() -> admin_pb2.GetConfigResponse:
            self.replica.require_leader()
            return admin_pb2.GetConfigResponse(
                config=config_to_pb(self.replica.core.config), revision=self.replica.config_revision
            )

        return await _guard(context, call)

    async def SetConfig(self, request: admin_pb2.SetConfigRequest, context: Context) -> admin_pb2.SetConfigResponse:
        async def call() -> admin_pb2.SetConfigResponse:
            config, revision = await self.replica.set_config(
                request.config, list(request.update_mask.paths), request.expected_revision
            )
            return admin_pb2.SetConfigResponse(config=config, revision=revision)

        return await _guard(context, call)

    async def ResignLeader(
        self, request: admin_pb2.ResignLeaderRequest, context: Context
    ) -> admin_pb2.ResignLeaderResponse:
        async def call() -> admin_pb2.ResignLeaderResponse:
            term, hold_off = await self.replica.resign_leader()
            return admin_pb2.ResignLeaderResponse(
                resigned=admin_pb2.SchedulerReplica(
                    replica_id=self.replica.replica_id, grpc_address=self.replica.grpc_address, leader=False
                ),
                term=term,
                hold_off_ms=round(hold_off * 1000),
            )

        return await _guard(context, call)

    async def GetLeader(self, request: admin_pb2.GetLeaderRequest, context: Context) -> admin_pb2.GetLeaderResponse:
        leader = self.replica.leader
        return admin_pb2.GetLeaderResponse(
            leader_id=leader.replica_id,
            leader_address=leader.address,
            term=leader.term,
            answered_by=admin_pb2.SchedulerReplica(
                replica_id=self.replica.replica_id,
                grpc_address=self.replica.grpc_address,
                leader=self.replica.is_leader,
            ),
        )
