"""OpenTelemetry tracing across the system's processes: off by default at no cost, W3C ``traceparent`` on every hop.

Why here: a slow request crosses the HTTP or gRPC frontend, the scheduler's dispatch, one instance, maybe a live
migration to another, and ends there; only one trace with intact parent links shows where its time went. Every
process calls ``configure`` once at start-up (before its servers and channels exist). Tracing is on when an exporter
is configured, from the environment:

- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``: OTLP over gRPC (batched), the standard
  variables of the OpenTelemetry SDK (``OTEL_EXPORTER_OTLP_*`` headers, certificates and so on apply too);
- ``LLUMNIX_TRACE_FILE``: JSON lines, one finished span a line (tests, and a trace without a collector). A path
  ending in ``/`` (or an existing directory) gets one ``<service>-<pid>.jsonl`` per process.

Off (neither set), ``configure`` installs nothing: no interceptor is added to any server or channel, ``span`` hands
out the API's non-recording span, and the hot paths check ``enabled()`` (a module flag) before doing any work.

Propagation is W3C Trace Context (``traceparent``/``tracestate``): the server interceptor continues a trace a caller
sent, and makes no span for calls that carry none (load reports, health checks, polls are not traced on their own);
the client interceptor adds the current context to every outgoing call. The request's own spans (dispatch,
add-request, migration stages and commit, first token, finish) are made where those things happen, as children of
the request's context, which each instance keeps with the request (``RequestOwner.trace``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger(__name__)

FILE_ENV = "LLUMNIX_TRACE_FILE"
OTLP_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACER_NAME = "pyllumnix"
_PROPAGATED = ("traceparent", "tracestate")


class _State:
    """This process's tracing set-up (one per process: the SDK's provider is process-wide too)."""

    enabled = False
    provider: TracerProvider | None = None
    tracer: trace.Tracer = trace.NoOpTracer()


_state = _State()

Context = otel_context.Context


# ---------------------------------------------------------------------------------------------- exporters
def span_record(span: ReadableSpan, service: str) -> dict[str, Any]:
    """One finished span as plain data (what the JSON-lines exporter writes): ids in W3C hex."""
    ctx = span.context
    parent = span.parent
    return {
        "name": span.name,
        "service": service,
        "trace_id": f"{ctx.trace_id:032x}" if ctx is not None else "",
        "span_id": f"{ctx.span_id:016x}" if ctx is not None else "",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else "",
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "ts_ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events],
    }


class JsonLinesExporter(SpanExporter):
    """Appends each finished span as one JSON line (one ``write`` a span, so processes may share a file)."""

    def __init__(self, path: str | Path, service: str) -> None:
        self.path = Path(path)
        self.service = service
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s, self.service), default=str) + "\n" for s in spans).encode()
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            os.write(self._fd, data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def trace_file_path(value: str, service: str) -> Path:
    """``LLUMNIX_TRACE_FILE``'s file for this process (a directory gets one file per process)."""
    path = Path(value)
    if value.endswith("/") or path.is_dir():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in service)
        return path / f"{safe}-{os.getpid()}.jsonl"
    return path


# ---------------------------------------------------------------------------------------------- set-up
def configure(
    service: str,
    *,
    exporter: SpanExporter | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Turns tracing on for this process when an exporter is configured (``exporter``, else the environment: module
    docstring); returns whether it is on. Idempotent: a second call only adds a given ``exporter`` (tests)."""
    env = os.environ if environ is None else environ
    processors: list[Any] = []
    if exporter is not None:
        processors.append(SimpleSpanProcessor(exporter))
    if _state.provider is None:
        file = env.get(FILE_ENV, "")
        if file:
            processors.append(SimpleSpanProcessor(JsonLinesExporter(trace_file_path(file, service), service)))
        if any(env.get(k) for k in OTLP_ENVS):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))  # reads the OTEL_EXPORTER_OTLP_* variables
    if not processors:
        return _state.enabled
    if _state.provider is None:
        _state.provider = TracerProvider(
            resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service)})
        )
        _state.tracer = _state.provider.get_tracer(TRACER_NAME)
    for processor in processors:
        _state.provider.add_span_processor(processor)
    _state.enabled = True
    log.info("tracing on for %s", service)
    return True


def shutdown() -> None:
    """Flushes and stops the exporters (a process's exit path; a no-op when tracing is off)."""
    if _state.provider is not None:
        _state.provider.shutdown()
    _state.enabled, _state.provider, _state.tracer = False, None, trace.NoOpTracer()


def enabled() -> bool:
    return _state.enabled


def tracer() -> trace.Tracer:
    return _state.tracer


# ---------------------------------------------------------------------------------------------- spans
def current_context() -> Context | None:
    """The active context to keep with a request (None when tracing is off or no span is active)."""
    if not _state.enabled:
        return None
    ctx = otel_context.get_current()
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def start_span(
    name: str, parent: Context | None = None, attributes: Mapping[str, Any] | None = None, *, root: bool = False
) -> Span:
    """A span to end later (``span.end()``): a child of ``parent`` (default: the active context). ``root`` starts a
    new trace when ``parent`` is None instead of continuing the active one."""
    if not _state.enabled:
        return trace.INVALID_SPAN
    ctx = parent if parent is not None else (otel_context.Context() if root else None)
    return _state.tracer.start_span(name, context=ctx, attributes=dict(attributes or {}))


# What ``span`` and ``activated`` hand out when there is nothing to do: shared, reusable, no generator per call.
_NO_SPAN: contextlib.AbstractContextManager[Span] = contextlib.nullcontext(trace.INVALID_SPAN)
_NOTHING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def span(
    name: str, parent: Context | None = None, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span]:
    """A span active for the block (a child of ``parent``, default the active context); free when off."""
    if not _state.enabled:
        return _NO_SPAN
    return _state.tracer.start_as_current_span(name, context=parent, attributes=dict(attributes or {}))


def activated(s: Span | Context | None) -> contextlib.AbstractContextManager[None]:
    """Makes ``s`` (a span, or a kept context) the active context for the block, so calls made inside carry it."""
    if not _state.enabled or s is None:
        return _NOTHING
    return _attached(s if isinstance(s, otel_context.Context) else trace.set_span_in_context(s))


@contextlib.contextmanager
def _attached(ctx: Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def context_of(s: Span) -> Context | None:
    """The context whose children ``s``'s children are (None when ``s`` does not record)."""
    return trace.set_span_in_context(s) if _state.enabled and s.get_span_context().is_valid else None


def event(s: Span | None, name: str, attributes: Mapping[str, Any] | None = None, ts: float | None = None) -> None:
    """Adds an event to ``s`` (``ts``: seconds since the epoch; default now)."""
    if s is None or not s.is_recording():
        return
    s.add_event(name, dict(attributes or {}), timestamp=int(ts * 1e9) if ts is not None else None)


def set_attributes(attributes: Mapping[str, Any], s: Span | None = None) -> None:
    """Sets attributes on ``s`` (default: the active span, e.g. a server span the interceptor made)."""
    if not _state.enabled:
        return
    target = s if s is not None else trace.get_current_span()
    if target.is_recording():
        target.set_attributes({k: v for k, v in attributes.items() if v is not None})


def extract(headers: Mapping[str, str]) -> Context | None:
    """The context a caller sent in W3C headers (an HTTP request's), None when it sent none or tracing is off."""
    if not _state.enabled:
        return None
    carrier = {k.lower(): v for k, v in headers.items() if k.lower() in _PROPAGATED}
    if "traceparent" not in carrier:
        return None
    ctx = propagate.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


# ---------------------------------------------------------------------------------------------- gRPC
def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if "traceparent" not in carrier:
        return details
    pairs = [(k, v) for k, v in (details.metadata or ()) if k not in _PROPAGATED]
    metadata = grpc.aio.Metadata(*pairs, *carrier.items())
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_context(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_context(client_call_details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_context(client_call_details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_context(client_call_details), request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send the active trace context with every call; none when tracing is off."""
    if not _state.enabled:
        return []
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]


async def _settle(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def _traced(handler: grpc.RpcMethodHandler, method: str, parent: Context) -> grpc.RpcMethodHandler:
    """``handler`` with every behaviour run inside a server span, a child of the caller's context."""

    def unary(behavior: Callable[..., Any]) -> Callable[[Any, Any], Awaitable[Any]]:
        async def run(request: Any, context: Any) -> Any:
            with _state.tracer.start_as_current_span(method, context=parent, kind=SpanKind.SERVER):
                return await _settle(behavior(request, context))

        return run

    def streaming(behavior: Callable[..., Any]) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def run(request: Any, context: Any) -> AsyncIterator[Any]:
            with _state.tracer.start_as_current_span(method, context=parent, kind=SpanKind.SERVER):
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write
                    await _settle(result)

        return run

    h: Any = handler
    if h.unary_unary is not None:
        return h._replace(unary_unary=unary(h.unary_unary))
    if h.stream_unary is not None:
        return h._replace(stream_unary=unary(h.stream_unary))
    if h.unary_stream is not None:
        return h._replace(unary_stream=streaming(h.unary_stream))
    if h.stream_stream is not None:
        return h._replace(stream_stream=streaming(h.stream_stream))
    return handler


class TraceServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Continues a caller's trace: a server span for each call that carries ``traceparent``, nothing otherwise."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        carrier = {str(k): str(v) for k, v in metadata if k in _PROPAGATED}
        if handler is None or "traceparent" not in carrier:
            return handler
        parent = propagate.extract(carrier)
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return handler
        return _traced(handler, handler_call_details.method, parent)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The interceptor continuing callers' traces; none when tracing is off."""
    return [TraceServerInterceptor()] if _state.enabled else []
