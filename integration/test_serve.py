"""`llumnix serve` as a subprocess, used the way a person would: the official openai client, llmctl, /metrics.

Streams are compared with reference runs of the same prompt and seed (the sim engine's tokens are a deterministic
function of seed, position and previous token), so a migrated stream with a gap or a duplicate cannot pass.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from integration.cluster import leader_of, set_harness_pki
from pyllumnix.clients import LlumnixClient
from pyllumnix.clients.client import tls_from_context
from pyllumnix.infra.security.bootstrap import RBAC_FILE
from pyllumnix.infra.security.context import ClientContext, load_context
from pyllumnix.infra.security.runtime import open_local_pki
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
        env={"LLUMNIX_INSECURE": ""},  # secure, the default: PKI, TLS etcd, API keys, the client context file
    )
    rbac = Path(serve.ready["tls_dir"]) / RBAC_FILE
    assert rbac.exists(), "serve turned etcd auth on"
    try:
        yield serve
    finally:
        assert serve.terminate(30) == 0, serve.log()[-2000:]
    # Its etcd is gone: a certificate issued later from this folder must not wait on that etcd's users (review 9 F8).
    assert not rbac.exists()


def context() -> ClientContext:
    """What serve wrote for its users: endpoints, the CA, the admin certificate and API key."""
    ctx = load_context()
    assert ctx is not None, "serve wrote no client context"
    return ctx


def client(cluster: Component) -> openai.OpenAI:
    key = context().api_key
    return openai.OpenAI(base_url=f"{cluster.ready['http']}/v1", api_key=key, max_retries=0, timeout=60)


def llmctl(cluster: Component, *args: str) -> subprocess.CompletedProcess[str]:
    endpoints = ",".join(cluster.ready["schedulers"])
    ctx = context()
    tls = ["--ca", str(ctx.ca), "--cert", str(ctx.cert), "--key", str(ctx.key)]
    return subprocess.run(
        [LLMCTL, "--endpoint", endpoints, *tls, *args], capture_output=True, text=True, timeout=120, check=False
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


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``check`` until it returns something truthy; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def serve_status(cluster: Component) -> dict[str, Any]:
    """serve.json: every component serve runs, with its pid (tests signal processes by these pids only)."""
    data: dict[str, Any] = json.loads(Path(cluster.ready["status_file"]).read_text())
    return data


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class GrpcStream(threading.Thread):
    """A completion streamed over the frontend's gRPC Generate, recording which instance produced each chunk and
    checking the token indices: every chunk must start exactly where the previous one ended (no gap, no duplicate)."""

    def __init__(self, cluster: Component, request_id: str, prompt: str, max_tokens: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.request_id, self.prompt, self.max_tokens, self.seed = (
            cluster,
            request_id,
            prompt,
            max_tokens,
            seed,
        )
        self.token_ids: list[int] = []
        self.instances: list[str] = []
        self.index_errors: list[str] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            tls = tls_from_context(context())
            with LlumnixClient(frontend_endpoints=self.cluster.ready["grpc"], timeout=30, tls=tls) as c:
                for chunk in c.generate(
                    self.prompt,
                    max_tokens=self.max_tokens,
                    seed=self.seed,
                    ignore_eos=True,
                    request_id=self.request_id,
                    timeout=120,
                ):
                    if chunk.token_ids and chunk.first_token_index != len(self.token_ids):
                        self.index_errors.append(f"chunk at {chunk.first_token_index}, held {len(self.token_ids)}")
                    self.token_ids.extend(chunk.token_ids)
                    if chunk.instance_id and (not self.instances or self.instances[-1] != chunk.instance_id):
                        self.instances.append(chunk.instance_id)
                    if chunk.token_ids:
                        self.started.set()
                    if chunk.finished:
                        self.finish_reason = chunk.finish_reason
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def grpc_reference(cluster: Component, prompt: str, max_tokens: int, seed: int) -> list[int]:
    with LlumnixClient(frontend_endpoints=cluster.ready["grpc"], timeout=30, tls=tls_from_context(context())) as c:
        result = c.generate_text(prompt, max_tokens=max_tokens, seed=seed, ignore_eos=True, timeout=120)
    return result.token_ids


def instance_of(cluster: Component, request_id: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = llmctl_json(cluster, "requests")
        for entry in listed.get("requests", []):
            if entry["request"]["request_id"] == request_id:
                return str(entry["instance_id"])
        time.sleep(0.1)
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
        f"{cluster.ready['http']}/v1/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {context().api_key}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert "error" in json.loads(err.value.read())
    assert c.completions.create(model="llama-7b-a10", prompt="still fine", max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]


def test_llmctl_instances_and_migrate(cluster: Component) -> None:
    instances = llmctl_json(cluster, "instances")["instances"]
    assert len(instances) == 4 and all(i["state"] == "INSTANCE_STATE_ACTIVE" for i in instances)
    assert llmctl(cluster, "migrate", "nope", "--to", "instance-0").returncode == 1

    # llmctl migrate: a streaming request moves; its text equals an unmigrated run's (no gap, no duplicate)
    # 400 tokens: the stream still runs after the llmctl calls that find and move it, also on a loaded host
    prompt, n, seed = "The quick brown fox jumps", 400, 42
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

    # /metrics: freeness per instance, migration counts, the downtime histogram (polled: the leader's figures reach
    # the frontend's /metrics on its next refresh)
    def committed_metrics() -> str | None:
        metrics = urllib.request.urlopen(f"{cluster.ready['http']}/metrics", timeout=10).read().decode()
        committed = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("llumnix_migrations_total") and 'outcome="committed"' in line
        )
        return metrics if committed >= 1 else None

    metrics = wait_for(committed_metrics, 15, "a committed migration in /metrics")
    assert 'llumnix_instance_freeness{instance="' in metrics
    assert 'llumnix_migration_downtime_seconds_bucket{le="+Inf"}' in metrics


def test_drain_migrates_running_requests_and_the_llumlet_exits(cluster: Component) -> None:
    """llmctl drain: the drained instance's running requests move to other instances (their streams show the change
    of instance, token-exact), and the drained llumlet process exits (serve does not restart a clean exit)."""
    specs = [(f"drain-{i}", f"request number {i}", 200, i) for i in range(6)]
    with ThreadPoolExecutor(len(specs)) as pool:
        references = list(pool.map(lambda sp: grpc_reference(cluster, sp[1], sp[2], sp[3]), specs))
    streams = [GrpcStream(cluster, *sp) for sp in specs]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(20) and s.error is None, s.error
    victim = instance_of(cluster, "drain-0")
    victim_pid = next(c["pid"] for c in serve_status(cluster)["components"] if c["instance_id"] == victim)
    on_victim = [
        entry["request"]["request_id"] for entry in llmctl_json(cluster, "requests", "--instance", victim)["requests"]
    ]
    assert "drain-0" in on_victim
    drained = llmctl(cluster, "drain", victim, "--timeout", "60")
    assert drained.returncode == 0, drained.stderr
    for s, ref in zip(streams, references, strict=True):
        s.join(60)
        assert not s.is_alive(), f"{s.request_id} hangs"
        assert s.error is None and s.finish_reason == "length", (s.request_id, s.error)
        assert not s.index_errors, (s.request_id, s.index_errors)
        assert s.token_ids == ref, f"{s.request_id}: tokens differ from an undisturbed run"
    moved = [s for s in streams if s.instances[0] == victim]
    assert moved and all(len(s.instances) == 2 and s.instances[1] != victim for s in moved), [
        (s.request_id, s.instances) for s in streams
    ]
    # every request still on the victim when the drain began finished elsewhere
    assert all(s.instances[-1] != victim for s in streams if s.request_id in on_victim)
    wait_for(lambda: pid_gone(victim_pid), 30, f"the drained llumlet (pid {victim_pid}) to exit")
    remaining = {i["info"]["instance_id"] for i in llmctl_json(cluster, "instances")["instances"]}
    assert victim not in remaining and len(remaining) == 3
    entry = next(c for c in serve_status(cluster)["components"] if c["pid"] == victim_pid)
    assert entry["last_exit"] == "exit code 0" and entry["state"] == "stopped" and entry["restarts"] == 0, entry


def test_leader_killed_under_continuous_load(cluster: Component) -> None:
    """SIGKILL the scheduler leader (found by its pid in serve.json) while requests flow through the real frontend:
    every request finishes token-exact or gets a clear error, none hangs, and the standby leads well within the
    design's 3 s."""
    prompts = [(f"continuous load {i}", 8, 300 + i) for i in range(4)]
    expected = {p: reference(cluster, p, n, seed) for p, n, seed in prompts}
    stop = threading.Event()
    results: list[tuple[float, float, str, str]] = []  # (start, end, outcome, detail)
    lock = threading.Lock()

    def worker(k: int) -> None:
        c = openai.OpenAI(base_url=f"{cluster.ready['http']}/v1", api_key=context().api_key, max_retries=0, timeout=30)
        i = k
        while not stop.is_set():
            prompt, n, seed = prompts[i % len(prompts)]
            i += 1
            t0 = time.monotonic()
            try:
                reply = c.completions.create(
                    model="llama-7b-a10", prompt=prompt, max_tokens=n, seed=seed, temperature=0
                )
                text = reply.choices[0].text
                outcome, detail = ("ok", "") if text == expected[prompt] else ("mismatch", text)
            except openai.APITimeoutError as exc:
                outcome, detail = "hang", str(exc)
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                message = body.get("message") or body.get("error", {}).get("message", "")
                outcome, detail = ("error", f"{exc.status_code}: {message}") if message else ("unclear", repr(exc))
            except Exception as exc:
                outcome, detail = "unclear", repr(exc)
            with lock:
                results.append((t0, time.monotonic(), outcome, detail))

    status = serve_status(cluster)
    leader = llmctl_json(cluster, "leader")
    old = next(c for c in status["components"] if c["name"] == leader["leader_id"])
    standby = next(c for c in status["components"] if c["kind"] == "scheduler" and c["name"] != old["name"])
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(1 for r in results if r[2] == "ok") >= 6, 30, "load to flow before the kill")
    t_kill = time.monotonic()
    os.kill(old["pid"], signal.SIGKILL)

    async def takeover() -> float:
        while True:
            reply = await leader_of([standby["address"]], timeout=10)
            if reply.leader_id == standby["name"]:
                return time.monotonic() - t_kill
            assert time.monotonic() - t_kill < 10, "no takeover"
            await asyncio.sleep(0.02)

    # serve's own PKI: leader_of dials the replicas with an admin certificate issued from it
    set_harness_pki(open_local_pki(Path(cluster.ready["tls_dir"])))
    try:
        took = asyncio.run(takeover())
    finally:
        set_harness_pki(None)
    # keep the load on past the takeover, then stop and account for every request
    time.sleep(3.0)  # a measurement window, not a synchronisation
    stop.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request hangs"
    after_kill = [r for r in results if r[1] > t_kill]
    ok_times = sorted(r[1] for r in results if r[2] == "ok")
    longest_gap = max((b - a for a, b in itertools.pairwise(ok_times)), default=0.0)
    counts = {o: sum(1 for r in results if r[2] == o) for o in ("ok", "error", "mismatch", "hang", "unclear")}
    print(
        f"leader failover under load: takeover {took:.2f} s after the kill; {len(results)} requests {counts}; "
        f"longest gap between completions {longest_gap:.2f} s"
    )
    assert counts["mismatch"] == 0 and counts["hang"] == 0 and counts["unclear"] == 0, [
        r for r in results if r[2] in ("mismatch", "hang", "unclear")
    ]
    assert sum(1 for r in after_kill if r[2] == "ok") >= 6, "requests stopped finishing after the kill"
    assert longest_gap < 5.0, f"no request finished for {longest_gap:.2f} s"
    assert took <= 3.0, f"takeover took {took:.2f} s (design: within 3 s)"
    new_leader = llmctl_json(cluster, "leader")
    assert new_leader["leader_id"] == standby["name"]
    # serve restarts the killed replica (same address); it rejoins as a standby
    wait_for(
        lambda: next(c for c in serve_status(cluster)["components"] if c["name"] == old["name"])["restarts"] == 1,
        30,
        "serve to restart the killed replica",
    )
