"""The FrontendService gRPC servicer (Generate, Abort) and ``start_grpc``, which serves it and the output sink
(one plaintext port when insecure; a public server-TLS + API key port and a mutual-TLS sink port when secure).

Generate gets the same checks and limits as the HTTP API (``Frontend.submit``); errors map to INVALID_ARGUMENT,
RESOURCE_EXHAUSTED (overload; ``retry-after`` trailing metadata, seconds), UNAVAILABLE (no capacity; ``retry-after``),
DEADLINE_EXCEEDED (no output in time). Messages are capped at ``DEFAULT_MAX_MESSAGE_BYTES`` both ways: a larger one
is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from pyllumnix.control_plane.frontend.core import Frontend, GenerationInput, grpc_api_key_of
from pyllumnix.control_plane.frontend.errors import FrontendError
from pyllumnix.control_plane.frontend.sink import SERVICE_NAME as SINK_SERVICE_NAME
from pyllumnix.control_plane.frontend.sink import OutputSinkServicer
from pyllumnix.infra.framed import listen
from pyllumnix.infra.grpc_server import DEFAULT_OPTIONS, RunningServer, advertised_address, start_server
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.apikeys import ApiKeyInterceptor, ApiKeyStore
from pyllumnix.infra.security.runtime import SecuritySettings
from pyllumnix.infra.security.tls import grpc_server_credentials, server_ssl_context
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "llumnix.v1.FrontendService"
# Generate requests are small (a prompt within the model's length); output pushes carry a few tokens per request.
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """grpc_server's defaults with the message size caps replaced."""
    capped = {"grpc.max_send_message_length", "grpc.max_receive_message_length"}
    options = [(k, v) for k, v in DEFAULT_OPTIONS if k not in capped]
    return [*options, *((k, max_message_bytes) for k in sorted(capped))]


class FrontendServicer(frontend_pb2_grpc.FrontendServiceServicer):
    """Cancelling a Generate call aborts the request (the handler is cancelled inside ``Frontend.open``). So does a
    client that takes no message for the frontend's idle timeout: the RPC's task is cancelled while its send blocks."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(
        self, request: frontend_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[frontend_pb2.GenerateResponse]:
        prompt: str | list[int] = (
            list(request.token_ids.ids) if request.WhichOneof("prompt") == "token_ids" else request.text
        )
        inp = GenerationInput(prompt, request.sampling, request.priority, request.request_id, request.model)
        timed_out = ""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        try:
            async with self.frontend.open(inp, owner=grpc_api_key_of(context)) as tracked:
                async for delta in tracked.deltas():
                    reply = frontend_pb2.GenerateResponse(
                        request_id=tracked.request_id,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        first_token_index=delta.first_token_index,
                        finished=delta.finished,
                        finish_reason=delta.finish_reason,
                        instance_id=delta.instance_id,
                    )
                    if delta.finished:
                        reply.usage.prompt_tokens = tracked.num_prompt_tokens
                        reply.usage.completion_tokens = tracked.num_received
                    # The send happens while this generator is suspended at ``yield``, in this task: a client that
                    # reads nothing (flow control stalls the send) would otherwise hold its slot forever. Bounded by
                    # the idle timeout and the request's deadline (``TrackedRequest.send_limit``).
                    limit, why = tracked.send_limit()
                    watchdog = (
                        loop.call_later(limit, self._drop, task, tracked.request_id, why)
                        if limit is not None and task
                        else None
                    )
                    try:
                        yield reply
                    finally:
                        if watchdog is not None:
                            watchdog.cancel()
                    if tracked.timed_out:
                        timed_out = delta.error or "no output in time"
                    elif delta.finish_reason == common_pb2.FINISH_REASON_ERROR:
                        # The final message says ERROR; the status carries the cause (e.g. "instance lost").
                        context.set_code(grpc.StatusCode.INTERNAL)
                        context.set_details(delta.error or "request failed")
        except FrontendError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing_metadata())
        if timed_out:
            context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            context.set_details(timed_out)

    def _drop(self, task: asyncio.Task[Any], request_id: str, why: str) -> None:
        log.warning("Generate %s: %s; cancelling the call", request_id, why)
        task.cancel()

    async def Abort(
        self, request: frontend_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.AbortResponse:
        try:
            await self.frontend.abort(request.request_id, grpc_api_key_of(context))
        except FrontendError as exc:
            await context.abort(exc.code, exc.message)
        return frontend_pb2.AbortResponse()


@dataclass
class FrontendGrpc:
    """The frontend's gRPC listeners: the public one (FrontendService) and the output sink llumlets push to.

    Secure (the process's settings have a certificate): the sink is its own mutual-TLS port with the role check
    (python grpc cannot make client certificates optional on one port), and the public port has server-only TLS with
    API keys (``authorization: Bearer``). Insecure: one plaintext port serves both, as before.
    """

    public: RunningServer
    sink: RunningServer | None = None
    sink_servicer: OutputSinkServicer | None = None
    # The llumlets' framed push stream (``OutputSinkServicer.serve_framed``; None: not offered).
    framed: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return self.public.port

    @property
    def address(self) -> str:
        return self.public.address

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.framed is not None:  # no new framed streams; the open ones end with the gRPC ones just below
            self.framed.close()
        if self.sink_servicer is not None:  # llumlets' push streams never end on their own: end them first
            await self.sink_servicer.end_streams(grace if grace is not None else 1.0)
        if self.framed is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace if grace is not None else 1.0):
                    await self.framed.wait_closed()
        await self.public.stop(grace)
        if self.sink is not None:
            await self.sink.stop(grace)


async def start_grpc(
    frontend: Frontend,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str = "",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    api_keys: ApiKeyStore | None = None,
    security: SecuritySettings | None = None,
    sink_port: int = 0,
    stream_port: int | None = 0,
) -> FrontendGrpc:
    """Serves FrontendService and OutputSinkService and points the frontend's sink address at the sink's port.

    ``stream_port``: where the llumlets' framed push stream listens, on the sink's host and TLS terms (0: a free port;
    None: not offered, llumlets push over the gRPC stream)."""
    settings = security if security is not None else runtime.current()
    options = server_options(max_message_bytes)
    public_binding = (frontend_pb2_grpc.add_FrontendServiceServicer_to_server, FrontendServicer(frontend), SERVICE_NAME)
    sink_servicer = OutputSinkServicer(frontend.tracker, frontend.scheduler_leader)
    sink_binding = (frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, sink_servicer, SINK_SERVICE_NAME)
    key_check = [ApiKeyInterceptor(api_keys)] if api_keys is not None else []
    if settings.paths is None:
        server = await start_server(
            [public_binding, sink_binding], host=host, port=port, options=options, interceptors=key_check
        )
        frontend.sink_address = advertised_address(host, advertise_host, server.port)
        framed = await _start_framed(sink_servicer, settings, host, advertise_host, stream_port, max_message_bytes)
        return FrontendGrpc(server, sink_servicer=sink_servicer, framed=framed)
    sink = await start_server([sink_binding], host=host, port=sink_port, options=options, security=settings)
    try:
        public = await start_server(
            [public_binding],
            host=host,
            port=port,
            options=options,
            security=settings,
            interceptors=key_check,
            credentials=grpc_server_credentials(settings.paths, require_client_cert=False),
        )
    except BaseException:
        await sink.stop(0)
        raise
    frontend.sink_address = advertised_address(host, advertise_host, sink.port)
    try:
        framed = await _start_framed(sink_servicer, settings, host, advertise_host, stream_port, max_message_bytes)
    except BaseException:
        await public.stop(0)
        await sink.stop(0)
        raise
    return FrontendGrpc(public, sink, sink_servicer, framed)


async def _start_framed(
    servicer: OutputSinkServicer,
    settings: SecuritySettings,
    host: str,
    advertise_host: str,
    port: int | None,
    max_bytes: int,
) -> asyncio.Server | None:
    """The framed push stream's listener (mutual TLS with client certificates required when secure), advertised
    through ``DescribeSink``."""
    if port is None:
        return None
    ssl_context = None if settings.paths is None else server_ssl_context(settings.paths)
    server, bound = await listen(servicer.serve_framed, host, port, ssl_context)
    servicer.stream_address = advertised_address(host, advertise_host, bound)
    servicer.stream_cluster = None if settings.paths is None else settings.cluster
    servicer.max_frame_bytes = max_bytes
    return server
