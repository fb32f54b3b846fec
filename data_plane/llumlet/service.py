"""The LlumletService gRPC servicer: validates input, maps engine errors to status codes, delegates migration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from pyllumnix.data_plane.engine.base import (
    DuplicateRequestError,
    EngineError,
    InvalidRequestError,
    InvalidStateError,
    OutOfBlocksError,
    UnknownRequestError,
)
from pyllumnix.data_plane.llumlet.convert import request_load_to_pb
from pyllumnix.data_plane.llumlet.llumlet import InstanceNotAcceptingError, Llumlet, QueueFullError
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc

SERVICE_NAME = "llumnix.v1.LlumletService"
_R = TypeVar("_R")
MIN_STREAM_INTERVAL_MS = 5

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (UnknownRequestError, grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OutOfBlocksError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (InstanceNotAcceptingError, grpc.StatusCode.FAILED_PRECONDITION),
    # The waiting queue is full: the frontend answers HTTP 429 (or tries another instance).
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    await context.abort(status_for(exc), str(exc) or type(exc).__name__)
    raise AssertionError("unreachable")  # context.abort raises


class MigrationHandler(Protocol):
    """The migration coordinator's gRPC-facing side (source and destination roles)."""

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
    def __init__(self, llumlet: Llumlet, migration: MigrationHandler | None = None, stream_interval_ms: int = 50):
        self.llumlet = llumlet
        self.migration = migration
        self.stream_interval_ms = stream_interval_ms

    async def AddRequest(
        self, request: llumlet_pb2.AddRequestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.AddRequestResponse:
        if not request.request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        try:
            await self.llumlet.add_request(request.request)
        except (EngineError, InstanceNotAcceptingError, QueueFullError) as exc:
            await abort_with(context, exc)
        return llumlet_pb2.AddRequestResponse(instance_id=self.llumlet.instance_id)

    async def AbortRequest(
        self, request: llumlet_pb2.AbortRequestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.AbortRequestResponse:
        try:
            await self.llumlet.abort_request(request.request_id)
        except EngineError as exc:
            await abort_with(context, exc)
        return llumlet_pb2.AbortRequestResponse()

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
        while True:
            yield llumlet_pb2.StreamLoadResponse(load=self.llumlet.load_pb())
            await asyncio.sleep(interval_ms / 1000)

    async def ListRequests(
        self, request: llumlet_pb2.ListRequestsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.ListRequestsResponse:
        snap = self.llumlet.engine.load()
        return llumlet_pb2.ListRequestsResponse(requests=[request_load_to_pb(r) for r in snap.requests])

    async def SetInstanceState(
        self, request: llumlet_pb2.SetInstanceStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.SetInstanceStateResponse:
        allowed = (
            common_pb2.INSTANCE_STATE_ACTIVE,
            common_pb2.INSTANCE_STATE_CORDONED,
            common_pb2.INSTANCE_STATE_DRAINING,
        )
        if request.state not in allowed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "state must be ACTIVE, CORDONED or DRAINING")
        self.llumlet.state = request.state
        return llumlet_pb2.SetInstanceStateResponse(state=self.llumlet.state)

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
        handler = await self._migration(context)
        return await self._delegate(context, handler.migrate_out(request))

    async def PreAllocate(
        self, request: llumlet_pb2.PreAllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.PreAllocateResponse:
        handler = await self._migration(context)
        return await self._delegate(context, handler.pre_allocate(request))

    async def TransferStage(
        self, request: llumlet_pb2.TransferStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.TransferStageResponse:
        handler = await self._migration(context)
        return await self._delegate(context, handler.transfer_stage(request))

    async def CommitMigration(
        self, request: llumlet_pb2.CommitMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.CommitMigrationResponse:
        handler = await self._migration(context)
        return await self._delegate(context, handler.commit(request))

    async def AbortMigration(
        self, request: llumlet_pb2.AbortMigrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llumlet_pb2.AbortMigrationResponse:
        handler = await self._migration(context)
        return await handler.abort(request)
