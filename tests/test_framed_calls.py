"""#20 lean dispatch path: ``infra.framed_calls``, unary calls answered by id on one framed connection, and the
frontend's Dispatch to the scheduler leader and AddRequest to a llumlet over it.

Checked here: concurrent calls are each answered with their own response, in whatever order the server finishes;
the server's refusals and failures reach the caller as its gRPC status while the connection lives on; a broken
connection fails every call in flight (never a hang) and the channel stays closed; a hostile or runaway client is
bounded (a malformed frame ends its connection, calls beyond the in-flight bound are refused). On the scheduler's
framed listener, Dispatch keeps the role table's rule (frontends only) beside the llumlets' load streams on the same
port; the frontend dispatches over it once a gRPC reply named it, and falls back to gRPC when it breaks. A framed
AddRequest whose connection breaks is an unknown outcome (DEADLINE_EXCEEDED, as a gRPC add without an answer); one
whose connection cannot be had goes over gRPC, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pyllumnix.clients.errors import ResourceExhaustedError
from pyllumnix.control_plane.frontend import channels
from pyllumnix.control_plane.frontend.routing import DISPATCH_METHOD, LeaderDispatcher
from pyllumnix.control_plane.scheduler import service as scheduler_service
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica, SchedulingError
from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.data_plane.llumlet import service as llumlet_service
from pyllumnix.infra.framed import CALL, FramedContext, frame, listen
from pyllumnix.infra.framed_calls import (
    FIRST_FRAME_MAX_BYTES,
    CallRoute,
    CallServer,
    Method,
    UnaryChannel,
    call_frame,
    listen_calls,
)
from pyllumnix.infra.security.bootstrap import ClusterSecurity
from pyllumnix.infra.security.ca import role_name
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc, scheduler_pb2
from tests.test_clients_fakes import dead_address
from tests.test_framed import _report
from tests.test_load_reporting import leader, load, served, wait_for
from tests.test_security_outputs import CLUSTER, pki

__all__ = ["pki", "served"]  # fixtures used here

REQ = scheduler_pb2.DispatchRequest
RESP = scheduler_pb2.DispatchResponse
ECHO = "/test.Echo/Call"


async def _echo(request: REQ, context: FramedContext) -> RESP:
    """Answers with the request id; ``sleep:<s>`` waits first, ``abort``, ``boom`` and ``late`` misbehave."""
    rid = request.request_id
    if rid.startswith("sleep:"):
        await asyncio.sleep(float(rid.split(":")[1]))
    elif rid == "abort":
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    elif rid == "boom":
        raise RuntimeError("a servicer bug")
    elif rid == "remaining":
        return RESP(instance_id=f"{context.time_remaining():.1f}")
    return RESP(instance_id=rid)


@contextlib.asynccontextmanager
async def echo_server(max_in_flight: int = 256) -> AsyncIterator[tuple[CallServer, str]]:
    calls = CallServer({ECHO: Method(REQ, _echo)}, lambda: None, max_in_flight=max_in_flight)
    server, port = await listen_calls(calls, "127.0.0.1", 0, None)
    try:
        yield calls, f"127.0.0.1:{port}"
    finally:
        calls.close()
        server.close()


async def _channel(address: str) -> UnaryChannel:
    return await UnaryChannel.open(address, ssl_context=None, server_name=None, timeout=5)


async def test_calls_in_flight_are_each_answered_with_their_own_response() -> None:
    async with echo_server() as (calls, address):
        channel = await _channel(address)
        try:
            # The first call sent finishes last: replies come back out of order and still reach their callers.
            ids = [f"sleep:{0.01 * (20 - i)}" for i in range(20)]
            replies = await asyncio.gather(*(channel.call(ECHO, REQ(request_id=i), RESP, 5) for i in ids))
            assert [r.instance_id for r in replies] == ids
            assert calls.calls_served == 20
            remaining = float((await channel.call(ECHO, REQ(request_id="remaining"), RESP, 3)).instance_id)
            assert 2.5 <= remaining <= 3.0, "the server runs the call under the caller's deadline"
        finally:
            await channel.aclose()


async def _raw_call(channel: UnaryChannel, method: str, timeout: float, body: bytes) -> bytes:
    """A call frame written as given (any body, any server deadline), its answer awaited up to 5 s."""
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    channel._pending[999] = future
    channel._writer.write(call_frame(999, method, timeout, body))
    try:
        return await asyncio.wait_for(future, 5)
    finally:
        channel._pending.pop(999, None)


async def test_refusals_and_failures_are_the_callers_status_and_the_connection_lives_on() -> None:
    async with echo_server() as (_, address):
        channel = await _channel(address)
        try:
            for rid, method, code in [
                ("abort", ECHO, grpc.StatusCode.RESOURCE_EXHAUSTED),
                ("boom", ECHO, grpc.StatusCode.UNKNOWN),
                ("x", "/test.Echo/Missing", grpc.StatusCode.UNIMPLEMENTED),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.call(method, REQ(request_id=rid), RESP, 5)
                assert info.value.code() == code, rid
            for timeout, body, code in [
                (0.2, REQ(request_id="sleep:5").SerializeToString(), grpc.StatusCode.DEADLINE_EXCEEDED),  # server's
                (5, b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),  # an undecodable request
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _raw_call(channel, ECHO, timeout, body)
                assert info.value.code() == code
            assert (await channel.call(ECHO, REQ(request_id="ok"), RESP, 5)).instance_id == "ok"
            assert not channel.closed
        finally:
            await channel.aclose()


async def test_no_answer_in_time_is_a_timeout_and_the_late_reply_is_dropped() -> None:
    async with echo_server() as (_, address):
        channel = await _channel(address)
        try:
            # The client's own deadline passes first (the server's is a little later: the frame took time).
            with pytest.raises(TimeoutError):
                await channel.call(ECHO, REQ(request_id="sleep:0.3"), RESP, 0.25)
            await asyncio.sleep(0.2)
            assert not channel._pending and not channel.closed
            assert (await channel.call(ECHO, REQ(request_id="ok"), RESP, 5)).instance_id == "ok"
        finally:
            await channel.aclose()


async def test_a_broken_connection_fails_every_call_in_flight_and_the_channel_stays_closed() -> None:
    async with echo_server() as (calls, address):
        channel = await _channel(address)
        pending = [asyncio.ensure_future(channel.call(ECHO, REQ(request_id="sleep:30"), RESP, 60)) for _ in range(3)]
        await asyncio.sleep(0.2)
        calls.close()  # the server drops its connections (a restart, a crash)
        for call in pending:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(call, 5)
        assert channel.closed
        with pytest.raises(ConnectionError):
            await channel.call(ECHO, REQ(request_id="ok"), RESP, 5)
        await channel.aclose()


async def test_calls_beyond_the_in_flight_bound_wait_for_one_to_end() -> None:
    """The server reads no further call while the bound is reached (old behaviour: refused RESOURCE_EXHAUSTED, which
    a frontend would have taken for a full cluster)."""
    async with echo_server(max_in_flight=2) as (_, address):
        channel = await _channel(address)
        try:
            started = time.monotonic()
            calls = [channel.call(ECHO, REQ(request_id="sleep:0.3"), RESP, 5) for _ in range(3)]
            assert [r.instance_id for r in await asyncio.gather(*calls)] == ["sleep:0.3"] * 3
            assert time.monotonic() - started >= 0.55, "the third call ran after one of the first two ended"
        finally:
            await channel.aclose()


async def test_a_large_first_frame_is_refused_before_the_peer_is_authorized() -> None:
    async with echo_server() as (calls, address):
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(struct.pack(">BI", CALL, FIRST_FRAME_MAX_BYTES + 1))  # a header announcing 1 MiB + 1
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(5):
                    assert await reader.read(65536) == b"", "dropped without reading the body"
            assert not calls.connections
        finally:
            writer.close()


@pytest.mark.parametrize("data", [frame(CALL, b"\x00\x01"), call_frame(1, ECHO, 5, b"") + frame(0, b"")])
async def test_a_malformed_call_frame_or_a_stream_frame_ends_the_connection(data: bytes) -> None:
    async with echo_server() as (calls, address):
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(data)
            # Whatever was answered before the bad frame, the server then closes: the read reaches EOF.
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(5):
                    while await reader.read(65536):
                        pass
            assert not calls.connections
        finally:
            writer.close()


async def test_a_route_connects_once_for_all_waiters_and_a_change_never_strands_a_call() -> None:
    async with echo_server() as (_, address):
        opened: list[UnaryChannel] = []
        gate = asyncio.Event()

        async def opener(target: str, timeout: float) -> UnaryChannel:
            await gate.wait()
            channel = await _channel(target)
            opened.append(channel)
            return channel

        route = CallRoute(opener)
        route.learn(address)
        waiters = [asyncio.ensure_future(route.channel(5)) for _ in range(5)]
        await asyncio.sleep(0.05)
        gate.set()
        got = await asyncio.gather(*waiters)
        assert len(opened) == 1 and all(channel is opened[0] for channel in got)
        # Forgotten (e.g. "not the leader"): a call in flight on the channel still gets its answer, then it closes.
        slow = asyncio.ensure_future(got[0].call(ECHO, REQ(request_id="sleep:0.2"), RESP, 5))
        await asyncio.sleep(0.05)
        route.forget()
        assert route.address == "" and (await slow).instance_id == "sleep:0.2"
        assert opened[0].closed
        # The route changes while a connection is being made: its waiters fail at once (never hang), and nothing
        # is left open.
        gate.clear()
        route.learn(address)
        waiter = asyncio.ensure_future(route.channel(5))
        await asyncio.sleep(0.05)
        route.learn("127.0.0.1:1")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiter, 1)
        gate.set()
        await asyncio.sleep(0.1)
        assert len(opened) == 1
        route.drop()


# -- the scheduler's framed listener -------------------------------------------------------------------------------
async def test_framed_dispatch_keeps_the_role_rule_beside_the_load_streams(pki: ClusterSecurity) -> None:
    """One port: a frontend's Dispatch calls (frontends only, as on gRPC) and a llumlet's load stream."""
    replica = leader()
    servicer = SchedulerServicer(replica)
    servicer.framed_cluster = CLUSTER
    servicer.take(scheduler_pb2.ReportLoadRequest(load=load("i-1", 1)), "i-1", False)
    await wait_for(lambda: len(replica.cluster.snapshot(time.monotonic())) == 1, "the load is in the leader's view")
    server, port = await listen(servicer.serve_framed, "127.0.0.1", 0, server_ssl_context(pki.paths("scheduler", "s0")))
    address = f"127.0.0.1:{port}"
    request = REQ(request_id="r1", priority=common_pb2.PRIORITY_NORMAL, num_prompt_tokens=10, max_tokens=10)
    try:
        for (role, id), code in [(("frontend", "f0"), None), (("llumlet", "i-1"), grpc.StatusCode.PERMISSION_DENIED)]:
            channel = await UnaryChannel.open(
                address,
                ssl_context=client_ssl_context(pki.paths(role, id)),
                server_name=role_name("scheduler"),
                timeout=5,
            )
            try:
                if code is None:
                    reply = await channel.call(DISPATCH_METHOD, request, RESP, 5)
                    assert reply.instance_id == "i-1" and reply.grpc_address == "127.0.0.1:1"
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.call(DISPATCH_METHOD, request, RESP, 5)
                    assert info.value.code() == code and "Dispatch" in (info.value.details() or "")
                    await wait_for(functools.partial(getattr, channel, "closed"), "a refused caller is let go")
            finally:
                await channel.aclose()
        assert servicer.framed_calls.calls_served == 1
        # The load stream on the same port still works (test_framed.py checks its rules).
        accepted = await _report(
            address, pki.paths("llumlet", "i-1"), scheduler_pb2.ReportLoadRequest(load=load("i-1", 2))
        )
        assert accepted.reports_accepted == 1 and replica.cluster.loads["i-1"].seq == 2
    finally:
        server.close()
        servicer.close_framed()


async def test_the_frontend_dispatches_over_the_framed_listener_and_falls_back_to_grpc(
    served: tuple[SchedulerReplica, SchedulerServicer, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    replica, servicer, address, _ = served
    servicer.take(scheduler_pb2.ReportLoadRequest(load=load("i-1", 1)), "i-1", False)
    dispatcher = LeaderDispatcher([address], framed=True)
    try:
        # The first dispatch goes over gRPC; its reply names the listener; the next ones go there.
        for i in range(3):
            assert await dispatcher.dispatch(f"r{i}", 1, 10, 10) == ("i-1", "127.0.0.1:1")
        assert (dispatcher.grpc_dispatches, dispatcher.framed_dispatches) == (1, 2)
        assert servicer.framed_calls.calls_served == 2
        # The leader's refusal over the framed call is the caller's error as over gRPC, with no second try.
        original = replica.dispatch

        def full(*args: Any) -> tuple[str, str]:
            raise SchedulingError(grpc.StatusCode.RESOURCE_EXHAUSTED, "all full")

        monkeypatch.setattr(replica, "dispatch", full)
        with pytest.raises(ResourceExhaustedError, match="all full"):
            await dispatcher.dispatch("r-full", 1, 10, 10)
        assert (dispatcher.grpc_dispatches, dispatcher.framed_dispatches) == (1, 3)
        # An answer other than the leader's decision (here UNAVAILABLE once; a follower's "not the leader" alike):
        # that dispatch goes over gRPC, whose reply names the listener again, and the next one is framed once more.
        refusals = iter([SchedulingError(grpc.StatusCode.UNAVAILABLE, "no instance right now")])

        def once(*args: Any) -> tuple[str, str]:
            error = next(refusals, None)
            if error is not None:
                raise error
            return original(*args)

        monkeypatch.setattr(replica, "dispatch", once)
        assert await dispatcher.dispatch("r-once", 1, 10, 10) == ("i-1", "127.0.0.1:1")
        assert await dispatcher.dispatch("r-twice", 1, 10, 10) == ("i-1", "127.0.0.1:1")
        assert (dispatcher.grpc_dispatches, dispatcher.framed_dispatches) == (2, 5)
        monkeypatch.setattr(replica, "dispatch", original)
        # The listener cannot be reached (its port closed): that dispatch still succeeds, over gRPC, and dispatches
        # stay there for a while instead of trying the listener each time.
        dispatcher.route.drop()
        dispatcher.route.address = dead_address()
        assert await dispatcher.dispatch("r-after", 1, 10, 10) == ("i-1", "127.0.0.1:1")
        assert await dispatcher.dispatch("r-after2", 1, 10, 10) == ("i-1", "127.0.0.1:1")
        assert (dispatcher.grpc_dispatches, dispatcher.framed_dispatches) == (4, 5)
        # Once that while is over, a gRPC reply naming the listener moves dispatches back onto it.
        dispatcher.route._after = 0.0
        for i in range(2):
            await dispatcher.dispatch(f"r-back{i}", 1, 10, 10)
        assert (dispatcher.grpc_dispatches, dispatcher.framed_dispatches) == (5, 6)
    finally:
        await dispatcher.close()


async def test_without_framed_the_frontend_dispatches_over_grpc_only(
    served: tuple[SchedulerReplica, SchedulerServicer, str, str],
) -> None:
    _, servicer, address, _ = served
    servicer.take(scheduler_pb2.ReportLoadRequest(load=load("i-1", 1)), "i-1", False)
    dispatcher = LeaderDispatcher([address])
    try:
        for i in range(3):
            await dispatcher.dispatch(f"r{i}", 1, 10, 10)
        assert (dispatcher.grpc_dispatches, dispatcher.framed_dispatches) == (3, 0)
        assert servicer.framed_calls.calls_served == 0
    finally:
        await dispatcher.close()


def test_both_ends_name_the_same_methods() -> None:
    """The frontend cannot import the servers' modules (layers): the method names are spelled twice."""
    assert DISPATCH_METHOD == scheduler_service.DISPATCH_METHOD
    assert channels.ADD_REQUEST_METHOD == llumlet_service.ADD_REQUEST_METHOD


class AddingLlumlet(llumlet_pb2_grpc.LlumletServiceServicer):
    """AddRequest as a llumlet's servicer answers it (recorded; ``refuse``: the status to refuse with; ``hang``: never
    answers), naming its framed listener in the reply."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.call_address = ""
        self.refuse: grpc.StatusCode | None = None
        self.hang = False

    async def AddRequest(self, request: llumlet_pb2.AddRequestRequest, context: Any) -> llumlet_pb2.AddRequestResponse:
        if self.refuse is not None:
            await context.abort(self.refuse, "refused")
        self.added.append(request.request.request_id)
        if self.hang:
            await asyncio.sleep(60)
        return llumlet_pb2.AddRequestResponse(instance_id="i-1", call_address=self.call_address)


def add(request_id: str) -> llumlet_pb2.AddRequestRequest:
    return llumlet_pb2.AddRequestRequest(request=common_pb2.EngineRequest(request_id=request_id))


async def test_the_frontend_adds_over_the_llumlets_framed_listener_once_a_reply_named_it() -> None:
    llumlet = AddingLlumlet()  # type: ignore[abstract]  # only AddRequest is served
    server = grpc.aio.server()
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(llumlet, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    calls = CallServer(
        {channels.ADD_REQUEST_METHOD: Method(llumlet_pb2.AddRequestRequest, llumlet.AddRequest)}, lambda: None
    )
    listener, port = await listen_calls(calls, "127.0.0.1", 0, None)
    llumlet.call_address = f"127.0.0.1:{port}"
    pool = channels.ChannelPool(framed=True)
    try:
        for i in range(3):
            await pool.add_request(address, add(f"r{i}"), 2)
        assert llumlet.added == ["r0", "r1", "r2"] and (pool.grpc_adds, pool.framed_adds) == (1, 2)
        # The llumlet's refusal is the caller's status, as over gRPC; the next add is framed still.
        llumlet.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.add_request(address, add("r-full"), 2)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and calls.calls_served == 3
        assert (pool.grpc_adds, pool.framed_adds) == (1, 3)
        llumlet.refuse = None
        # The connection breaks with an add on it: its outcome is unknown (DEADLINE_EXCEEDED, which the frontend
        # aborts and places elsewhere), and the next adds go over gRPC, once each.
        llumlet.hang = True
        pending = asyncio.ensure_future(pool.add_request(address, add("r-lost"), 5))
        await asyncio.sleep(0.2)
        calls.close()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pending
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        llumlet.hang = False
        await pool.add_request(address, add("r-next"), 2)  # over gRPC, whose reply names the listener again
        await pool.add_request(address, add("r-again"), 2)  # framed, on a new connection
        assert (pool.grpc_adds, pool.framed_adds) == (2, 5)
        assert llumlet.added[-3:] == ["r-lost", "r-next", "r-again"]
        # No answer in time: unknown too; the connection is fine and stays in use.
        llumlet.hang = True
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pool.add_request(address, add("r-slow"), 0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        llumlet.hang = False
        await pool.add_request(address, add("r-after-slow"), 2)
        assert (pool.grpc_adds, pool.framed_adds) == (2, 7)
        # A listener that cannot be reached (closed): the add goes over gRPC at once, exactly once, and the adds stay
        # there for a while.
        calls.close()
        listener.close()
        await listener.wait_closed()
        route = pool._routes[address]
        await wait_for(lambda: route._channel is None or route._channel.closed, "the client saw its connection end")
        await pool.add_request(address, add("r-refused"), 2)
        await pool.add_request(address, add("r-paused"), 2)
        assert (pool.grpc_adds, pool.framed_adds) == (4, 7)
        assert llumlet.added[-2:] == ["r-refused", "r-paused"]
    finally:
        await pool.close()
        calls.close()
        listener.close()
        await server.stop(None)


@pytest.mark.parametrize("address", ["no-port", "127.0.0.1:http", f"{'a' * 64}.example:1"])
async def test_a_malformed_address_is_a_connection_failure(address: str) -> None:
    """A listener address from a peer's reply that cannot be dialled (no port, a label IDNA cannot encode) fails as an
    unreachable one does, so the caller falls back to gRPC (before: ValueError, which no fallback caught)."""
    with pytest.raises(ConnectionError):
        await UnaryChannel.open(address, ssl_context=None, server_name=None, timeout=2)
