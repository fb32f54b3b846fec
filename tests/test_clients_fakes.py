"""Fake AdminService / SchedulerService / FrontendService servicers shared by the client and llmctl tests (no tests).

A fake scheduler replica is either the leader or a follower that refuses writes (and Dispatch) with
FAILED_PRECONDITION and the leader's address in the "llumnix-leader" trailer, as the real replicas do.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from pyllumnix.control_plane.policy.config import check_scale_target
from pyllumnix.control_plane.scheduler.config_wire import config_from_pb, config_to_pb
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    config_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

LEADER_KEY = "llumnix-leader"


def instance(
    instance_id: str,
    *,
    state: int = common_pb2.INSTANCE_STATE_ACTIVE,
    total: int = 100,
    free: int = 40,
    running: int = 3,
    waiting: int = 1,
    preempted: int = 0,
    freeness: float = 12.5,
    migrating_out: bool = False,
) -> scheduler_pb2.InstanceStatus:
    return scheduler_pb2.InstanceStatus(
        info=common_pb2.InstanceInfo(instance_id=instance_id, grpc_address=f"{instance_id}:1", total_blocks=total),
        load=common_pb2.InstanceLoad(
            instance_id=instance_id,
            total_blocks=total,
            free_blocks=free,
            num_running=running,
            num_waiting=waiting,
            num_preempted=preempted,
            migrating_out=migrating_out,
        ),
        state=state,  # type: ignore[arg-type]
        freeness=freeness,
    )


def request_load(request_id: str, blocks: int = 4) -> common_pb2.RequestLoad:
    return common_pb2.RequestLoad(
        request_id=request_id,
        phase=common_pb2.REQUEST_PHASE_RUNNING,
        priority=common_pb2.PRIORITY_NORMAL,
        num_blocks=blocks,
        num_prompt_tokens=10,
        num_output_tokens=5,
    )


class Replica:
    """Leader/follower behaviour and call counting shared by the fake scheduler services."""

    def __init__(self, replica_id: str, *, leader: bool = True, leader_address: str = "") -> None:
        self.replica_id = replica_id
        self.leader = leader
        self.leader_address = leader_address
        self.address = ""
        self.calls: Counter[str] = Counter()
        # method -> (code, details): the next calls of that method fail so.
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}
        # method -> seconds: the next calls of that method answer only after this long (a slow replica).
        self.delay: dict[str, float] = {}

    async def gate(self, method: str, context: Any, *, leader_only: bool) -> None:
        self.calls[method] += 1
        if method in self.delay:
            await asyncio.sleep(self.delay[method])
        if method in self.fail:
            code, details = self.fail[method]
            await context.abort(code, details)
        if leader_only and not self.leader:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.replica_id} is not the leader",
                trailing_metadata=((LEADER_KEY, self.leader_address),),
            )


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.instances: dict[str, scheduler_pb2.InstanceStatus] = {
            "i-1": instance("i-1"),
            "i-2": instance("i-2", free=90, running=1, waiting=0, freeness=float("inf"), migrating_out=True),
        }
        self.requests: dict[str, list[common_pb2.RequestLoad]] = {
            "i-1": [request_load("r-1"), request_load("r-2")],
            "i-2": [request_load("r-3")],
        }
        self.config = config_pb2.ClusterConfig(
            dispatch=config_pb2.DispatchConfig(policy=config_pb2.DISPATCH_POLICY_LLUMNIX),
            migration=config_pb2.MigrationConfig(migrate_out_threshold=3.0, max_stages=3),
            load_report_interval_ms=50,
        )
        self.revision = 7
        self.set_requests: list[admin_pb2.SetConfigRequest] = []
        self.reject_config: str = ""
        # As the real replica: store the update read through the cluster's defaults (0 -> the default).
        self.apply_defaults = False
        # What the next MigrateRequest ends as (the real llumlet reports aborts as an outcome, not an error).
        self.migration_outcome = llumlet_pb2.MIGRATION_OUTCOME_COMMITTED
        self.migration_reason = ""
        # The instance provider's cap the fake Scale checks against (the real check, shared with the scheduler).
        self.provider_cap: int | None = None
        self.scale_reply_target: int | None = None
        self.resigned = 0

    async def _instance(self, instance_id: str, context: Any) -> scheduler_pb2.InstanceStatus:
        st = self.instances.get(instance_id)
        if st is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"instance {instance_id} not found")
        assert st is not None
        return st

    async def ListInstances(self, request: Any, context: Any) -> admin_pb2.ListInstancesResponse:
        await self.r.gate("ListInstances", context, leader_only=False)
        return admin_pb2.ListInstancesResponse(instances=list(self.instances.values()))

    async def ListClusterRequests(self, request: Any, context: Any) -> admin_pb2.ListClusterRequestsResponse:
        await self.r.gate("ListClusterRequests", context, leader_only=False)
        ids = [request.instance_id] if request.instance_id else sorted(self.requests)
        out: list[admin_pb2.ClusterRequest] = []
        for iid in ids:
            st = await self._instance(iid, context)
            if st.state == common_pb2.INSTANCE_STATE_DRAINING:
                # Each poll sees one more request migrated out; the instance stops when empty.
                if not self.requests.get(iid):
                    del self.instances[iid]
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"instance {iid} not found")
                self.requests[iid].pop()
            out += [admin_pb2.ClusterRequest(instance_id=iid, request=r) for r in self.requests.get(iid, [])]
        return admin_pb2.ListClusterRequestsResponse(requests=out)

    async def MigrateRequest(self, request: Any, context: Any) -> admin_pb2.MigrateRequestResponse:
        await self.r.gate("MigrateRequest", context, leader_only=True)
        for iid, reqs in self.requests.items():
            if any(r.request_id == request.request_id for r in reqs):
                if iid == request.destination_instance_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination is the request's instance")
                await self._instance(request.destination_instance_id, context)
                return admin_pb2.MigrateRequestResponse(
                    result=llumlet_pb2.MigrationResult(
                        migration_id="m-1",
                        request_id=request.request_id,
                        source_instance_id=iid,
                        destination_instance_id=request.destination_instance_id,
                        outcome=self.migration_outcome,
                        reason=self.migration_reason,
                        stages=2,
                        downtime_ms=3.5,
                        total_ms=40.0,
                    )
                )
        await context.abort(grpc.StatusCode.NOT_FOUND, f"request {request.request_id} not found")
        raise AssertionError

    async def _set_state(self, method: str, instance_id: str, state: int, context: Any) -> scheduler_pb2.InstanceStatus:
        await self.r.gate(method, context, leader_only=True)
        st = await self._instance(instance_id, context)
        st.state = state  # type: ignore[assignment]
        return st

    async def DrainInstance(self, request: Any, context: Any) -> admin_pb2.DrainInstanceResponse:
        st = await self._set_state("DrainInstance", request.instance_id, common_pb2.INSTANCE_STATE_DRAINING, context)
        return admin_pb2.DrainInstanceResponse(instance=st)

    async def CordonInstance(self, request: Any, context: Any) -> admin_pb2.CordonInstanceResponse:
        st = await self._set_state("CordonInstance", request.instance_id, common_pb2.INSTANCE_STATE_CORDONED, context)
        return admin_pb2.CordonInstanceResponse(instance=st)

    async def UncordonInstance(self, request: Any, context: Any) -> admin_pb2.UncordonInstanceResponse:
        st = await self._set_state("UncordonInstance", request.instance_id, common_pb2.INSTANCE_STATE_ACTIVE, context)
        return admin_pb2.UncordonInstanceResponse(instance=st)

    async def Scale(self, request: Any, context: Any) -> admin_pb2.ScaleResponse:
        await self.r.gate("Scale", context, leader_only=True)
        try:
            check_scale_target(request.target_instances, config_from_pb(self.config), self.provider_cap)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        target = request.target_instances if self.scale_reply_target is None else self.scale_reply_target
        return admin_pb2.ScaleResponse(current_instances=len(self.instances), target_instances=target)

    async def GetConfig(self, request: Any, context: Any) -> admin_pb2.GetConfigResponse:
        await self.r.gate("GetConfig", context, leader_only=False)
        return admin_pb2.GetConfigResponse(config=self.config, revision=self.revision)

    async def SetConfig(self, request: admin_pb2.SetConfigRequest, context: Any) -> admin_pb2.SetConfigResponse:
        await self.r.gate("SetConfig", context, leader_only=True)
        self.set_requests.append(request)
        if self.reject_config:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.reject_config)
        if request.expected_revision and request.expected_revision != self.revision:
            await context.abort(grpc.StatusCode.ABORTED, "stale expected_revision")
        request.update_mask.MergeMessage(request.config, self.config, replace_message_field=True)
        if self.apply_defaults:
            self.config = config_to_pb(config_from_pb(self.config))
        self.revision += 1
        return admin_pb2.SetConfigResponse(config=self.config, revision=self.revision)

    async def GetLeader(self, request: Any, context: Any) -> admin_pb2.GetLeaderResponse:
        await self.r.gate("GetLeader", context, leader_only=False)
        me = admin_pb2.SchedulerReplica(replica_id=self.r.replica_id, grpc_address=self.r.address, leader=self.r.leader)
        leader_address = self.r.address if self.r.leader else self.r.leader_address
        return admin_pb2.GetLeaderResponse(leader_id="s-leader", leader_address=leader_address, term=3, answered_by=me)

    async def ResignLeader(self, request: Any, context: Any) -> admin_pb2.ResignLeaderResponse:
        await self.r.gate("ResignLeader", context, leader_only=True)
        self.resigned += 1
        me = admin_pb2.SchedulerReplica(replica_id=self.r.replica_id, grpc_address=self.r.address)
        return admin_pb2.ResignLeaderResponse(resigned=me, term=3, hold_off_ms=3000)


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, replica: Replica, *, delay: float = 0.0) -> None:
        self.r = replica
        self.delay = delay

    async def Dispatch(self, request: Any, context: Any) -> scheduler_pb2.DispatchResponse:
        await self.r.gate("Dispatch", context, leader_only=True)
        if self.delay:
            await asyncio.sleep(self.delay)
        return scheduler_pb2.DispatchResponse(instance_id=f"via-{self.r.replica_id}", grpc_address="leader-pick:1")

    async def ReportLoad(self, request_iterator: Any, context: Any) -> scheduler_pb2.ReportLoadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")
        raise AssertionError

    async def GetMembership(self, request: Any, context: Any) -> scheduler_pb2.GetMembershipResponse:
        await self.r.gate("GetMembership", context, leader_only=False)
        return scheduler_pb2.GetMembershipResponse(instances=[instance("i-1")], revision=5)


class FakeFrontend(frontend_pb2_grpc.FrontendServiceServicer):
    """Streams one token per message; ``break_after`` fails the stream with UNAVAILABLE after that many messages,
    ``end_after`` ends it with status OK after that many (no finished message)."""

    def __init__(
        self,
        name: str,
        *,
        break_after: int | None = None,
        end_after: int | None = None,
        migrate_at: int | None = None,
    ) -> None:
        self.name = name
        self.break_after = break_after
        self.end_after = end_after
        self.migrate_at = migrate_at
        self.generate_calls: list[frontend_pb2.GenerateRequest] = []
        self.aborted: list[str] = []
        self.active: set[str] = set()
        # Set when a stream ends before its last message because the caller went away. grpc.aio reports that either
        # as CancelledError in the handler or by closing the handler's generator (GeneratorExit at the yield, with
        # the context not marked cancelled); measured ~1 in 5 calls take the second path here, so both count.
        self.cancelled = asyncio.Event()

    async def Generate(
        self, request: frontend_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[frontend_pb2.GenerateResponse]:
        self.generate_calls.append(request)
        self.active.add(request.request_id)
        n = request.sampling.max_tokens
        prompt = list(request.token_ids.ids) if request.HasField("token_ids") else [ord(c) for c in request.text]
        try:
            for i in range(n):
                if self.break_after is not None and i == self.break_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "frontend lost its connection")
                if self.end_after is not None and i == self.end_after:
                    return
                where = "i-2" if self.migrate_at is not None and i >= self.migrate_at else "i-1"
                last = i == n - 1
                msg = frontend_pb2.GenerateResponse(
                    request_id=request.request_id,
                    text=f"t{i} ",
                    token_ids=[100 + i],
                    first_token_index=i,
                    finished=last,
                    instance_id=where,
                )
                if last:
                    msg.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    msg.usage.prompt_tokens = len(prompt)
                    msg.usage.completion_tokens = n
                yield msg
                await asyncio.sleep(0.001)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise
        finally:
            self.active.discard(request.request_id)

    async def Abort(self, request: frontend_pb2.AbortRequest, context: Any) -> frontend_pb2.AbortResponse:
        if request.request_id not in self.active:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {request.request_id} not found")
        self.aborted.append(request.request_id)
        return frontend_pb2.AbortResponse()


async def serve_replica(replica: Replica, *, dispatch_delay: float = 0.0) -> tuple[RunningServer, FakeAdmin]:
    admin = FakeAdmin(replica)
    running = await start_server(
        [
            (admin_pb2_grpc.add_AdminServiceServicer_to_server, admin, "llumnix.v1.AdminService"),
            (
                scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
                FakeScheduler(replica, delay=dispatch_delay),
                "llumnix.v1.SchedulerService",
            ),
        ]
    )
    replica.address = running.address
    return running, admin


async def serve_frontend(frontend: FakeFrontend) -> RunningServer:
    return await start_server(
        [(frontend_pb2_grpc.add_FrontendServiceServicer_to_server, frontend, "llumnix.v1.FrontendService")]
    )


def dead_address() -> str:
    """A local port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class Blackhole:
    """A socket that accepts TCP connections into its backlog but never speaks HTTP/2 (a hung peer)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


async def stop_all(servers: Sequence[RunningServer]) -> None:
    for s in servers:
        await s.stop(None)
