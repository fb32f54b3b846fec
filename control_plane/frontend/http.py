"""OpenAI-compatible HTTP API (aiohttp) over a ``Frontend``.

Routes: POST /v1/completions, POST /v1/chat/completions (streaming SSE or not), GET /v1/models, GET /metrics
(Prometheus), GET /get_load (``{"load": requests in flight, bodies being read included}``, what routers'
load-aware policies poll), POST /v1/requests/{request_id}/abort, and two probes: GET /livez (liveness: 200 while
the event loop runs) and GET /health = GET /readyz (readiness: 200 only when a request could be dispatched now, i.e.
the scheduler leader or the registry bypass has an instance; else 503 with ``{"status", "reason"}``).

Priority: the body field ``"priority": "normal" | "high"`` or the header ``X-Llumnix-Priority: normal | high``; when
both are given the body wins. Request id: an optional ``X-Request-Id`` header names the request (409 if in use); every
response to a request this frontend took on carries ``X-Request-Id`` (its error responses too: a 504 or 500 names the
request a client may look up or abort), which the abort route takes. ``n`` must be 1. Errors are OpenAI-style bodies
``{"error": {"message", "type", "param", "code"}}``: malformed input 400, unknown model or request 404, a body that
does not arrive within the body timeout 408 (the connection is then closed), id in use 409, a body or prompt over the
size caps 413, this frontend's in-flight limit (a request counts from before its body is read), too many large bodies
being read at once, or full instances 429 (with Retry-After),
no capacity (no leader and nothing to bypass to, etcd unreachable) 503 (with Retry-After), a request that got no
output in time 504, a failed request (instance lost) 500. A client that disconnects aborts its request; so does one
that takes nothing from its stream for the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from pyllumnix.control_plane.frontend.core import Frontend, api_key_of
from pyllumnix.control_plane.frontend.dispatch import Readiness
from pyllumnix.control_plane.frontend.errors import (
    BodyTimeoutError,
    FrontendError,
    OverloadedError,
    RequestFailedError,
    RequestTimeoutError,
)
from pyllumnix.control_plane.frontend.openai_schema import (
    ParsedRequest,
    choice,
    envelope,
    error_body,
    finish_reason_name,
    load_json,
    parse_request,
    usage,
)
from pyllumnix.control_plane.frontend.requests import TrackedRequest
from pyllumnix.infra import tracing
from pyllumnix.infra.grpc_server import host_port, local_host
from pyllumnix.infra.security.apikeys import ApiKeyStore, api_key_middleware
from pyllumnix.protos.llumnix.v1 import common_pb2

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/livez", "/readyz", "/health", "/metrics", "/get_load")
"""Paths served without an API key (probes and Prometheus scrapes)."""

PRIORITY_HEADER = "X-Llumnix-Priority"
REQUEST_ID_HEADER = "X-Request-Id"
# The id of the request a handler took on, kept on the aiohttp request for ``openai_errors``' error responses.
_TRACKED_ID = web.RequestKey("llumnix.request_id", str)
# 0: the body cap follows the prompt cap (``body_cap``), instead of a flat few MiB no valid request needs.
DEFAULT_MAX_BODY_BYTES = 0
MIN_BODY_BYTES = 1 << 20
# A body may be this many times the prompt cap: JSON escapes (\uXXXX for non-ASCII text), chat message envelopes,
# stop strings and the other fields around the prompt.
BODY_BYTES_PER_PROMPT_BYTE = 4
# Bodies larger than this are parsed on a worker thread (json.loads of a few MiB takes tens of milliseconds).
OFFLOAD_BODY_BYTES = 64 << 10
# Large bodies (over OFFLOAD_BODY_BYTES, or of unknown length) read and parsed at once; beyond: 429. Each is held in
# memory while read and parsed, and json.loads holds the GIL (the one parse thread competes with the event loop), so
# a few clients uploading big bodies must not be able to stall dispatch for everyone.
LARGE_BODY_SLOTS = 8
# Seconds a client has to send its whole body once its headers are in (beyond: 408 and the connection is closed), so
# a stalled upload does not hold a handler and an in-flight slot forever.
DEFAULT_BODY_TIMEOUT_S = 30.0
# Seconds an idle connection (between requests, or one that has not finished its headers) is kept: aiohttp's default
# is 3630 s, which let a client that never finishes its headers hold a socket for an hour. 75 s: aiohttp's former
# default, above the common load balancers' idle timeouts (60 s), so they close first and never reuse a closing socket.
KEEPALIVE_TIMEOUT_S = 75.0
# Seconds a readiness answer is reused: /health and /readyz are public, and each fresh answer may be an RPC to the
# scheduler leader; load balancers probe every few seconds, so a one-second-old answer loses nothing.
READINESS_CACHE_S = 1.0
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def frontend_error_response(exc: FrontendError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return error_response(exc.http_status, exc.message, exc.openai_type, exc.param, exc.openai_code, headers)


@web.middleware
async def openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI error body, including aiohttp's own (unknown route, wrong method)."""
    try:
        return await handler(request)
    except FrontendError as exc:
        response = frontend_error_response(exc)
        request_id = request.get(_TRACKED_ID)
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        # A 405 must say which methods the resource takes (RFC 9110 15.5.6): keep aiohttp's Allow header.
        allow = exc.headers.get("Allow")
        headers = {"Allow": allow} if allow is not None else None
        return error_response(exc.status, message, "invalid_request_error", code=str(exc.status), headers=headers)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(500, "internal server error", "server_error", code="internal")


# Writes this small to a client whose socket buffer is empty cannot block (see ``HttpApi._stream``).
_UNTIMED_WRITE_BYTES = 16 << 10
_TEXT_MARK = "\x00llumnix-text\x00"
# What ``json.dumps`` calls for a str (with its default ensure_ascii=True): the escaped, quoted ASCII text.
_escape: Callable[[str], str] = json.encoder.encode_basestring_ascii


class _ChunkTemplate:
    """One stream's SSE chunks: a mid-stream chunk (text only, no finish reason) is the pre-rendered JSON around the
    escaped text, byte for byte what ``json.dumps`` of the full chunk gives; the first and last chunks are rendered
    in full. ``created`` is the stream's start (OpenAI streams keep one ``created`` for every chunk)."""

    def __init__(self, request_id: str, model: str, *, chat: bool, include_usage: bool) -> None:
        self.request_id, self.model, self.chat, self.include_usage = request_id, model, chat, include_usage
        self.created = int(time.time())
        whole = json.dumps(self._chunk(_TEXT_MARK, None, first=False))
        mark = json.dumps(_TEXT_MARK)
        head, tail = whole.split(mark)
        self._head, self._tail = "data: " + head, tail + "\n\n"
        # The same pieces as ASCII bytes (json.dumps escapes every non-ASCII character), for ``encode``.
        self._head_b, self._tail_b = self._head.encode("ascii"), self._tail.encode("ascii")

    def envelope(self) -> dict[str, Any]:
        body = envelope(self.request_id, self.model, chat=self.chat, chunk=True)
        body["created"] = self.created
        return body

    def _chunk(self, text: str, reason: str | None, *, first: bool) -> dict[str, Any]:
        body = self.envelope()
        body["choices"] = [choice(text, reason, chat=self.chat, chunk=True, first=first)]
        if self.include_usage:
            body["usage"] = None
        return body

    def render(self, text: str, reason: str | None, first: bool) -> str:
        if first or reason is not None:
            return f"data: {json.dumps(self._chunk(text, reason, first=first))}\n\n"
        return self._head + json.dumps(text) + self._tail

    def encode(self, text: str) -> bytes:
        """``render(text, None, False).encode()``: a mid-stream chunk straight to bytes (the text escaped by json's C
        encoder, as ``json.dumps`` escapes it), the form each streamed token takes on its way to the socket."""
        return b"".join((self._head_b, _escape(text).encode("ascii"), self._tail_b))


def _direct_writer(
    writer: AbstractStreamWriter | None, transport: asyncio.Transport | None
) -> Callable[[bytes], None] | None:
    """A synchronous write of one body piece to ``transport``, framed as ``writer`` (aiohttp's, after ``prepare``)
    frames it: a chunk of the chunked encoding, or the bytes as they are. None where that framing is not known
    (compression, a declared length, another writer): the caller then writes through aiohttp only.

    Why: aiohttp's ``write`` is a coroutine, so a token written through it needs the request's handler task to run;
    this lets the output sink write a token in the same callback that routed it."""
    if not isinstance(writer, StreamWriter) or transport is None:
        return None
    if writer.length is not None or getattr(writer, "_compress", None) is not None:
        return None
    # Headers held back for the first body write (or a per-chunk hook) would be bypassed by a raw transport write: the
    # framing is then not ours to reproduce. aiohttp's server writer sends headers at prepare() and has no hook today.
    if not getattr(writer, "_headers_written", True) or getattr(writer, "_on_chunk_sent", None) is not None:
        return None
    if writer.chunked:
        write = transport.write

        def chunked(data: bytes) -> None:
            write(b"%x\r\n%b\r\n" % (len(data), data))

        return chunked
    return transport.write


def body_cap(max_prompt_bytes: int) -> int:
    """The default body cap for a prompt cap: room for the prompt JSON-escaped and its request around it."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_PROMPT_BYTE * max_prompt_bytes)


class HttpApi:
    """``max_body_bytes``: request body cap (aiohttp answers 413 beyond it, before reading the rest; 0: derived from
    the frontend's prompt cap, :func:`body_cap`); ``body_timeout``: seconds to receive a body (408 beyond)."""

    def __init__(
        self,
        frontend: Frontend,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        api_keys: ApiKeyStore | None = None,
        *,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
        large_body_slots: int = LARGE_BODY_SLOTS,
    ) -> None:
        if not body_timeout > 0 or large_body_slots <= 0:
            raise ValueError("body_timeout and large_body_slots must be positive")
        self.frontend = frontend
        self.max_body_bytes = max_body_bytes or body_cap(frontend.max_prompt_bytes)
        self.api_keys = api_keys
        self.body_timeout = body_timeout
        self.large_body_slots = large_body_slots
        self._large_bodies = 0
        # The last readiness answer (monotonic time, answer) and the check in progress, shared by concurrent probes.
        self._readiness: tuple[float, Readiness] | None = None
        self._readiness_check: asyncio.Task[Readiness] | None = None
        self._logged_reason = ""  # the not-ready reason last logged with its detail (the public one names no address)

    def app(self) -> web.Application:
        middlewares: list[Middleware] = [openai_errors]
        if self.api_keys is not None:
            # Probes and metrics stay open (load balancers and Prometheus have no key); everything else needs one.
            middlewares.append(api_key_middleware(self.api_keys, exempt=PUBLIC_PATHS))
        app = web.Application(middlewares=middlewares, client_max_size=self.max_body_bytes)
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.get("/livez", self.livez),
                web.get("/health", self.health),
                web.get("/readyz", self.health),
                web.get("/metrics", self.metrics),
                web.get("/get_load", self.get_load),
                web.post("/v1/requests/{request_id}/abort", self.abort),
            ]
        )
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _overloaded(self, message: str) -> OverloadedError:
        exc = OverloadedError(message)
        self.frontend.count_rejected(exc)
        return exc

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        # Shed before reading and parsing the body; a request whose body is still arriving holds an in-flight slot
        # (``frontend.reading_body``: the gRPC API's admission and /get_load count it too).
        limit = self.frontend.max_inflight
        if self.frontend.load >= limit:
            raise self._overloaded(f"this frontend is serving its limit of {limit} requests; retry later")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        large = request.content_length is None or request.content_length > OFFLOAD_BODY_BYTES
        if large and self._large_bodies >= self.large_body_slots:
            raise self._overloaded(f"{self.large_body_slots} large request bodies are being read; retry later")
        self._large_bodies += large
        try:
            with self.frontend.reading_body(api_key_of(request)):
                parsed = await self._read_and_parse(request, chat=chat)
        except BodyTimeoutError as exc:
            self.frontend.count_rejected(exc)
            # The rest of the body may still come: this connection cannot carry another request. Close it once the
            # answer is out, rather than aiohttp's lingering read of the rest (up to 10 s more of a stalled client).
            response = frontend_error_response(exc)
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
            return response
        finally:
            self._large_bodies -= large
        # Nothing awaits between here and ``submit`` counting the request: its slot passes on without a gap.
        # A W3C traceparent header makes the request's trace a child of the caller's (tracing on only).
        with tracing.activated(tracing.extract(request.headers)):
            async with self.frontend.open(parsed.inp, owner=api_key_of(request)) as tracked:
                request[_TRACKED_ID] = tracked.request_id
                if parsed.stream:
                    return await self._stream(request, parsed, tracked)
                return await self._complete(parsed, tracked)

    async def _read_and_parse(self, request: web.Request, *, chat: bool) -> ParsedRequest:
        try:
            async with asyncio.timeout(self.body_timeout):
                raw = await request.read()
        except TimeoutError:
            raise BodyTimeoutError(f"the request body did not arrive within {self.body_timeout:g}s") from None

        def parse() -> ParsedRequest:
            return parse_request(
                load_json(raw),
                chat=chat,
                tokenizer=self.frontend.tokenizer,
                max_model_len=self.frontend.max_model_len,
                header_priority=request.headers.get(PRIORITY_HEADER),
                request_id=request.headers.get(REQUEST_ID_HEADER, ""),
            )

        try:
            return await self.frontend.offload(parse) if len(raw) > OFFLOAD_BODY_BYTES else parse()
        except FrontendError as exc:
            self.frontend.count_rejected(exc)
            raise

    async def _complete(self, parsed: ParsedRequest, tracked: TrackedRequest) -> web.Response:
        async for delta in tracked.deltas():
            if tracked.timed_out:
                raise RequestTimeoutError(delta.error)
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
        writer = await response.prepare(request)
        transport = request.transport

        async def write(data: bytes, *, eof: bool = False) -> None:
            # A client that takes nothing for the idle timeout (or past the request's deadline) holds a slot for
            # nothing: it is dropped like one that left (``TrackedRequest.send_limit``). A write can block only once
            # the socket's buffer is past its high-water mark, so the timer is armed only when something is still
            # buffered (a client behind): no timer per token for one that keeps up.
            # ``eof``: ``data`` ends the body (written with the chunked terminator, one send).
            send = response.write_eof if eof else response.write
            if transport is not None and transport.get_write_buffer_size() == 0 and len(data) < _UNTIMED_WRITE_BYTES:
                await send(data)
                return
            limit, why = tracked.send_limit()
            try:
                async with asyncio.timeout(limit):
                    await send(data)
            except TimeoutError:
                log.warning("request %s: %s; dropping it", tracked.request_id, why)
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("client not reading") from None

        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        model = self.frontend.model
        chunks = _ChunkTemplate(tracked.request_id, model, chat=parsed.chat, include_usage=parsed.include_usage)
        first = True
        # A client that keeps up gets each token as the sink routes it (``_direct_writer``): no queue, no task switch.
        direct = _direct_writer(writer, transport)
        if direct is not None and transport is not None:
            is_closing, buffered, encode = transport.is_closing, transport.get_write_buffer_size, chunks.encode

            def take(text: str) -> bool:
                nonlocal first
                if is_closing() or buffered():
                    return False  # behind or gone: the loop below writes it, with the idle timeout
                if text or first:
                    try:
                        direct(chunks.render(text, None, True).encode() if first else encode(text))
                    except Exception:  # runs inside the output sink: never let one client break the push stream
                        log.warning("request %s: direct write failed", tracked.request_id, exc_info=True)
                        return False  # the handler's own write of it says what happened
                    first = False
                return True

            tracked.direct = take
        # A write to a client that left raises; leaving ``Frontend.open`` then aborts the request.
        try:
            with contextlib.suppress(ConnectionResetError):
                ended = False
                # The stream's end (the finishing chunk or the error, usage, [DONE], the body's terminator): one write.
                tail: list[str] = []
                async for batch in tracked.delta_batches():
                    # Every delta already queued goes out in one write (one syscall, one chunked-encoding frame).
                    parts: list[str] = []
                    for delta in batch:
                        if tracked.timed_out:
                            parts.append(event(error_body(delta.error, "timeout_error", code="deadline_exceeded")))
                            ended = True
                            break
                        if delta.finish_reason == common_pb2.FINISH_REASON_ERROR:
                            message = f"request {tracked.request_id} failed: {delta.error or 'engine error'}"
                            parts.append(event(error_body(message, "server_error", code="internal")))
                            ended = True
                            break
                        if not delta.text and not delta.finished and not first:
                            continue
                        parts.append(
                            chunks.render(delta.text, finish_reason_name(delta.finish_reason, delta.finished), first)
                        )
                        first = False
                    if ended or batch[-1].finished:
                        tail = parts
                        break
                    if parts:
                        await write("".join(parts).encode())
                if not ended and parsed.include_usage:
                    chunk = chunks.envelope()
                    chunk["choices"] = []
                    chunk["usage"] = usage(tracked.num_prompt_tokens, tracked.num_received)
                    tail.append(event(chunk))
                tail.append("data: [DONE]\n\n")
                await write("".join(tail).encode(), eof=True)
        finally:
            tracked.direct = None
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

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: answers while the event loop runs; says nothing about the cluster."""
        return web.json_response({"status": "ok"})

    async def health(self, request: web.Request) -> web.Response:
        """Readiness: 200 only when a request could be dispatched now; 503 with the reason otherwise."""
        ready, reason, detail = await self.readiness()
        if detail and reason != self._logged_reason:  # once per new cause (the detail's text varies: durations)
            log.warning("not ready: %s: %s", reason, detail)
        self._logged_reason = reason if not ready else ""
        body = {"status": "ok" if ready else "unavailable", "reason": reason, "inflight": self.frontend.inflight}
        return web.json_response(body, status=200 if ready else 503, headers=None if ready else {"Retry-After": "2"})

    async def readiness(self) -> Readiness:
        """``frontend.readiness()``, reused for READINESS_CACHE_S and shared by concurrent probes (one check at a
        time), so a flood of public probes is not a flood of RPCs to the scheduler leader."""
        cached = self._readiness
        if cached is not None and time.monotonic() - cached[0] < READINESS_CACHE_S:
            return cached[1]
        if self._readiness_check is None:
            self._readiness_check = asyncio.create_task(self._check_readiness())
        # Shielded: a probe whose client leaves (its handler cancelled) must not cancel the check the others wait on.
        return await asyncio.shield(self._readiness_check)

    async def _check_readiness(self) -> Readiness:
        try:
            answer = await self.frontend.readiness()
            self._readiness = (time.monotonic(), answer)
            return answer
        finally:
            self._readiness_check = None

    async def get_load(self, request: web.Request) -> web.Response:
        """The load routers poll (sglang-router / vllm-router ``power_of_two`` read ``load``): requests in flight here,
        so a load-aware router in front of several frontends balances on what each one serves. Requests whose body is
        still being read count (``frontend.load``): each holds an in-flight slot and becomes a request here, so a
        frontend reading 8 large bodies is loaded, not idle, and the value matches what the in-flight limit sheds on."""
        return web.json_response({"load": self.frontend.load})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.frontend.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def abort(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        await self.frontend.abort(request_id, api_key_of(request))
        return web.json_response({"id": request_id, "aborted": True})


@dataclass
class HttpServer:
    runner: web.AppRunner
    port: int
    https: bool = False
    host: str = "127.0.0.1"  # the bind host, as given to start_http

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the API (loopback for a wildcard bind, as RunningServer.address)."""
        local = local_host(self.host)
        return f"{'https' if self.https else 'http'}://{host_port(local, self.port)}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(
    frontend: Frontend,
    host: str = "127.0.0.1",
    port: int = 0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    api_keys: ApiKeyStore | None = None,
    ssl_context: ssl.SSLContext | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
) -> HttpServer:
    """Serves the API on host:port (0 picks a free port). Handlers are cancelled when their client disconnects.

    ``api_keys``: every path but :data:`PUBLIC_PATHS` needs ``Authorization: Bearer <key>`` (401/403 with an OpenAI
    error body otherwise); ``ssl_context``: HTTPS; ``body_timeout``: seconds to receive a request body (408 beyond);
    ``keepalive_timeout``: seconds an idle connection, or one still sending its headers, is kept open.
    """
    app = HttpApi(frontend, max_body_bytes, api_keys, body_timeout=body_timeout).app()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), port, ssl_context=ssl_context)  # a socket takes IPv6 bare
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return HttpServer(runner, int(bound), https=ssl_context is not None, host=host)
