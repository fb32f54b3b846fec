"""#18 tracing in one process with the SDK's in-memory exporter, across real gRPC servers: two llumlets, a request
added under a caller's trace and migrated mid-stream, followed from AddRequest through the migration's stages and
commit to its finish on the destination, with every parent link intact; and tracing off costs nothing (no
interceptor, non-recording spans). The whole chain across real processes (HTTP frontend, scheduler, two llumlets) is
``integration/test_tracing_live.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pyllumnix.infra import tracing
from pyllumnix.infra.grpc_server import start_server
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_device_migration import make_node, migrate, settle
from tests.test_frontend_fakes import MODEL, FakeLlumlet, running_stack
from tests.test_frontend_grpc import generate_request
from tests.test_migration_paths import request, unmigrated_tokens, wait_tokens

OUTCOME = llumlet_pb2.MigrationOutcome


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("test", exporter=exporter, environ={})
    try:
        yield exporter
    finally:
        tracing.shutdown()


def by_id(finished: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in finished if s.context is not None}


def ancestors(span: ReadableSpan, index: dict[int, ReadableSpan]) -> list[str]:
    """Names from ``span``'s parent up to the root; fails on a parent that is not among the spans (a broken link)."""
    names: list[str] = []
    current = span
    while current.parent is not None and current.parent.span_id in index:
        current = index[current.parent.span_id]
        names.append(current.name)
    return names


def named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def test_tracing_off_installs_nothing() -> None:
    assert not tracing.configure("test", environ={})
    assert not tracing.enabled()
    assert tracing.client_interceptors() == [] and tracing.server_interceptors() == []
    s = tracing.start_span("x")
    assert not s.is_recording() and s is trace.INVALID_SPAN
    assert tracing.current_context() is None
    assert tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None


def test_file_exporter_from_the_environment(tmp_path: Path) -> None:
    """``LLUMNIX_TRACE_FILE`` naming a directory: one JSON-lines file per process, one span a line."""
    try:
        assert tracing.configure("svc/a", environ={tracing.FILE_ENV: f"{tmp_path}/"})
        with tracing.span("outer", attributes={"k": 1}), tracing.span("inner"):
            pass
    finally:
        tracing.shutdown()
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("svc_a-") and path.suffix == ".jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    inner, outer = records
    assert (inner["name"], outer["name"]) == ("inner", "outer")
    assert inner["parent_span_id"] == outer["span_id"] and inner["trace_id"] == outer["trace_id"]
    assert outer["parent_span_id"] == "" and outer["attributes"] == {"k": 1} and outer["service"] == "svc/a"


async def test_w3c_traceparent_continues_across_a_grpc_hop(spans: InMemorySpanExporter) -> None:
    """A caller's traceparent (as an HTTP client would send it) is extracted, carried by the client interceptor, and
    continued by the server interceptor; a call without one makes no server span."""
    server = await start_server([])
    try:
        parent = tracing.extract({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
        assert parent is not None
        async with open_channel(server.address, peer=None) as channel:
            health = channel.unary_unary("/grpc.health.v1.Health/Check")
            await health(b"")  # untraced: no span
            with tracing.activated(parent), tracing.span("client"):
                await health(b"")
    finally:
        await server.stop(None)
    finished = spans.get_finished_spans()
    client, served = named(finished, "client")[0], named(finished, "/grpc.health.v1.Health/Check")
    assert len(served) == 1, "only the traced call has a server span"
    assert served[0].kind == trace.SpanKind.SERVER
    assert served[0].parent is not None and served[0].parent.span_id == client.context.span_id
    assert served[0].context.trace_id == client.context.trace_id == int("ab" * 16, 16)
    assert client.parent is not None and client.parent.span_id == int("cd" * 8, 16)


async def test_a_migrated_request_is_one_trace_from_add_to_finish(
    spans: InMemorySpanExporter, sink: RecordingSink
) -> None:
    a, b = await make_node("a", "tcp"), await make_node("b", "tcp")
    try:
        async with open_channel(
            a.server.address, peer=None
        ) as channel:  # the product's channel: it carries the context
            stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
            with tracing.span("caller") as caller:
                await stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 5)
        # The scheduler's order carries no trace: the migration joins the request's own.
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(100, 400)
        await settle(a, b)
    finally:
        await a.close()
        await b.close()
    finished = spans.get_finished_spans()
    trace_id = caller.get_span_context().trace_id
    ours = tuple(s for s in finished if s.context.trace_id == trace_id)
    index = by_id(ours)
    # Every parent link resolves inside the trace, up to the caller's span.
    for s in ours:
        assert s.name == "caller" or ancestors(s, index)[-1:] == ["caller"], (s.name, ancestors(s, index))
    svc = "/llumnix.v1.LlumletService/"
    (finish,) = named(ours, "finish")
    assert finish.attributes is not None and finish.attributes["llumnix.instance_id"] == "b"
    assert finish.attributes["llumnix.tokens"] == 400 and finish.attributes["llumnix.finish"] == "length"
    assert ancestors(finish, index) == [
        f"{svc}CommitMigration",
        "migration.commit",
        "migration",
        f"{svc}AddRequest",
        "caller",
    ]
    (first,) = named(ours, "first_token")
    assert first.attributes is not None and first.attributes["llumnix.instance_id"] == "a"
    assert ancestors(first, index) == [f"{svc}AddRequest", "caller"]
    (migration,) = named(ours, "migration")
    attrs: Any = migration.attributes
    assert attrs["llumnix.outcome"] == "MIGRATION_OUTCOME_COMMITTED" and attrs["llumnix.destination"] == "b"
    assert attrs["llumnix.bytes"] == result.bytes_sent and attrs["llumnix.downtime_ms"] > 0
    stages = named(ours, "migration.stage")
    assert len(stages) == result.stages >= 1
    stage_bytes: list[Any] = [(s.attributes or {}).get("llumnix.bytes", 0) for s in stages]
    assert sum(stage_bytes) == result.bytes_sent
    assert [(s.attributes or {}).get("llumnix.last") for s in stages][-1] is True
    for s in stages:
        assert ancestors(s, index)[:1] == ["migration"]
    # The destination's handlers are children of the stage (reserve + transfer) or the commit that called them.
    for name, parent in (("PreAllocate", "migration.stage"), ("TransferStage", "migration.stage")):
        calls = named(ours, f"{svc}{name}")
        assert calls and all(ancestors(c, index)[0] == parent for c in calls), name
    (commit,) = named(ours, "migration.commit")
    assert (commit.attributes or {}).get("llumnix.downtime_ms") == pytest.approx(result.downtime_ms)
    assert not [s for s in finished if s.context.trace_id != trace_id and s.name.startswith(svc)], (
        "calls outside the request's trace (load reports, output pushes) make no spans"
    )


async def test_no_grpc_interceptor_when_off() -> None:
    """A channel opened with tracing off has no interceptor (no per-call cost)."""
    assert not tracing.enabled()
    async with open_channel("127.0.0.1:1", peer=None) as channel:
        assert not getattr(channel, "_unary_unary_interceptors", None)
    exporter = InMemorySpanExporter()
    tracing.configure("test", exporter=exporter, environ={})
    try:
        async with open_channel("127.0.0.1:1", peer=None) as channel:
            assert getattr(channel, "_unary_unary_interceptors", None), "the check above can fail"
    finally:
        tracing.shutdown()


def test_an_otlp_endpoint_turns_tracing_on_with_a_batching_exporter() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        assert tracing.configure("svc", environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"})
        provider: Any = tracing._state.provider
        processors = provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [BatchSpanProcessor]
        assert isinstance(processors[0].span_exporter, OTLPSpanExporter)
    finally:
        tracing.shutdown()


def request_tree(finished: tuple[ReadableSpan, ...], trace_id: int, caller: int) -> dict[str, list[str]]:
    """Each span of the trace -> its ancestors' names, checking every link resolves up to the caller's span id."""
    ours = tuple(s for s in finished if s.context.trace_id == trace_id)
    index = by_id(ours)
    tree: dict[str, list[str]] = {}
    for s in ours:
        top = s
        while top.parent is not None and top.parent.span_id in index:
            top = index[top.parent.span_id]
        assert top.parent is not None and top.parent.span_id == caller, (s.name, "does not lead to the caller")
        tree[s.name] = ancestors(s, index)
    return tree


EXPECTED_FRONTEND_TREE = {
    "llumnix.request": [],
    "dispatch": ["llumnix.request"],
    "add_request": ["llumnix.request"],
    "/llumnix.v1.LlumletService/AddRequest": ["add_request", "llumnix.request"],
}


async def test_grpc_frontend_continues_a_callers_traceparent(spans: InMemorySpanExporter) -> None:
    trace_id, caller = int("12" * 16, 16), int("34" * 8, 16)
    metadata = (("traceparent", f"00-{trace_id:032x}-{caller:016x}-01"),)
    async with running_stack([FakeLlumlet("i-1", delay=0.001)]) as stack:
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            stub = frontend_pb2_grpc.FrontendServiceStub(channel)
            call = stub.Generate(generate_request(max_tokens=3, request_id="t-1"), metadata=metadata, timeout=10)
            replies = [r async for r in call]
        assert replies[-1].finished
    finished = spans.get_finished_spans()
    tree = request_tree(finished, trace_id, caller)
    generate = "/llumnix.v1.FrontendService/Generate"
    assert tree == {generate: [], **{k: [*v, generate] for k, v in EXPECTED_FRONTEND_TREE.items()}}, tree
    (request,) = named(finished, "llumnix.request")
    assert [e.name for e in request.events] == ["first_token", "finish"]
    assert (request.attributes or {}).get("llumnix.instance_id") == "i-1"


async def test_http_frontend_continues_a_callers_traceparent(spans: InMemorySpanExporter) -> None:
    trace_id, caller = int("56" * 16, 16), int("78" * 8, 16)
    headers = {"traceparent": f"00-{trace_id:032x}-{caller:016x}-01"}
    async with running_stack([FakeLlumlet("i-1", delay=0.001)]) as stack, aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
        async with session.post(f"{stack.http.url}/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    tree = request_tree(spans.get_finished_spans(), trace_id, caller)
    assert tree == EXPECTED_FRONTEND_TREE, tree


async def test_a_refused_migration_shows_in_the_trace_with_its_reason(
    spans: InMemorySpanExporter, sink: RecordingSink
) -> None:
    a, b = await make_node("a", "inproc"), await make_node("b", "inproc", block_size=32)
    try:
        async with open_channel(a.server.address, peer=None) as channel:
            with tracing.span("caller") as caller:
                await llumlet_pb2_grpc.LlumletServiceStub(channel).AddRequest(request("r", sink, 60, 100))
        await wait_tokens(sink, "r", 2)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        await sink.wait("r")
        await settle(a, b)
    finally:
        await a.close()
        await b.close()
    trace_id = caller.get_span_context().trace_id
    ours = tuple(s for s in spans.get_finished_spans() if s.context.trace_id == trace_id)
    (migration,) = named(ours, "migration")
    attrs: Any = migration.attributes
    assert attrs["llumnix.outcome"] == "MIGRATION_OUTCOME_ABORTED_BY_DESTINATION"
    assert "KV cache layouts differ" in attrs["llumnix.reason"]
    (stage,) = named(ours, "migration.stage")
    assert "FAILED_PRECONDITION" in str((stage.attributes or {}).get("llumnix.error"))
    (refused,) = named(ours, "/llumnix.v1.LlumletService/PreAllocate")
    assert refused.status.status_code.name == "ERROR", "the destination's refusal is an error span"
    (finish,) = named(ours, "finish")
    assert (finish.attributes or {}).get("llumnix.instance_id") == "a", "it finished on the source"
    assert not named(ours, "migration.commit")
