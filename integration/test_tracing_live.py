"""#18 acceptance: one request, migrated mid-stream, followed through ONE trace across real processes.

A live ``llumnix serve`` (secure, the default; two llumlets; TCP data plane) runs with ``LLUMNIX_TRACE_FILE`` naming a
directory, so every process (frontend, scheduler replicas, llumlets) writes its finished spans as JSON lines there. A
streaming completion carries a W3C ``traceparent``; ``llmctl migrate`` moves it to the other instance mid-stream. The
test then reads every process's spans and checks that the request's trace holds: the frontend's request span (a child
of the caller's traceparent), dispatch on the frontend and the scheduler (policy, chosen instance, freeness),
add-request on instance A, its first token there, the migration with each stage and the commit (blocks, bytes,
downtime), the destination's handlers on B, and the finish on B; and that every parent link resolves inside the trace
up to the caller's span.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from integration.test_serve import client, instance_of, llmctl_json
from pyllumnix.tools.launch import Component, Launcher

SVC = "/llumnix.v1.LlumletService/"


class TracedStream(threading.Thread):
    """A streaming completion sent with a W3C traceparent header, consumed in the background."""

    def __init__(self, serve: Component, request_id: str, traceparent: str) -> None:
        super().__init__(daemon=True)
        self.serve, self.request_id, self.traceparent = serve, request_id, traceparent
        self.chunks = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            stream = client(self.serve).completions.create(
                model="llama-7b-a10",
                prompt="follow me through one trace",
                max_tokens=250,
                seed=3,
                temperature=0,
                stream=True,
                extra_headers={"X-Request-Id": self.request_id, "traceparent": self.traceparent},
            )
            for chunk in stream:
                self.started.set()
                self.chunks += 1
                if chunk.choices[0].finish_reason:
                    self.finish_reason = chunk.choices[0].finish_reason
        except BaseException as exc:
            self.error = exc
            self.started.set()


def read_spans(directory: Path, trace_id: str) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["trace_id"] == trace_id:
                    spans.append(record)
    return spans


def test_a_migrated_request_is_one_trace_across_processes(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    launcher = Launcher(tmp_path / "serve")
    serve = launcher.start(
        "serve",
        "serve",
        *("--http-port", "0", "--grpc-port", "0", "--transport", "tcp", "--llumlets", "2"),
        *("--log-dir", str(launcher.log_dir / "components")),
        timeout=120,
        env={"LLUMNIX_INSECURE": "", "LLUMNIX_TRACE_FILE": f"{traces}/"},
    )
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    try:
        stream = TracedStream(serve, "traced-1", f"00-{trace_id}-{caller_span}-01")
        stream.start()
        assert stream.started.wait(30) and stream.error is None, stream.error
        source = instance_of(serve, "traced-1")
        instances = llmctl_json(serve, "instances")["instances"]
        target = next(i["info"]["instance_id"] for i in instances if i["info"]["instance_id"] != source)
        moved = llmctl_json(serve, "migrate", "traced-1", "--to", target)
        assert moved["outcome"] == "MIGRATION_OUTCOME_COMMITTED", moved
        stream.join(90)
        assert stream.error is None and stream.finish_reason == "length", stream.error

        deadline = time.monotonic() + 30  # the frontend's request span ends when it releases the request
        spans = read_spans(traces, trace_id)
        while not any(s["name"] == "llumnix.request" for s in spans) and time.monotonic() < deadline:
            time.sleep(0.2)
            spans = read_spans(traces, trace_id)
    finally:
        assert serve.terminate(30) == 0, serve.log()[-2000:]

    by_id = {s["span_id"]: s for s in spans}
    names = sorted({(s["service"], s["name"]) for s in spans})

    def one(name: str, service_part: str = "") -> dict[str, Any]:
        found = [s for s in spans if s["name"] == name and service_part in s["service"]]
        assert len(found) == 1, (name, service_part, names)
        return found[0]

    def chain(span: dict[str, Any]) -> list[str]:
        """Names from the span's parent up to the trace's root in the files (a broken link fails)."""
        out: list[str] = []
        while span["parent_span_id"] != caller_span:
            assert span["parent_span_id"] in by_id, f"{span['name']} ({span['service']}): parent missing"
            span = by_id[span["parent_span_id"]]
            out.append(f"{span['service'].split('-')[1]}:{span['name']}")
        return out

    # Only the request's own work is in its trace (no background loop that inherited its context).
    allowed = {"llumnix.request", "dispatch", "add_request", "first_token", "finish", "migration"}
    allowed |= {"migration.stage", "migration.commit", "/llumnix.v1.SchedulerService/Dispatch"}
    allowed |= {"/llumnix.v1.OutputSinkService/HandOver"}  # the source asks the frontend to hand the request over
    allowed |= {f"{SVC}{m}" for m in ("AddRequest", "PreAllocate", "TransferStage", "CommitMigration")}
    assert {s["name"] for s in spans} <= allowed, names
    # Every span of the trace leads, link by link, to the caller's traceparent.
    for s in spans:
        chain(s)
    request = one("llumnix.request", "frontend")
    assert request["parent_span_id"] == caller_span
    assert request["attributes"]["llumnix.request_id"] == "traced-1"
    assert request["attributes"]["llumnix.finish"] == "length"
    assert [e["name"] for e in request["events"]] == ["first_token", "finish"]
    # Dispatch: the frontend's call, the scheduler's decision under it.
    decision = one("dispatch", "scheduler")
    assert decision["attributes"]["llumnix.instance_id"] == source
    assert decision["attributes"]["llumnix.dispatch.policy"]
    assert isinstance(decision["attributes"]["llumnix.freeness"], float)
    assert chain(decision) == [
        "scheduler:/llumnix.v1.SchedulerService/Dispatch",
        "frontend:dispatch",
        "frontend:llumnix.request",
    ]
    # Instance A: add-request and the first token.
    added = one(f"{SVC}AddRequest", source)
    assert chain(added) == ["frontend:add_request", "frontend:llumnix.request"]
    first = one("first_token", source)
    assert by_id[first["parent_span_id"]] is added
    # The migration on A: stages and commit, with blocks, bytes and downtime.
    migration = one("migration", source)
    assert by_id[migration["parent_span_id"]] is added
    assert migration["attributes"]["llumnix.outcome"] == "MIGRATION_OUTCOME_COMMITTED"
    assert migration["attributes"]["llumnix.destination"] == target
    assert migration["attributes"]["llumnix.bytes"] > 0 and migration["attributes"]["llumnix.downtime_ms"] > 0
    stages = [s for s in spans if s["name"] == "migration.stage"]
    assert stages and all(by_id[s["parent_span_id"]] is migration for s in stages)
    assert sum(s["attributes"].get("llumnix.bytes", 0) for s in stages) == migration["attributes"]["llumnix.bytes"]
    assert all(s["attributes"]["llumnix.blocks"] >= 0 for s in stages)
    commit = one("migration.commit", source)
    assert by_id[commit["parent_span_id"]] is migration and commit["attributes"]["llumnix.downtime_ms"] > 0
    # Instance B: the handlers of A's calls, then the finish.
    for handler in ("PreAllocate", "TransferStage"):
        calls = [s for s in spans if s["name"] == f"{SVC}{handler}"]
        assert calls and all(target in s["service"] for s in calls), handler
        assert all(by_id[s["parent_span_id"]]["name"] == "migration.stage" for s in calls), handler
    installed = one(f"{SVC}CommitMigration", target)
    assert by_id[installed["parent_span_id"]] is commit
    finish = one("finish", target)
    assert finish["attributes"]["llumnix.finish"] == "length" and finish["attributes"]["llumnix.tokens"] == 250
    assert chain(finish) == [
        f"llumlet:{SVC}CommitMigration",
        "llumlet:migration.commit",
        "llumlet:migration",
        f"llumlet:{SVC}AddRequest",
        "frontend:add_request",
        "frontend:llumnix.request",
    ]
    assert not [s for s in spans if s["name"] == "finish" and source in s["service"]], "it finished on B only"
