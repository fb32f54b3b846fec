"""A scheduler replica's leader work ends with its term: step-down cancels what the term started, and no order
(migrate-out, instance state, provider start/stop, failed-request report) leaves a replica that no longer leads.

The replica runs its real ``_lead`` against a fake election (no etcd); llumlets are fake stubs, frontends real gRPC
servers. Every wait is on an event with a deadline, never a bare sleep that a slow machine could outrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.frontend.sink import LOST_SCOPE_INSTANCE, LOST_SCOPE_LISTED, lost_scope
from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.control_plane.policy.scaling import ScalingDecision
from pyllumnix.control_plane.scheduler.replica import (
    LOST_NOTICE_TIMEOUT_S,
    MAX_REPORTED_FRONTENDS,
    MAX_SINKS_PER_FRONTEND,
    ReplicaTiming,
    SchedulerReplica,
    Vanished,
)
from pyllumnix.infra.etcd.client import KeyValue
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.watch import EventType, WatchEvent
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc

DEADLINE_S = 10.0


class FakeLeadership:
    """The part of ``infra.etcd.election.Leadership`` a replica uses; ``step_down`` is a lost lease."""

    def __init__(self, revision: int = 7) -> None:
        self.revision = revision
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None

    @property
    def is_leader(self) -> bool:
        return not self.lost.is_set()

    def step_down(self, reason: str = "lease lost") -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    async def resign(self) -> None:
        self.step_down("resigned")


class FakeElection:
    """Wins the first campaign at once; a second one (after step-down) would wait forever."""

    def __init__(self) -> None:
        self.leadership = FakeLeadership()

    async def campaign(self, value: bytes) -> FakeLeadership:
        return self.leadership


class FakeLlumlet:
    """Records orders; MigrateOut waits (like ``wait=True``) until released or cancelled."""

    def __init__(self, instance_id: str, log: list[str]) -> None:
        self.instance_id = instance_id
        self.log = log
        self.release = asyncio.Event()
        self.on_state: Callable[[], None] | None = None

    async def MigrateOut(self, request: Any, *, timeout: float, metadata: Any) -> llumlet_pb2.MigrateOutResponse:
        self.log.append(f"migrate-out {self.instance_id}")
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.log.append(f"cancelled {self.instance_id}")
            raise
        return llumlet_pb2.MigrateOutResponse()

    async def SetInstanceState(
        self, request: Any, *, timeout: float, metadata: Any
    ) -> llumlet_pb2.SetInstanceStateResponse:
        self.log.append(f"state {self.instance_id} {request.state}")
        if self.on_state is not None:
            self.on_state()
        return llumlet_pb2.SetInstanceStateResponse()


class FakeProvider:
    """Starts nothing real; a stopped instance leaves the registry, as a real one would."""

    max_instances = 16

    def __init__(self, replica: SchedulerReplica, log: list[str]) -> None:
        self.replica = replica
        self.log = log
        self.stopped = asyncio.Event()
        self.started = 0
        # Started, not registered yet (as a real provider's ``starting()``).
        self.pending: set[str] = set()

    async def start_instances(self, count: int) -> list[str]:
        self.log.append(f"start {count}")
        ids = [f"n{self.started + k + 1}" for k in range(count)]
        self.started += count
        self.pending.update(ids)
        return ids

    async def stop_instance(self, instance_id: str) -> bool:
        self.log.append(f"stop {instance_id}")
        self.replica.cluster.remove(instance_id)
        self.stopped.set()
        return True

    def starting(self) -> set[str]:
        return set(self.pending)

    def registered(self, instance_id: str) -> None:
        self.pending.discard(instance_id)


def make_replica(ids: tuple[str, ...], log: list[str], **timing: float) -> tuple[SchedulerReplica, FakeElection]:
    replica = SchedulerReplica(
        cast(Any, object()),
        KeyLayout("c1"),
        "s0",
        "127.0.0.1:1",
        timing=ReplicaTiming(**timing),  # type: ignore[arg-type]
    )
    election = FakeElection()
    replica.election = cast(Any, election)
    replica.core.reconfigure(
        dataclasses.replace(PolicyConfig(), pairing_interval_ms=10, scaling_interval_ms=100, scaling_warmup_ms=0)
    )
    stubs = {iid: FakeLlumlet(iid, log) for iid in ids}
    for iid in ids:
        replica.cluster.upsert(common_pb2.InstanceInfo(instance_id=iid, grpc_address=f"127.0.0.1:{1000 + len(iid)}"))
    replica._llumlet = lambda instance_id: cast(Any, stubs[instance_id])  # type: ignore[method-assign]
    return replica, election


def leading_with_provider(ids: tuple[str, ...], log: list[str]) -> SchedulerReplica:
    """A leading replica with a fake instance provider (scaling tests); ``log`` records its orders and starts."""
    replica, election = make_replica(ids, log)
    replica.leadership = cast(Any, election.leadership)
    replica.provider = cast(Any, FakeProvider(replica, log))
    return replica


async def wait_until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not check():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def leading(replica: SchedulerReplica, election: FakeElection) -> AsyncIterator[None]:
    """The replica runs its real ``_lead`` (won at once) for the block; the term ends with a lost lease after it."""
    lead = asyncio.ensure_future(replica._lead())
    try:
        await wait_until(lambda: replica.leadership is not None)
        yield
    finally:
        election.leadership.step_down()
        await asyncio.wait_for(lead, DEADLINE_S)


async def test_step_down_cancels_the_orders_of_a_pairing_round_still_in_flight() -> None:
    log: list[str] = []
    replica, election = make_replica(("a", "b", "c"), log)
    orders = [MigrateOrder("a", "c", Selection.SR), MigrateOrder("b", "c", Selection.SR)]
    replica.core.pair = lambda snapshot, avoid=(): orders  # type: ignore[method-assign]
    lead = asyncio.create_task(replica._lead())
    await wait_until(lambda: len(log) >= 2)  # both orders sent, both waiting for their migration's end
    assert sorted(log) == ["migrate-out a", "migrate-out b"]
    election.leadership.step_down()
    async with asyncio.timeout(DEADLINE_S):
        await lead
    # Nothing of the old term waits on: both orders were cancelled, and no source counts as busy any more.
    assert sorted(log) == ["cancelled a", "cancelled b", "migrate-out a", "migrate-out b"]
    assert replica._order_in_flight == {} and not replica.is_leader
    await asyncio.sleep(0.05)  # several pairing periods: no further order
    assert len(log) == 4


async def test_a_pairing_round_during_which_leadership_is_lost_sends_nothing() -> None:
    log: list[str] = []
    replica, election = make_replica(("a", "c"), log)

    def pair_then_lose(snapshot: Any, avoid: Any = ()) -> list[MigrateOrder]:
        election.leadership.step_down()  # the lease is lost while the round decides
        return [MigrateOrder("a", "c", Selection.SR)]

    replica.core.pair = pair_then_lose  # type: ignore[method-assign]
    async with asyncio.timeout(DEADLINE_S):
        await replica._lead()
    await asyncio.sleep(0.05)
    assert log == [] and replica.migrations_ordered == 0


async def test_a_scaling_pass_stops_ordering_once_its_term_ended_mid_pass() -> None:
    log: list[str] = []
    replica, election = make_replica(("a", "b"), log)
    replica.provider = cast(Any, FakeProvider(replica, log))
    replica.core.reconfigure(dataclasses.replace(replica.core.config, enable_scaling=True))
    replica.core.scale = lambda snapshot, starting_count=0, cancellable=None: ScalingDecision(  # type: ignore[method-assign]
        start=2, drain=("a",)
    )
    # The drain order for a is answered, but the term ended while it was in flight.
    stub_a = cast(FakeLlumlet, replica._llumlet("a"))
    stub_a.on_state = election.leadership.step_down
    async with asyncio.timeout(DEADLINE_S):
        await replica._lead()
    assert log == [f"state a {common_pb2.INSTANCE_STATE_DRAINING}"]  # no instance started by the old term


async def test_a_drained_instance_is_stopped_once_while_leading() -> None:
    """The control for the next test: while the replica leads, the delayed stop does happen (once)."""
    log: list[str] = []
    replica, election = make_replica(("d",), log, drained_stop_after=0.2)
    provider = FakeProvider(replica, log)
    replica.provider = cast(Any, provider)
    replica.core.pair = lambda snapshot, avoid=(): []  # type: ignore[method-assign]
    replica.report(common_pb2.InstanceLoad(instance_id="d", seq=1, state=common_pb2.INSTANCE_STATE_DRAINING))
    lead = asyncio.create_task(replica._lead())
    try:
        async with asyncio.timeout(DEADLINE_S):
            await provider.stopped.wait()
        await asyncio.sleep(0.1)  # the other pairing rounds that saw d drained must not stop it again
        assert log == ["stop d"]
    finally:
        election.leadership.step_down()
        async with asyncio.timeout(DEADLINE_S):
            await lead


async def test_a_drained_instance_is_not_stopped_by_a_replica_that_stepped_down() -> None:
    log: list[str] = []
    replica, election = make_replica(("d",), log, drained_stop_after=0.2)
    replica.provider = cast(Any, FakeProvider(replica, log))
    rounds: list[int] = []

    def count_round(snapshot: Any, avoid: Any = ()) -> list[MigrateOrder]:
        rounds.append(1)
        return []

    replica.core.pair = count_round  # type: ignore[method-assign]
    replica.report(common_pb2.InstanceLoad(instance_id="d", seq=1, state=common_pb2.INSTANCE_STATE_DRAINING))
    lead = asyncio.create_task(replica._lead())
    await wait_until(lambda: "d" in replica._stop_tasks)  # the stop of d is pending
    election.leadership.step_down()
    async with asyncio.timeout(DEADLINE_S):
        await lead
    await asyncio.sleep(0.4)  # twice drained_stop_after
    assert log == []


def register(replica: SchedulerReplica, instance_id: str) -> None:
    """The registry watch's path for a new entry (the provider hears of it too); no load report yet."""
    replica._instance_registered(common_pb2.InstanceInfo(instance_id=instance_id, grpc_address="127.0.0.1:1"))


def active_load(instance_id: str, seq: int = 1) -> common_pb2.InstanceLoad:
    return common_pb2.InstanceLoad(
        instance_id=instance_id, seq=seq, state=common_pb2.INSTANCE_STATE_ACTIVE, total_blocks=100, free_blocks=100
    )


async def test_manual_scale_counts_an_instance_between_its_registration_and_its_first_load_report() -> None:
    """The host-loss test's over-start: with the target at 2, an instance that had registered but not reported yet
    counted neither as starting (the provider forgets it at registration) nor as active (no load), so each pass in that
    window started another one."""
    log: list[str] = []
    replica, election = make_replica((), log)
    replica.leadership = cast(Any, election.leadership)
    provider = FakeProvider(replica, log)
    replica.provider = cast(Any, provider)
    replica.scale_target = 2
    await replica._converge_to_target()
    assert log == ["start 2"] and provider.pending == {"n1", "n2"}
    register(replica, "n1")  # registered, starting no more, no report yet
    await replica._converge_to_target()
    assert log == ["start 2"]  # the old count: 0 active + 1 starting < 2, "start 1"
    register(replica, "n2")
    await replica._converge_to_target()
    assert log == ["start 2"]  # the old count: 0 + 0, "start 2" again
    assert replica.report(active_load("n1")) and replica.report(active_load("n2"))
    await replica._converge_to_target()
    assert log == ["start 2"] and provider.started == 2


async def test_manual_scale_drains_an_instance_once_until_it_confirms() -> None:
    """Three registered (c not reporting yet), target 2: one drain, and only one. An ordered drain counts at once: a
    pass before the llumlet confirms it (here its next report still says ACTIVE) orders no second drain."""
    log: list[str] = []
    replica, election = make_replica(("a", "b", "c"), log)
    replica.leadership = cast(Any, election.leadership)
    replica.provider = cast(Any, FakeProvider(replica, log))
    for iid in ("a", "b"):
        assert replica.report(active_load(iid))
    replica.scale_target = 2
    await replica._converge_to_target()
    assert len(log) == 1 and log[0].endswith(f" {common_pb2.INSTANCE_STATE_DRAINING}")  # the old count: c not active
    assert replica.report(active_load("c"))
    for iid in ("a", "b", "c"):  # reports sent before the llumlet took the order: still ACTIVE
        assert replica.report(active_load(iid, seq=2))
    await replica._converge_to_target()
    assert len(log) == 1  # the old count took the report's ACTIVE over the order and drained again


def refuse_orders(replica: SchedulerReplica, instance_id: str, log: list[str]) -> None:
    """That llumlet refuses state orders as one that cannot prove the leader's term in its etcd now does."""

    async def refuse(request: Any, *, timeout: float, metadata: Any) -> llumlet_pb2.SetInstanceStateResponse:
        log.append(f"refused {instance_id}")
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="leader term cannot be checked",
        )

    cast(Any, replica._llumlet(instance_id)).SetInstanceState = refuse


async def test_one_refused_drain_does_not_end_the_scaling_pass() -> None:
    """review9 F5: the automatic pass drains a and b and starts one; a refuses its order. b is still drained and the
    instance started, and the loop runs on (before: the refusal ended the pass and restarted the loop, and its
    warm-up)."""
    log: list[str] = []
    replica = leading_with_provider(("a", "b"), log)
    replica.core.reconfigure(dataclasses.replace(replica.core.config, enable_scaling=True))
    replica.core.scale = lambda snapshot, starting_count=0, cancellable=None: ScalingDecision(start=1, drain=("a", "b"))  # type: ignore[method-assign]
    refuse_orders(replica, "a", log)
    loop = asyncio.create_task(replica._scaling_loop())
    try:
        await wait_until(lambda: log.count("start 1") >= 2)  # a second pass of the same loop
        assert not loop.done()
        assert log[:3] == ["refused a", f"state b {common_pb2.INSTANCE_STATE_DRAINING}", "start 1"]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_one_refused_drain_does_not_end_a_manual_scale_pass() -> None:
    """review9 F5 (manual target): target 1 of three: the first drain is refused, the second is still ordered."""
    log: list[str] = []
    replica, election = make_replica(("a", "b", "c"), log)
    replica.leadership = cast(Any, election.leadership)
    replica.provider = cast(Any, FakeProvider(replica, log))
    for iid in ("a", "b", "c"):
        assert replica.report(active_load(iid))
    replica.scale_target = 1
    for iid in ("a", "b", "c"):
        refuse_orders(replica, iid, log)
    await replica._converge_to_target()
    assert len(log) == 2 and all(entry.startswith("refused ") for entry in log), "both drains were ordered"


async def test_automatic_scaling_counts_an_instance_between_its_registration_and_its_first_load_report() -> None:
    """The automatic scaler's snapshot holds only instances that reported: one registered a moment ago must count as
    starting, or ``min_instances`` (here 2, with a and b registered) starts a third."""
    log: list[str] = []
    replica, election = make_replica(("a", "b"), log)
    replica.provider = cast(Any, FakeProvider(replica, log))
    replica.core.reconfigure(dataclasses.replace(replica.core.config, enable_scaling=True, min_instances=2))
    replica.core.pair = lambda snapshot, avoid=(): []  # type: ignore[method-assign]
    assert replica.report(active_load("a"))  # b has registered but not reported
    counts: list[int] = []
    decide = replica.core.scale

    def counted(snapshot: Any, starting_count: int = 0, cancellable: Any = None) -> ScalingDecision:
        counts.append(starting_count)
        return decide(snapshot, starting_count, cancellable)

    replica.core.scale = counted  # type: ignore[method-assign]
    lead = asyncio.create_task(replica._lead())
    try:
        await wait_until(lambda: len(counts) >= 2)
    finally:
        election.leadership.step_down()
        async with asyncio.timeout(DEADLINE_S):
            await lead
    assert counts[:2] == [1, 1]  # b, once (the old count: 0)
    assert not any(entry.startswith("start") for entry in log)  # the old decision: "start 1"


class Sink(frontend_pb2_grpc.OutputSinkServiceServicer):
    def __init__(self, got: list[str], on_push: Callable[[], None] | None = None) -> None:
        self.got = got
        self.on_push = on_push

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: Any
    ) -> frontend_pb2.PushOutputsResponse:
        self.got.extend(o.request_id for o in request.outputs)
        if self.on_push is not None:
            self.on_push()
        return frontend_pb2.PushOutputsResponse()


async def serve_sink(sink: Sink) -> RunningServer:
    return await start_server(
        [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, sink, "llumnix.v1.OutputSinkService")]
    )


async def test_lost_requests_are_not_reported_after_a_step_down() -> None:
    replica, election = make_replica((), [])
    replica.leadership = cast(Any, election.leadership)
    got_a: list[str] = []
    got_b: list[str] = []
    server_a = await serve_sink(Sink(got_a, on_push=election.leadership.step_down))  # type: ignore[abstract]
    server_b = await serve_sink(Sink(got_b))  # type: ignore[abstract]
    try:
        load = common_pb2.InstanceLoad(
            instance_id="i-1",
            requests=[
                common_pb2.RequestLoad(request_id="r-a", frontend_address=server_a.address),
                common_pb2.RequestLoad(request_id="r-b", frontend_address=server_b.address),
            ],
        )
        await replica._fail_requests("i-1", load, "its process is gone")
        # Both pushes start at once while leading (one stalled frontend must not hold up the others).
        assert (got_a, got_b) == (["r-a"], ["r-b"])
        # The term ended during the first push: from then on nothing is sent; the next leader reports.
        await replica._fail_requests("i-1", load, "its process is gone")
        assert (got_a, got_b) == (["r-a"], ["r-b"])
    finally:
        await server_a.stop(None)
        await server_b.stop(None)


class NoticeSink(frontend_pb2_grpc.OutputSinkServiceServicer):
    """Records each lost-instance notice as (instance, listed request ids)."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, list[str]]] = []
        self.scopes: list[str | None] = []  # each notice's scope metadata (what the frontend's sink reads)
        self.got = asyncio.Event()

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: Any
    ) -> frontend_pb2.PushOutputsResponse:
        self.notices.append((request.instance_id, [o.request_id for o in request.outputs]))
        self.scopes.append(lost_scope(context.invocation_metadata()))
        self.got.set()
        return frontend_pb2.PushOutputsResponse()


def closed_port_address() -> str:
    """An address nothing listens on (a port the OS just gave out, closed again): a probe there is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def serving_load(instance_id: str, frontend_address: str, *rids: str) -> common_pb2.InstanceLoad:
    load = active_load(instance_id)
    load.requests.extend(common_pb2.RequestLoad(request_id=r, frontend_address=frontend_address) for r in rids)
    return load


FAST_PROBES = {"instance_probe_interval": 0.05, "instance_probe_timeout": 0.5}


def frontend_kv(layout: KeyLayout, frontend_id: str, address: str) -> KeyValue:
    return KeyValue(layout.frontend_key(frontend_id, address).encode(), address.encode(), 1, 1, 1, 7)


def test_lost_instance_notices_go_to_at_most_four_sinks_per_registered_frontend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A frontend may write any number of keys under its own ``frontends/<id>/`` (RBAC); uncapped, one compromised
    frontend could make every lost-instance notice go to thousands of addresses (session 10's leftover)."""
    replica, _ = make_replica((), [])
    flood = tuple(frontend_kv(replica.layout, "f-bad", f"10.0.0.{i}:1") for i in range(50))
    honest = frontend_kv(replica.layout, "f-ok", "127.0.0.1:5")
    replica.frontend_event(WatchEvent(EventType.RESYNC, 5, snapshot=(*flood, honest)))
    sinks = replica.registered_sinks()
    assert "127.0.0.1:5" in sinks
    assert len([a for a in sinks if a.startswith("10.0.0.")]) == MAX_SINKS_PER_FRONTEND == 4
    assert any("frontend f-bad registered more than 4 sink addresses" in r.getMessage() for r in caplog.records)


async def test_a_registered_frontend_no_report_named_is_told_about_a_lost_instance() -> None:
    """A frontend registered in etcd (``frontends/<id>/<sink>``) is told about every lost instance although no load
    report of this leader's term named it (a new leader; a request placed just before the instance died), and one
    whose key left the registry is not. Before, only frontends seen in load reports were told: the others' requests
    waited for their idle timeout."""
    replica, election = make_replica((), [])
    replica.leadership = cast(Any, election.leadership)
    sink, gone = NoticeSink(), NoticeSink()  # type: ignore[abstract]
    server, server_gone = await serve_sink(cast(Any, sink)), await serve_sink(cast(Any, gone))
    try:
        kv, kv_gone = frontend_kv(replica.layout, "f0", server.address), frontend_kv(replica.layout, "f1", "x:1")
        replica.frontend_event(WatchEvent(EventType.RESYNC, 5, snapshot=(kv_gone,)))
        replica.frontend_event(WatchEvent(EventType.PUT, 6, kv=kv))
        replica.frontend_event(WatchEvent(EventType.PUT, 7, kv=frontend_kv(replica.layout, "f1", server_gone.address)))
        replica.frontend_event(WatchEvent(EventType.DELETE, 8, kv=dataclasses.replace(kv_gone, value=b"")))
        assert sorted(replica.registered_frontends.values()) == sorted([server.address, server_gone.address])
        replica.frontend_event(
            WatchEvent(EventType.DELETE, 9, kv=frontend_kv(replica.layout, "f1", server_gone.address))
        )
        await replica._fail_requests("i-1", common_pb2.InstanceLoad(instance_id="i-1"), "its process is gone")
        assert sink.notices == [("i-1", [])] and sink.scopes == [LOST_SCOPE_INSTANCE]
        assert gone.notices == [], "a frontend that left the registry is not told"
    finally:
        await server.stop(None)
        await server_gone.stop(None)


class StallingSink(NoticeSink):
    """A frontend that holds each notice until ``release`` is set (a stalled process, or a black-holed address)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: Any
    ) -> frontend_pb2.PushOutputsResponse:
        await self.release.wait()
        return await super().PushOutputs(request, context)


async def test_a_stalled_frontend_does_not_hold_up_the_others_lost_instance_notices() -> None:
    """REVIEW10 L7: notices went out one frontend after the other, each waiting up to its 5 s deadline, so one stalled
    frontend (or any number of black-holed addresses a frontend registered) delayed every later one. Now every
    frontend is told at once: the live one gets its notice while the stalled one still holds its own (before: only
    after the stalled push ended, at its 5 s deadline)."""
    replica, election = make_replica((), [])
    replica.leadership = cast(Any, election.leadership)
    stalled, live = StallingSink(), NoticeSink()  # type: ignore[abstract]
    server_stalled, server_live = await serve_sink(cast(Any, stalled)), await serve_sink(cast(Any, live))
    try:
        replica.frontend_event(
            WatchEvent(EventType.PUT, 5, kv=frontend_kv(replica.layout, "f0", server_stalled.address))
        )
        replica.frontend_event(WatchEvent(EventType.PUT, 6, kv=frontend_kv(replica.layout, "f1", server_live.address)))
        telling = asyncio.create_task(
            replica._fail_requests("i-1", common_pb2.InstanceLoad(instance_id="i-1"), "its process is gone")
        )
        async with asyncio.timeout(LOST_NOTICE_TIMEOUT_S - 1):
            await live.got.wait()
        assert live.notices == [("i-1", [])] and not stalled.notices and not telling.done()
        stalled.release.set()
        async with asyncio.timeout(DEADLINE_S):
            await telling
        assert stalled.notices == [("i-1", [])]
    finally:
        stalled.release.set()
        await server_stalled.stop(None)
        await server_live.stop(None)


async def test_an_instance_lost_with_no_load_on_record_is_still_reported_to_every_known_frontend() -> None:
    """attack9 B1: the leader's last load of the lost instance listed no request (it was idle when a migration
    landed there) or there is none: it still probes it and tells every frontend it knows, so they end what it held
    (before: ``_instance_vanished`` returned at once and the frontends' requests waited for their idle timeout)."""
    replica, election = make_replica(("i-2",), [], **FAST_PROBES)
    replica.leadership = cast(Any, election.leadership)
    sink = NoticeSink()  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    try:
        replica.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address=closed_port_address()))
        assert replica.report(serving_load("i-2", server.address, "r-on-2"))  # the frontend, known from i-2
        assert replica.report(active_load("i-1"))  # i-1 idle as far as the leader knows
        replica._instance_vanished("i-1")
        async with asyncio.timeout(DEADLINE_S):
            await sink.got.wait()
        assert sink.notices == [("i-1", [])], "a notice for the instance, listing nothing"
        assert "i-1" not in replica.vanished
    finally:
        await replica._stop_leader_tasks()
        await server.stop(None)


async def test_a_replica_elected_after_an_instance_vanished_watches_and_reports_it() -> None:
    """attack9 B1b: the instance left the registry while this replica followed (it died with the leader, whose
    report never came); on winning the election the replica probes it and reports it lost to the frontends it knows
    (before: a follower forgot it, and a new leader never declared it lost)."""
    replica, election = make_replica(("i-2",), [], **FAST_PROBES)
    replica.cluster.quiet_stale_after = 0.5  # every live instance reports within this: the new leader waits for it
    sink = NoticeSink()  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    replica.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address=closed_port_address()))
    replica._instance_vanished("i-1")  # a follower: no grace watch of its own
    assert not replica.vanished
    lead = asyncio.create_task(replica._lead())
    try:
        await wait_until(lambda: replica.is_leader)
        await wait_until(lambda: "i-1" not in replica.vanished)  # the probe found it gone
        # The first report of the new term, naming the frontend, comes only after that: the leader waits for it.
        assert replica.report(serving_load("i-2", server.address, "r-on-2"))
        async with asyncio.timeout(DEADLINE_S):
            await sink.got.wait()
        assert sink.notices == [("i-1", [])]
    finally:
        election.leadership.step_down()
        async with asyncio.timeout(DEADLINE_S):
            await lead
        await server.stop(None)


async def test_an_instance_that_re_registers_after_a_blip_is_not_reported() -> None:
    """The rule for "lost" is unchanged for an instance with no load on record: a live one that re-registers within
    the grace keeps its requests, and no frontend hears anything."""
    replica, election = make_replica(("i-2",), [], instance_grace=0.3, **FAST_PROBES)
    replica.leadership = cast(Any, election.leadership)
    sink = NoticeSink()  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    try:
        info = common_pb2.InstanceInfo(instance_id="i-1", grpc_address=server.address)  # a port that answers
        replica.cluster.upsert(info)
        assert replica.report(serving_load("i-2", server.address, "r-on-2"))
        replica._instance_vanished("i-1")
        assert "i-1" in replica.vanished
        replica._instance_registered(info)
        assert "i-1" not in replica.vanished and "i-1" in replica.cluster.infos
        await asyncio.sleep(0.6)  # two graces: a watch left running would have reported it by now
        assert sink.notices == []
    finally:
        await replica._stop_leader_tasks()
        await server.stop(None)


async def test_a_notice_for_an_id_a_new_process_took_over_is_marked_listed_only() -> None:
    """review9 F1: another process re-registered under the vanished id; the notice about the old one tells only the
    listed requests' frontends and says so (scope "listed"), so the sink does not end the requests the new process
    holds under the same id (before: no scope, and the sink ended every request held by the id)."""
    replica, election = make_replica(("i-2",), [], instance_grace=5.0, **FAST_PROBES)
    replica.leadership = cast(Any, election.leadership)
    sink = NoticeSink()  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    try:
        old = common_pb2.InstanceInfo(instance_id="i-1", grpc_address=server.address, started_at=1)
        replica.cluster.upsert(old)
        assert replica.report(serving_load("i-1", server.address, "r-old"))
        replica._instance_vanished("i-1")
        assert "i-1" in replica.vanished
        replica._instance_registered(
            common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:2", started_at=2)
        )
        async with asyncio.timeout(DEADLINE_S):
            await sink.got.wait()
        assert sink.notices == [("i-1", ["r-old"])]
        assert sink.scopes == [LOST_SCOPE_LISTED]
    finally:
        await replica._stop_leader_tasks()
        await server.stop(None)


async def test_an_id_re_registered_during_a_new_leaders_wait_gets_a_listed_only_notice() -> None:
    """review9 F1 (leader side): a new leader waits ``learning`` before telling every frontend; a process that
    re-registers under the id meanwhile holds its new requests by that id, so the notice shrinks to the listed
    frontends and is marked listed-only (before: every frontend, scope "instance": the new process's requests ended).
    A notice with no re-registration keeps the instance-wide scope."""
    replica, election = make_replica(("i-2",), [])
    replica.leadership = cast(Any, election.leadership)
    replica.cluster.quiet_stale_after = 0.5
    sink = NoticeSink()  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    try:
        assert replica.report(serving_load("i-2", server.address, "r-on-2"))
        load = serving_load("i-1", server.address, "r-old")
        replica._term_began = time.monotonic()
        failing = asyncio.create_task(replica._fail_requests("i-1", load, "its process is gone"))
        await asyncio.sleep(0)  # it is in its learning wait now
        replica._instance_registered(common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:2"))
        async with asyncio.timeout(DEADLINE_S):
            await failing
        assert sink.notices == [("i-1", ["r-old"])] and sink.scopes == [LOST_SCOPE_LISTED]
        replica.cluster.remove("i-1")
        await replica._fail_requests("i-3", common_pb2.InstanceLoad(instance_id="i-3"), "its process is gone")
        assert sink.notices[1:] == [("i-3", [])] and sink.scopes[1:] == [LOST_SCOPE_INSTANCE]
    finally:
        await replica._stop_leader_tasks()
        await server.stop(None)


class SlowLeaderReadSink(NoticeSink):
    """Refuses its first notices as a frontend whose etcd read of the leader failed does (UNAVAILABLE)."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.attempts = 0
        self.on_refusal: Callable[[], None] | None = None

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: Any
    ) -> frontend_pb2.PushOutputsResponse:
        self.attempts += 1
        if self.attempts <= self.refusals:
            if self.on_refusal is not None:
                self.on_refusal()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cannot tell the scheduler leader now: etcd slow")
        return await super().PushOutputs(request, context)


async def test_a_notice_the_frontend_could_not_take_is_resent() -> None:
    """review9 F3: the frontend's sink reads the leader from etcd before taking a notice; when that read fails it
    answers UNAVAILABLE, and the leader resends the notice (before: logged once and dropped, so the lost instance's
    requests waited for the frontend's idle timeout). A replica that stepped down stops resending."""
    replica, election = make_replica(("i-2",), [])
    replica.leadership = cast(Any, election.leadership)
    sink = SlowLeaderReadSink(refusals=2)  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    try:
        await replica._fail_requests("i-1", serving_load("i-1", server.address, "r-1"), "its process is gone")
        assert sink.notices == [("i-1", ["r-1"])] and sink.attempts == 3
        assert replica.requests_failed == 1
        sink.refusals, sink.attempts = 10, 0
        sink.on_refusal = election.leadership.step_down
        await replica._fail_requests("i-3", serving_load("i-3", server.address, "r-3"), "its process is gone")
        assert sink.notices == [("i-1", ["r-1"])] and sink.attempts == 1, "no longer the leader: not resent"
    finally:
        await server.stop(None)


async def test_a_drained_empty_instance_leaving_is_no_lost_instance() -> None:
    """A draining instance stops itself once empty (refusing new requests and migrations meanwhile): its leaving is a
    scale-down, not a loss, and is not watched; one whose last load still listed a request is."""
    replica, election = make_replica(("i-2",), [], **FAST_PROBES)
    replica.leadership = cast(Any, election.leadership)
    try:
        for iid, rids in (("i-1", ()), ("i-3", ("r",))):
            replica.cluster.upsert(common_pb2.InstanceInfo(instance_id=iid, grpc_address=closed_port_address()))
            load = serving_load(iid, "127.0.0.1:9", *rids)
            load.state = common_pb2.INSTANCE_STATE_DRAINING
            assert replica.report(load)
            replica._instance_vanished(iid)
        assert set(replica.vanished) == {"i-3"}
    finally:
        await replica._stop_leader_tasks()


class OtherLlumlet(llumlet_pb2_grpc.LlumletServiceServicer):
    """Answers GetLoad as another instance: a new process that got the vanished instance's address."""

    async def GetLoad(self, request: llumlet_pb2.GetLoadRequest, context: Any) -> llumlet_pb2.GetLoadResponse:
        return llumlet_pb2.GetLoadResponse(load=active_load("someone-else"))


async def test_an_address_answered_by_another_instance_is_no_sign_of_life() -> None:
    """A vanished instance whose address another llumlet now answers is gone: its grace ends and it is reported
    (before: any answer counted as alive, and the grace was renewed for as long as the newcomer ran)."""
    replica, election = make_replica(("i-2",), [], instance_grace=0.3, **FAST_PROBES)
    replica.leadership = cast(Any, election.leadership)
    sink = NoticeSink()  # type: ignore[abstract]
    sink_server = await serve_sink(cast(Any, sink))
    newcomer = OtherLlumlet()  # type: ignore[abstract]
    other = await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, newcomer, "llumnix.v1.LlumletService")]
    )
    try:
        replica.cluster.upsert(common_pb2.InstanceInfo(instance_id="i-1", grpc_address=other.address))
        assert replica.report(serving_load("i-1", sink_server.address, "r-1"))
        replica._instance_vanished("i-1")
        async with asyncio.timeout(DEADLINE_S):
            await sink.got.wait()
        assert sink.notices == [("i-1", ["r-1"])]
    finally:
        await replica._stop_leader_tasks()
        await other.stop(None)
        await sink_server.stop(None)


async def test_a_new_leader_probes_a_recently_vanished_instance_more_than_once() -> None:
    """review9 F6: an instance that left the registry 15 s before this term (past its 10 s grace) and whose port
    accepts but does not answer (a stalled llumlet) is declared lost only after the probe rounds the old leader's
    rule needs to see a sign of life, not on the new leader's first timed-out probe (before: one probe)."""
    replica, _ = make_replica(("i-2",), [], **FAST_PROBES)
    replica.cluster.quiet_stale_after = 0.2
    sink = NoticeSink()  # type: ignore[abstract]
    server = await serve_sink(cast(Any, sink))
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(16)  # accepts, never answers
    info = common_pb2.InstanceInfo(instance_id="i-1", grpc_address=f"127.0.0.1:{slow.getsockname()[1]}")
    replica.cluster.upsert(info)
    replica._instance_vanished("i-1")  # as a follower
    replica._recently_vanished["i-1"] = (info, time.monotonic() - 15.0)
    probes = 0
    probe = replica._probe_instance

    async def counted(gone: Any) -> bool:
        nonlocal probes
        probes += 1
        return await probe(gone)

    replica._probe_instance = counted  # type: ignore[method-assign]
    lead = asyncio.create_task(replica._lead())
    try:
        await wait_until(lambda: replica.is_leader)
        assert replica.report(serving_load("i-2", server.address, "r-on-2"))
        await wait_until(lambda: "i-1" in replica.vanished)
        await wait_until(lambda: "i-1" not in replica.vanished)
        assert probes >= 2, f"declared lost after {probes} probe(s)"
    finally:
        lead.cancel()
        await asyncio.gather(lead, return_exceptions=True)
        await replica._stop_leader_tasks()
        await server.stop(None)
        slow.close()


async def test_a_state_ordered_in_an_earlier_term_does_not_outlive_it() -> None:
    """REVIEW17-2: this replica drains ``a`` and loses its term before a report confirms it; another leader undrains
    ``a``; this replica leads again and ``a`` reports ACTIVE. Before, the old term's DRAINING override still won over
    every report (it was dropped only by a report of the same state): no dispatch to ``a``, ever."""
    log: list[str] = []
    replica, election = make_replica(("a", "b"), log)
    replica.leadership = cast(Any, election.leadership)
    for iid in ("a", "b"):
        assert replica.report(active_load(iid))
    await replica.set_instance_state("a", InstanceState.DRAINING)
    assert replica.cluster.overrides == {"a": InstanceState.DRAINING}
    election.leadership.step_down()
    await replica._stop_leader_tasks()
    replica.leadership = cast(Any, FakeLeadership(revision=9))  # a later term of this replica
    for iid in ("a", "b"):
        assert replica.report(active_load(iid, seq=50))
    await asyncio.sleep(0.05)  # the reports are folded into the snapshot in batches
    snapshot = replica.cluster.snapshot(time.monotonic())
    assert {v.instance_id: v.state for v in snapshot} == {"a": InstanceState.ACTIVE, "b": InstanceState.ACTIVE}
    assert {replica.dispatch(f"r{i}", 0, 100, 10)[0] for i in range(4)} == {"a", "b"}


class _Store:
    """The scale-target store's ``put``, recorded."""

    def __init__(self) -> None:
        self.puts: list[int] = []

    async def put(self, message: Any) -> None:
        self.puts.append(message.target_instances)


async def test_scale_to_zero_clears_the_manual_target_and_the_autoscaler_decides_again() -> None:
    """REVIEW17-3: 0 was refused ("outside the range"), so after any manual scale the autoscaler stayed off (a set
    target skips it) until someone deleted the etcd key by hand. The watch already read 0 as "no target"."""
    log: list[str] = []
    replica = leading_with_provider(("a", "b"), log)
    store = _Store()
    replica.scale_store = cast(Any, store)
    for iid in ("a", "b"):
        assert replica.report(active_load(iid))
    assert await replica.scale_to(2) == (2, 2)
    targets = [replica.scale_target]
    assert await replica.scale_to(0) == (2, 0)
    targets.append(replica.scale_target)
    assert targets == [2, None] and store.puts == [2, 0]


async def test_manual_scale_counts_a_vanished_instance_as_coming_back() -> None:
    """REVIEW17-5: at target 2, ``b``'s key vanished in an etcd blip (it is alive and re-registers). The automatic
    scaler counted it as starting; the manual path did not, started a replacement, and drained one once ``b`` was
    back."""
    log: list[str] = []
    replica = leading_with_provider(("a", "b"), log)
    for iid in ("a", "b"):
        assert replica.report(active_load(iid))
    replica.scale_target = 2
    await replica._converge_to_target()
    info = replica.cluster.infos["b"]
    load = replica.cluster.remove("b")
    assert load is not None
    replica.vanished["b"] = Vanished(info, load, time.monotonic())  # what the registry watch's vanish does
    await replica._converge_to_target()
    assert log == [], "a replacement was started for an instance in its vanished grace period"


async def test_scaling_cancels_only_its_own_drains_not_an_operators() -> None:
    """REVIEW17-4: ``llmctl drain b`` (to take its host down) at min 2 was undone by the next scaling pass."""
    log: list[str] = []
    replica = leading_with_provider(("a", "b"), log)
    replica.core.reconfigure(dataclasses.replace(replica.core.config, enable_scaling=True, min_instances=2))
    for iid in ("a", "b"):
        assert replica.report(active_load(iid))
    await replica.set_instance_state("b", InstanceState.DRAINING)  # the operator's drain (admin path)
    await asyncio.sleep(0.05)
    scaling = asyncio.create_task(replica._scaling_loop())
    try:
        await wait_until(lambda: any(entry.startswith("start") for entry in log))
    finally:
        scaling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scaling
    assert "state b 1" not in log, log  # never set ACTIVE (undrained) by the scaler


def test_frontends_named_by_load_reports_are_bounded_least_recently_seen_first() -> None:
    """REVIEW18-5: a report's frontend addresses are what its llumlet says; a compromised one naming millions grew the
    leader's map without bound (and each would get a lost-instance notice)."""
    replica, _ = make_replica(("a",), [])
    many = common_pb2.InstanceLoad(
        instance_id="a",
        requests=[
            common_pb2.RequestLoad(request_id=f"r{i}", frontend_address=f"10.0.{i // 256}.{i % 256}:1")
            for i in range(MAX_REPORTED_FRONTENDS + 500)
        ],
    )
    replica._note_frontends(many, 1.0)
    assert len(replica._frontends) == MAX_REPORTED_FRONTENDS
    honest = common_pb2.InstanceLoad(
        instance_id="a", requests=[common_pb2.RequestLoad(request_id="x", frontend_address="fe:1")]
    )
    replica._note_frontends(honest, 2.0)
    assert "fe:1" in replica._frontends and len(replica._frontends) == MAX_REPORTED_FRONTENDS


async def test_a_new_scaling_interval_counts_from_the_change_not_from_the_old_sleeps_end() -> None:
    """Was: the scaling loop slept the interval it read before the sleep, so a cluster reconfigured from an hour to
    100 ms went on waiting out the hour (and then acted on the config it read before that sleep)."""
    log: list[str] = []
    replica, election = make_replica((), log)
    replica.core.reconfigure(dataclasses.replace(replica.core.config, scaling_interval_ms=3_600_000))
    provider = FakeProvider(replica, log)
    replica.provider = cast(Any, provider)
    replica.scale_target = 1
    async with leading(replica, election):
        await asyncio.sleep(0.1)
        assert log == [], "an hour's interval: no pass yet"
        replica._reconfigure(dataclasses.replace(replica.core.config, scaling_interval_ms=100))
        await wait_until(lambda: log == ["start 1"])


async def test_frequent_config_writes_do_not_starve_the_scaling_pass() -> None:
    """Review of the wake-up above: every write restarted the interval, so a key rewritten more often than the interval
    (a tuning script) kept the scaling pass, and `llmctl scale`'s convergence, from ever running. Only a new interval
    moves the next pass now."""
    log: list[str] = []
    replica, election = make_replica((), log)
    provider = FakeProvider(replica, log)
    replica.provider = cast(Any, provider)
    replica.scale_target = 1
    async with leading(replica, election):
        config = replica.core.config  # scaling_interval_ms=100 (make_replica)
        async with asyncio.timeout(DEADLINE_S):
            threshold = config.migrate_out_threshold
            while log != ["start 1"]:  # an unrelated key, rewritten every 30 ms
                threshold = 3.0 if threshold != 3.0 else 4.0
                replica._reconfigure(dataclasses.replace(config, migrate_out_threshold=threshold))
                await asyncio.sleep(0.03)


async def test_a_term_ending_as_the_config_changes_still_stops_the_scaling_loop() -> None:
    """CI hang (step-down waited 120 s for the scaling loop): Python 3.11's ``asyncio.wait_for`` returns the inner
    result when the outer task's cancellation lands in the same loop turn as the event it waits on, so the loop ran
    on after its term was cancelled. The loops wait with ``asyncio.timeout`` now."""
    replica, election = make_replica((), [])
    replica.provider = cast(Any, FakeProvider(replica, []))
    async with leading(replica, election):
        await wait_until(lambda: len(replica._leader_tasks) == 2)
        await asyncio.sleep(0.05)  # the scaling loop waits on the config event now
        scaling = replica._leader_tasks[1]
        replica._config_changed.set()
        scaling.cancel()
        done, _ = await asyncio.wait({scaling}, timeout=2.0)
        assert done, "the cancelled scaling loop ran on"


async def test_a_leaders_probe_loop_wakes_once_a_second_and_a_followers_at_its_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Old behaviour: a leader's probe loop (which has no one to probe) slept the followers' 0.25 s, 4 wake-ups a
    second on an idle leader; after a step-down the follower's interval is back."""
    log: list[str] = []
    replica, election = make_replica(("i-1",), log)
    replica.leadership = cast(Any, election.leadership)
    real_sleep = asyncio.sleep
    delays: list[float] = []
    probe: asyncio.Task[None] | None = None

    async def spy(delay: float, *args: Any, **kwargs: Any) -> Any:
        if asyncio.current_task() is probe:
            delays.append(delay)
            delay = 0.001
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", spy)
    probe = asyncio.ensure_future(replica._probe_leader())
    try:
        await wait_until(lambda: len(delays) >= 3)
        assert min(delays) >= 1.0, delays
        election.leadership.step_down()
        seen = len(delays)
        await wait_until(lambda: len(delays) >= seen + 3)
        assert delays[-1] == replica.timing.leader_probe_interval
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
