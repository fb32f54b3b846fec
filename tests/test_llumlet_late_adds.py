"""An AddRequest its caller gave up on is refused, not added for nobody (LEFT2 #2).

The frontend's AddRequest to A times out (ambiguous: A may still add it), so it aborts it on A, best-effort, and
places it elsewhere. Before, A added it anyway when the handler got to the add after the deadline (woken from the
engine lock by a long step), or when the abort overtook the AddRequest (NOT_FOUND, ignored): a copy nobody wanted held
KV blocks and a queue slot until its idle timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.late_adds import (
    AbortedBeforeArrivalError,
    CallerGaveUpError,
    Tombstones,
    check_deadline,
)
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer, status_for
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc

DEADLINE_S = 10.0


def engine_request(rid: str) -> common_pb2.EngineRequest:
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=[1, 2, 3, 4],
        sampling=common_pb2.SamplingParams(max_tokens=8, seed=1, ignore_eos=True),
        frontend_address="",  # nobody to push to: these requests are never stepped
    )


def add(rid: str) -> llumlet_pb2.AddRequestRequest:
    return llumlet_pb2.AddRequestRequest(request=engine_request(rid))


class Served:
    def __init__(self, engine: SimEngine, llumlet: Llumlet, servicer: LlumletServicer, server: RunningServer) -> None:
        self.engine, self.llumlet, self.servicer, self.server = engine, llumlet, servicer, server


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "inst-late")  # not started: whatever is added stays queued, where the test sees it
    servicer = LlumletServicer(llumlet)
    server = await start_server([(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, SERVICE_NAME)])
    try:
        yield Served(engine, llumlet, servicer, server)
    finally:
        await server.stop(None)
        await llumlet.stop()


# --------------------------------------------------------------------------------------------------- tombstones
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_tombstone_guards_one_add_within_its_ttl() -> None:
    clock = Clock()
    stones = Tombstones(ttl_s=60.0, max_entries=10, clock=clock)
    stones.add("r1")
    assert "r1" in stones and len(stones) == 1
    assert stones.take("r1"), "the overtaken add is refused"
    assert not stones.take("r1"), "taken: a client reusing the id later is not refused again"
    stones.add("r2")
    clock.now += 59.9
    assert "r2" in stones
    clock.now += 0.2
    assert not stones.take("r2") and len(stones) == 0, "expired after its TTL"


def test_tombstones_are_bounded_oldest_first_and_a_repeated_abort_restarts_the_ttl() -> None:
    clock = Clock()
    stones = Tombstones(ttl_s=60.0, max_entries=3, clock=clock)
    for rid in ("a", "b", "c"):
        stones.add(rid)
        clock.now += 1.0
    stones.add("a")  # aborted again: now the newest
    stones.add("d")  # one too many: the oldest ("b") goes
    assert len(stones) == 3 and "b" not in stones and all(r in stones for r in ("a", "c", "d"))
    clock.now += 59.5  # "c" (added at 102) expires, "a" (re-added at 103) does not
    assert "c" not in stones and "a" in stones and "d" in stones


def test_tombstones_refuse_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        Tombstones(ttl_s=0.0)
    with pytest.raises(ValueError):
        Tombstones(max_entries=0)


def test_the_deadline_check_and_the_status_codes() -> None:
    check_deadline(None, "r", "i")  # no deadline: never late
    check_deadline(0.001, "r", "i")
    with pytest.raises(CallerGaveUpError, match="r not added to i"):
        check_deadline(0.0, "r", "i")
    assert status_for(CallerGaveUpError("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(AbortedBeforeArrivalError("x")) == grpc.StatusCode.ABORTED


# ------------------------------------------------------------------------------------------------ over gRPC
async def test_an_add_that_arrives_after_its_abort_is_refused(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.server.address) as channel:
        stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r-late"), timeout=DEADLINE_S)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, "the abort's answer is unchanged"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AddRequest(add("r-late"), timeout=DEADLINE_S)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "aborted before it arrived at inst-late" in (err.value.details() or "")
        assert served.engine.request_ids() == [], "old code: the copy was added and held its queue slot"
        assert "r-late" not in served.llumlet.owners
        # Others are untouched, and the id itself may be used again (the tombstone guarded one add).
        await stub.AddRequest(add("r-other"), timeout=DEADLINE_S)
        await stub.AddRequest(add("r-late"), timeout=DEADLINE_S)
        assert sorted(served.engine.request_ids()) == ["r-late", "r-other"]
        # Aborting a request that is here leaves no tombstone.
        await stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="r-other"), timeout=DEADLINE_S)
        assert "r-other" not in served.servicer.tombstones
    assert served.servicer.late_adds_refused == 1


async def test_an_add_woken_from_the_engine_lock_after_its_deadline_is_refused(served: Served) -> None:
    """A step (or a migration stage) releases the engine lock but holds the event loop, synchronous, past the
    AddRequest's deadline: the handler, woken by the lock, runs before grpc's cancellation reaches it (old code: it
    added). Releasing the lock before the loop is held puts that wake-up first, whatever the machine's load."""
    lock = served.llumlet.engine_lock
    await lock.acquire()
    try:
        async with grpc.aio.insecure_channel(served.server.address) as channel:
            stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
            call = asyncio.ensure_future(stub.AddRequest(add("r-slow"), timeout=1.0))
            async with asyncio.timeout(DEADLINE_S):  # the handler waits for the lock
                while not getattr(lock, "_waiters", None):
                    await asyncio.sleep(0.005)
            lock.release()  # the step ends: the handler's wake-up is queued...
            time.sleep(1.5)  # ...but the loop is held (the step's synchronous tail) until the deadline has passed
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            async with asyncio.timeout(DEADLINE_S):  # the handler has run to its end
                while getattr(lock, "_waiters", None) or lock.locked():
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
    finally:
        if lock.locked():
            lock.release()
    assert served.engine.request_ids() == [], "old code: added after its caller had given up"
    assert served.servicer.late_adds_refused == 1, "refused by the handler, not cancelled by grpc before the add"


class FakeContext:
    """What the handler uses of a grpc ServicerContext: its deadline, and abort."""

    def __init__(self, time_remaining: float | None) -> None:
        self.remaining = time_remaining
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.RpcError(details)


@pytest.mark.parametrize("lock_free", [False, True], ids=["under-the-lock", "lock-free-during-a-payload-write"])
async def test_a_handler_that_runs_after_its_deadline_adds_nothing(lock_free: bool) -> None:
    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "inst-late")
    llumlet._adds_open = lock_free  # a sim step's payload write in a worker thread: adds skip the lock
    servicer = LlumletServicer(llumlet)
    late = FakeContext(time_remaining=0.0)  # grpc reports an expired deadline as 0
    with pytest.raises(grpc.RpcError):
        await servicer.AddRequest(add("r-late"), cast(Any, late))
    assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in late.details
    assert engine.request_ids() == []
    on_time = FakeContext(time_remaining=5.0)
    response = await servicer.AddRequest(add("r-on-time"), cast(Any, on_time))
    assert response.instance_id == "inst-late" and on_time.code is None
    assert engine.request_ids() == ["r-on-time"]
    await llumlet.stop()
