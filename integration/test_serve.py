"""`llumnix serve` as a subprocess, used the way a person would: the official openai client, llmctl, /metrics.

Streams are compared with reference runs of the same prompt and seed (the sim engine's tokens are a deterministic
function of seed, position and previous token), so a migrated stream with a gap or a duplicate cannot pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pyllumnix.tools.launch import Component, Launcher

pytestmark = pytest.mark.integration

LLMCTL = str(Path(sys.executable).parent / "llmctl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Component]:
    launcher = Launcher(tmp_path_factory.mktemp("serve"))
    serve = launcher.start(
        "serve",
        "serve",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--transport",
        "tcp",
        "--log-dir",
        str(launcher.log_dir / "components"),
        timeout=120,
    )
    try:
        yield serve
    finally:
        assert serve.terminate(30) == 0, serve.log()[-2000:]


def client(cluster: Component) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.ready['http']}/v1", api_key="unused", max_retries=0, timeout=60)


def llmctl(cluster: Component, *args: str) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(cluster.ready["schedulers"])
    return subprocess.run(
        [LLMCTL, "--endpoint", endpoints, *args], capture_output=True, text=True, timeout=120, check=False
    )


def llmctl_json(cluster: Component, *args: str) -> Any:
    done = llmctl(cluster, "--output", "json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reference(cluster: Component, prompt: str, max_tokens: int, seed: int) -> str:
    reply = client(cluster).completions.create(
        model="llama-7b-a10", prompt=prompt, max_tokens=max_tokens, seed=seed, temperature=0
    )
    return reply.choices[0].text


class Stream(threading.Thread):
    """A streaming completion consumed in the background."""

    def __init__(self, cluster: Component, request_id: str, prompt: str, max_tokens: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.request_id, self.prompt, self.max_tokens, self.seed = (
            cluster,
            request_id,
            prompt,
            max_tokens,
            seed,
        )
        self.text = ""
        self.chunks = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            stream = client(self.cluster).completions.create(
                model="llama-7b-a10",
                prompt=self.prompt,
                max_tokens=self.max_tokens,
                seed=self.seed,
                temperature=0,
                stream=True,
                extra_headers={"X-Request-Id": self.request_id},
            )
            for chunk in stream:
                self.started.set()
                self.chunks += 1
                self.text += chunk.choices[0].text
                if chunk.choices[0].finish_reason:
                    self.finish_reason = chunk.choices[0].finish_reason
        except BaseException as exc:
            self.error = exc
            self.started.set()


def instance_of(cluster: Component, request_id: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = llmctl_json(cluster, "requests")
        for entry in listed.get("requests", []):
            if entry["request"]["request_id"] == request_id:
                return str(entry["instance_id"])
        time.sleep(0.2)
    raise AssertionError(f"{request_id} not listed")


def test_openai_client_completions_and_chat(cluster: Component) -> None:
    c = client(cluster)
    models = c.models.list()
    assert [m.id for m in models.data] == ["llama-7b-a10"]
    done = c.completions.create(model="llama-7b-a10", prompt="Hello there", max_tokens=12, seed=3)
    assert done.usage is not None and done.usage.completion_tokens == 12 and done.choices[0].text
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="llama-7b-a10", prompt="Hello there", max_tokens=12, seed=3, stream=True)
    )
    assert streamed == done.choices[0].text
    chat = c.chat.completions.create(
        model="llama-7b-a10", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=1
    )
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens == 8
    parts = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="llama-7b-a10", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=1, stream=True
        )
        if ch.choices
    ]
    assert "".join(parts) == chat.choices[0].message.content


def test_bad_input_gets_openai_errors(cluster: Component) -> None:
    c = client(cluster)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    for bad in (0, -1, 100_000):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="llama-7b-a10", prompt="x", max_tokens=bad)
    request = urllib.request.Request(
        f"{cluster.ready['http']}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert "error" in json.loads(err.value.read())
    assert c.completions.create(model="llama-7b-a10", prompt="still fine", max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]


def test_llmctl_instances_migrate_drain_and_leader_failover(cluster: Component) -> None:
    instances = llmctl_json(cluster, "instances")["instances"]
    assert len(instances) == 4 and all(i["state"] == "INSTANCE_STATE_ACTIVE" for i in instances)
    assert llmctl(cluster, "migrate", "nope", "--to", "instance-0").returncode == 1

    # llmctl migrate: a streaming request moves; its text equals an unmigrated run's (no gap, no duplicate)
    prompt, n, seed = "The quick brown fox jumps", 120, 42
    expected = reference(cluster, prompt, n, seed)
    stream = Stream(cluster, "mig-1", prompt, n, seed)
    stream.start()
    assert stream.started.wait(20)
    source = instance_of(cluster, "mig-1")
    target = next(i["info"]["instance_id"] for i in instances if i["info"]["instance_id"] != source)
    moved = llmctl_json(cluster, "migrate", "mig-1", "--to", target)
    assert moved["outcome"] == "MIGRATION_OUTCOME_COMMITTED", moved
    stream.join(60)
    assert stream.error is None and stream.finish_reason == "length"
    assert stream.text == expected

    # /metrics: freeness per instance, migration counts, the downtime histogram
    time.sleep(1.5)
    metrics = urllib.request.urlopen(f"{cluster.ready['http']}/metrics", timeout=10).read().decode()
    assert 'llumnix_instance_freeness{instance="' in metrics
    committed = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("llumnix_migrations_total") and 'outcome="committed"' in line
    )
    assert committed >= 1
    assert 'llumnix_migration_downtime_seconds_bucket{le="+Inf"}' in metrics

    # llmctl drain: the instance's requests complete elsewhere and it leaves the cluster
    streams = [Stream(cluster, f"drain-{i}", f"request number {i}", 80, i) for i in range(6)]
    references = [reference(cluster, s.prompt, 80, s.seed) for s in streams]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(20)
    victim = instance_of(cluster, "drain-0")
    drained = llmctl(cluster, "drain", victim, "--timeout", "60")
    assert drained.returncode == 0, drained.stderr
    for s, ref in zip(streams, references, strict=True):
        s.join(60)
        assert s.error is None and s.text == ref
    remaining = {i["info"]["instance_id"] for i in llmctl_json(cluster, "instances")["instances"]}
    assert victim not in remaining and len(remaining) == 3

    # killing the scheduler leader mid-stream loses no request
    leader = llmctl_json(cluster, "leader")
    streams = [Stream(cluster, f"fo-{i}", f"failover {i}", 100, 100 + i) for i in range(4)]
    references = [reference(cluster, s.prompt, 100, s.seed) for s in streams]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(20)
    pid = int(
        subprocess.run(
            ["pgrep", "-f", f"replica-id {leader['leader_id']}"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    subprocess.run(["kill", "-9", str(pid)], check=True)
    late = [Stream(cluster, f"late-{i}", f"after failover {i}", 20, 200 + i) for i in range(2)]
    for s in late:
        s.start()
    for s, ref in zip(streams, references, strict=True):
        s.join(60)
        assert s.error is None and s.text == ref
    for s in late:
        s.join(60)
        assert s.error is None and s.finish_reason == "length"
    new_leader = llmctl_json(cluster, "leader")
    assert new_leader["leader_id"] != leader["leader_id"]
