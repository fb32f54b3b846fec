"""OpenAI-compatible HTTP API (aiohttp) over a ``Frontend``.

Routes: POST /v1/completions, POST /v1/chat/completions (streaming SSE or not), GET /v1/models, GET /health,
GET /metrics (Prometheus), POST /v1/requests/{request_id}/abort.

Priority: the body field ``"priority": "normal" | "high"`` or the header ``X-Llumnix-Priority: normal | high``; when
both are given the body wins. Request id: an optional ``X-Request-Id`` header names the request (409 if in use); every
response carries ``X-Request-Id``, which the abort route takes. ``n`` must be 1. Errors are OpenAI-style bodies
``{"error": {"message", "type", "param", "code"}}``: malformed input 400, unknown model or request 404, id in use 409,
no capacity 503, a failed request (instance lost) 500. A client that disconnects aborts its request.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.control_plane.frontend.errors import FrontendError, ModelNotFoundError, RequestFailedError
from pyllumnix.control_plane.frontend.openai_schema import (
    ParsedRequest,
    choice,
    envelope,
    error_body,
    finish_reason_name,
    parse_request,
    usage,
)
from pyllumnix.control_plane.frontend.requests import TrackedRequest
from pyllumnix.protos.llumnix.v1 import common_pb2

log = logging.getLogger(__name__)

PRIORITY_HEADER = "X-Llumnix-Priority"
REQUEST_ID_HEADER = "X-Request-Id"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status)


def frontend_error_response(exc: FrontendError) -> web.Response:
    code = "model_not_found" if isinstance(exc, ModelNotFoundError) else exc.code.name.lower()
    return error_response(exc.http_status, exc.message, exc.openai_type, exc.param, code)


@web.middleware
async def openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI error body, including aiohttp's own (unknown route, wrong method)."""
    try:
        return await handler(request)
    except FrontendError as exc:
        return frontend_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, "invalid_request_error", code=str(exc.status))
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(500, "internal server error", "server_error", code="internal")


class HttpApi:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors])
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
                web.post("/v1/requests/{request_id}/abort", self.abort),
            ]
        )
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        parsed = parse_request(
            body,
            chat=chat,
            tokenizer=self.frontend.tokenizer,
            max_model_len=self.frontend.max_model_len,
            header_priority=request.headers.get(PRIORITY_HEADER),
            request_id=request.headers.get(REQUEST_ID_HEADER, ""),
        )
        async with self.frontend.open(parsed.inp) as tracked:
            if parsed.stream:
                return await self._stream(request, parsed, tracked)
            return await self._complete(parsed, tracked)

    async def _complete(self, parsed: ParsedRequest, tracked: TrackedRequest) -> web.Response:
        async for delta in tracked.deltas():
            if delta.finish_reason == common_pb2.FINISH_REASON_ERROR:
                raise RequestFailedError(f"request {tracked.request_id} failed: {delta.error or 'engine error'}")
        body = envelope(tracked.request_id, self.frontend.model, chat=parsed.chat, chunk=False)
        reason = finish_reason_name(tracked.finish_reason, finished=True)
        body["choices"] = [choice(tracked.text, reason, chat=parsed.chat, chunk=False)]
        body["usage"] = usage(tracked.num_prompt_tokens, tracked.num_received)
        return web.json_response(body, headers={REQUEST_ID_HEADER: tracked.request_id})

    async def _stream(self, request: web.Request, parsed: ParsedRequest, tracked: TrackedRequest) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                REQUEST_ID_HEADER: tracked.request_id,
            }
        )
        await response.prepare(request)

        async def send(obj: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(obj)}\n\n".encode())

        model = self.frontend.model
        # A write to a client that left raises; leaving ``Frontend.open`` then aborts the request.
        with contextlib.suppress(ConnectionResetError):
            first = True
            async for delta in tracked.deltas():
                if delta.finish_reason == common_pb2.FINISH_REASON_ERROR:
                    message = f"request {tracked.request_id} failed: {delta.error or 'engine error'}"
                    await send(error_body(message, "server_error", code="internal"))
                    break
                if not delta.text and not delta.finished and not first:
                    continue
                chunk = envelope(tracked.request_id, model, chat=parsed.chat, chunk=True)
                reason = finish_reason_name(delta.finish_reason, delta.finished)
                chunk["choices"] = [choice(delta.text, reason, chat=parsed.chat, chunk=True, first=first)]
                if parsed.include_usage:
                    chunk["usage"] = None
                await send(chunk)
                first = False
            else:
                if parsed.include_usage:
                    chunk = envelope(tracked.request_id, model, chat=parsed.chat, chunk=True)
                    chunk["choices"] = []
                    chunk["usage"] = usage(tracked.num_prompt_tokens, tracked.num_received)
                    await send(chunk)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.frontend.model,
            "object": "model",
            "created": self.frontend.created,
            "owned_by": "llumnix",
            "max_model_len": self.frontend.max_model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        ready = bool(self.frontend.sink_address)
        return web.json_response({"status": "ok" if ready else "starting"}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.frontend.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def abort(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        await self.frontend.abort(request_id)
        return web.json_response({"id": request_id, "aborted": True})


@dataclass
class HttpServer:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(frontend: Frontend, host: str = "127.0.0.1", port: int = 0) -> HttpServer:
    """Serves the API on host:port (0 picks a free port). Handlers are cancelled when their client disconnects."""
    runner = web.AppRunner(HttpApi(frontend).app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return HttpServer(runner, int(bound))
