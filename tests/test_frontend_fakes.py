"""Fakes shared by the frontend tests (no tests here): llumlets that push through the real OutputSinkService, a
follower/leader scheduler pair, a static dispatcher, and a started frontend (gRPC + HTTP) wired to them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.control_plane.frontend.dispatch import Dispatcher, Placement
from pyllumnix.control_plane.frontend.http import DEFAULT_MAX_BODY_BYTES, HttpServer, start_http
from pyllumnix.control_plane.frontend.service import FrontendGrpc, start_grpc
from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer, Tokenizer
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import (
    common_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

log = logging.getLogger(__name__)

MODEL = "sim-model"
MAX_MODEL_LEN = 256
TOKENIZER = SimTokenizer()


def token(i: int) -> int:
    """The fake engine's i-th generated token (never a special id)."""
    return 1000 + 7 * i


def expected_text(n: int) -> str:
    return "".join(TOKENIZER.word(token(i)) for i in range(n))


class FakeLlumlet(llumlet_pb2_grpc.LlumletServiceServicer):
    """Generates ``tokens`` (default: max_tokens) tokens per request and pushes them to the request's frontend.

    ``messy`` pushes every output twice and re-sends the previous token with the next one, as a retried push or a
    migration hand-over would. ``refuse`` makes the first AddRequest calls fail FAILED_PRECONDITION (draining).
    ``fail_after`` ends each request with the scheduler's "instance lost" notice after that many tokens.
    ``silent_after`` stops pushing after that many tokens without finishing (a llumlet that gave up pushing);
    ``refuse_code`` is the status of the refusals (RESOURCE_EXHAUSTED: the instance's queue is full).
    ``stall_add`` makes the first AddRequest calls hang (a stopped process: the caller's deadline passes) and still add
    the request once ``wake`` is set, as a llumlet continued after SIGSTOP may.
    """

    def __init__(
        self,
        instance_id: str,
        *,
        tokens: int | None = None,
        delay: float = 0.0,
        messy: bool = True,
        refuse: int = 0,
        fail_after: int | None = None,
        silent_after: int | None = None,
        refuse_code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
        stall_add: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self.tokens = tokens
        self.delay = delay
        self.messy = messy
        self.refuse = refuse
        self.fail_after = fail_after
        self.silent_after = silent_after
        self.refuse_code = refuse_code
        self.stall_add = stall_add
        self.wake = asyncio.Event()
        self.stalled: list[str] = []
        self._late: list[asyncio.Task[None]] = []
        self.added: list[common_pb2.EngineRequest] = []
        self.aborted: list[str] = []
        self.aborted_event = asyncio.Event()
        self.unknown_replies: list[str] = []
        self.push_failures: list[str] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    # Not used by the frontend: the base class answers UNIMPLEMENTED.
    _base = llumlet_pb2_grpc.LlumletServiceServicer
    GetLoad = _base.GetLoad
    StreamLoad = _base.StreamLoad
    ListRequests = _base.ListRequests
    SetInstanceState = _base.SetInstanceState
    MigrateOut = _base.MigrateOut
    PreAllocate = _base.PreAllocate
    TransferStage = _base.TransferStage
    CommitMigration = _base.CommitMigration
    AbortMigration = _base.AbortMigration

    async def AddRequest(self, request: llumlet_pb2.AddRequestRequest, context: Any) -> llumlet_pb2.AddRequestResponse:
        if self.refuse > 0:
            self.refuse -= 1
            await context.abort(self.refuse_code, "instance refuses new requests")
        if self.stall_add > 0:
            self.stall_add -= 1
            self.stalled.append(request.request.request_id)
            # Not in _tasks: an abort that arrives before the late add finds nothing to abort, as on a real llumlet.
            self._late.append(asyncio.get_running_loop().create_task(self._late_add(request.request)))
            await asyncio.Event().wait()  # never answers; the caller's deadline ends the call
        self.added.append(request.request)
        self._tasks[request.request.request_id] = asyncio.get_running_loop().create_task(self._run(request.request))
        return llumlet_pb2.AddRequestResponse(instance_id=self.instance_id)

    async def AbortRequest(
        self, request: llumlet_pb2.AbortRequestRequest, context: Any
    ) -> llumlet_pb2.AbortRequestResponse:
        self.aborted.append(request.request_id)
        self.aborted_event.set()
        task = self._tasks.pop(request.request_id, None)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown request")
        else:
            task.cancel()
        return llumlet_pb2.AbortRequestResponse()

    async def _late_add(self, er: common_pb2.EngineRequest) -> None:
        """Adds a stalled AddRequest's request once woken, whatever its caller decided meanwhile."""
        await self.wake.wait()
        self.added.append(er)
        await self._run(er)

    def sink(self, address: str) -> frontend_pb2_grpc.OutputSinkServiceStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return frontend_pb2_grpc.OutputSinkServiceStub(self._channels[address])

    async def push(self, address: str, outputs: list[common_pb2.RequestOutput]) -> None:
        """Pushes, retrying twice on a transport failure as a real llumlet's pusher does. Each failure is logged and
        kept in ``push_failures``: a push that failed for good (its task ends silently) leaves the frontend waiting for
        its idle timeout, and the log says why (a CI run once saw that wait and nothing else)."""
        request = frontend_pb2.PushOutputsRequest(instance_id=self.instance_id, outputs=outputs)
        for attempt in range(3):
            try:
                reply = await self.sink(address).PushOutputs(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.push_failures.append(f"{exc.code().name}: {exc.details()}")
                log.warning("fake llumlet %s: push %d to %s failed: %s", self.instance_id, attempt + 1, address, exc)
                if attempt == 2 or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                await asyncio.sleep(0.1)
                continue
            self.unknown_replies.extend(reply.unknown_request_ids)
            return

    async def _run(self, er: common_pb2.EngineRequest) -> None:
        n = self.tokens if self.tokens is not None else er.sampling.max_tokens
        n = min(n, er.sampling.max_tokens)
        for i in range(n):
            await asyncio.sleep(self.delay)
            if self.silent_after is not None and i == self.silent_after:
                await asyncio.Event().wait()  # holds the request, pushes nothing more (until aborted)
            if self.fail_after is not None and i == self.fail_after:
                lost = common_pb2.RequestOutput(
                    request_id=er.request_id,
                    finished=True,
                    finish_reason=common_pb2.FINISH_REASON_ERROR,
                    error=f"instance {self.instance_id} lost",
                )
                await self.push(er.frontend_address, [lost])
                return
            last = i == n - 1
            out = common_pb2.RequestOutput(
                request_id=er.request_id,
                token_ids=[token(i)],
                first_token_index=i,
                finished=last,
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED,
                instance_id=self.instance_id,
                num_prompt_tokens=len(er.prompt_token_ids),
            )
            batch = [out]
            if self.messy and i > 0:
                resend = common_pb2.RequestOutput(
                    request_id=er.request_id,
                    token_ids=[token(i - 1), token(i)],
                    first_token_index=i - 1,
                    instance_id=self.instance_id,
                )
                batch = [resend, out]
            await self.push(er.frontend_address, batch)
            if self.messy:
                await self.push(er.frontend_address, batch)
        self._tasks.pop(er.request_id, None)

    async def close(self) -> None:
        for task in [*self._tasks.values(), *self._late]:
            task.cancel()
        for channel in self._channels.values():
            await channel.close()


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """A leader (``placement`` set) or a follower naming ``leader`` in the "llumnix-leader" trailing metadata."""

    def __init__(self, placement: Placement | None = None, leader: str = "") -> None:
        self.placement = placement
        self.leader = leader
        self.calls: list[scheduler_pb2.DispatchRequest] = []

    ReportLoad = scheduler_pb2_grpc.SchedulerServiceServicer.ReportLoad
    GetMembership = scheduler_pb2_grpc.SchedulerServiceServicer.GetMembership

    async def Dispatch(self, request: scheduler_pb2.DispatchRequest, context: Any) -> scheduler_pb2.DispatchResponse:
        self.calls.append(request)
        if self.placement is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "not the leader",
                trailing_metadata=(("llumnix-leader", self.leader),),
            )
        assert self.placement is not None
        return scheduler_pb2.DispatchResponse(
            instance_id=self.placement.instance_id, grpc_address=self.placement.grpc_address
        )


async def start_scheduler(servicer: FakeScheduler) -> RunningServer:
    return await start_server(
        [(scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, servicer, "llumnix.v1.SchedulerService")]
    )


async def start_llumlet(servicer: FakeLlumlet) -> RunningServer:
    return await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, "llumnix.v1.LlumletService")]
    )


class StaticDispatcher:
    """Hands out the placements in turn (the tests' stand-in for the leader)."""

    def __init__(self, placements: list[Placement]) -> None:
        self.placements = placements
        self.calls: list[str] = []

    async def dispatch(self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int) -> Placement:
        self.calls.append(request_id)
        return self.placements[(len(self.calls) - 1) % len(self.placements)]


class AddressBook:
    """InstanceResolver over the test's llumlets (for aborts after a migration)."""

    def __init__(self) -> None:
        self.addresses: dict[str, str] = {}

    async def address_of(self, instance_id: str) -> str | None:
        return self.addresses.get(instance_id)


@dataclass
class Stack:
    frontend: Frontend
    grpc: FrontendGrpc
    http: HttpServer
    llumlets: dict[str, FakeLlumlet] = field(default_factory=dict)
    servers: list[RunningServer] = field(default_factory=list)
    book: AddressBook = field(default_factory=AddressBook)

    def placement(self, instance_id: str) -> Placement:
        return Placement(instance_id, self.book.addresses[instance_id])

    async def add_llumlet(self, llumlet: FakeLlumlet) -> Placement:
        server = await start_llumlet(llumlet)
        self.servers.append(server)
        self.llumlets[llumlet.instance_id] = llumlet
        self.book.addresses[llumlet.instance_id] = server.address
        return Placement(llumlet.instance_id, server.address)


@contextlib.asynccontextmanager
async def running_stack(
    llumlets: list[FakeLlumlet],
    dispatcher: Dispatcher | None = None,
    *,
    tokenizer: Tokenizer = TOKENIZER,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **frontend_options: Any,
) -> AsyncIterator[Stack]:
    """A frontend (gRPC + HTTP on 127.0.0.1) over ``llumlets``; by default each request goes to the next llumlet.
    ``frontend_options`` go to ``Frontend`` (idle_timeout, max_inflight, ...)."""
    book = AddressBook()
    placements = []
    servers = []
    for llumlet in llumlets:
        server = await start_llumlet(llumlet)
        servers.append(server)
        book.addresses[llumlet.instance_id] = server.address
        placements.append(Placement(llumlet.instance_id, server.address))
    frontend = Frontend(
        model=MODEL,
        max_model_len=MAX_MODEL_LEN,
        tokenizer=tokenizer,
        dispatcher=dispatcher or StaticDispatcher(placements),
        resolver=book,
        **frontend_options,
    )
    grpc_server = await start_grpc(frontend)
    http_server = await start_http(frontend, max_body_bytes=max_body_bytes)
    stack = Stack(frontend, grpc_server, http_server, {x.instance_id: x for x in llumlets}, servers, book)
    try:
        yield stack
    finally:
        await http_server.stop()
        await grpc_server.stop(None)
        await frontend.close()
        for llumlet in stack.llumlets.values():
            await llumlet.close()
        for server in stack.servers:
            await server.stop(None)
