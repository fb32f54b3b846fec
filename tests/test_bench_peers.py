"""``llumnix bench peers`` pieces that need no cluster: exact-length prompts, /proc CPU accounting, the aggregation
over repeats, the chart, the refusal to install the routers into the project's virtualenv, and the routers' workers
configured as ``llumnix serve`` configures its own components."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest

from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.tools import bench_peers
from pyllumnix.tools.bench_peers import _aggregate, alive, cpu_seconds, ensure_peers, plot, thread_cpu_seconds
from pyllumnix.tools.bench_serving import text_prompt_of
from pyllumnix.tools.workload import generate


def test_text_prompts_have_exactly_the_workloads_lengths() -> None:
    tok = SimTokenizer()
    arrivals = generate("M-M:poisson:rate=4:n=100:len_max=1024", 0)
    assert [len(tok.encode(text_prompt_of(a))) for a in arrivals] == [a.input_len for a in arrivals]
    assert len({text_prompt_of(a) for a in arrivals}) == len(arrivals)  # distinct prompts (no accidental cache hits)


def test_cpu_seconds_and_alive_read_proc() -> None:
    before = cpu_seconds(os.getpid())
    x = 0
    for i in range(3_000_000):
        x += i
    assert cpu_seconds(os.getpid()) > before
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert alive(os.getpid()) and not alive(proc.pid) and cpu_seconds(proc.pid) == 0.0


def test_thread_cpu_seconds_splits_a_process_by_thread() -> None:
    """The main thread and every other live thread (by name), each its own CPU; {} for a process that is gone."""
    import threading

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        before = thread_cpu_seconds(os.getpid())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = thread_cpu_seconds(os.getpid())
            others = sum(v for k, v in now.items() if k != "main") - sum(v for k, v in before.items() if k != "main")
            if others >= 0.05:
                break
            time.sleep(0.05)
        assert "main" in now and others >= 0.05, now
        assert sum(now.values()) <= cpu_seconds(os.getpid()) + 0.05
    finally:
        stop.set()
        worker.join()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert thread_cpu_seconds(proc.pid) == {}


def test_aggregate_gives_median_and_spread() -> None:
    runs = [{"ttft_s": {"p99": v}, "completed": 10, "summary": {"x": 1}} for v in (3.0, 1.0, 2.0)]
    agg = _aggregate(runs)
    assert agg["ttft_s.p99"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert "summary.x" not in agg


def test_peers_are_never_installed_into_the_project_venv(tmp_path: Path) -> None:
    with pytest.raises(click.UsageError, match=r"\.venv"):
        ensure_peers(tmp_path / ".venv" / "peers")
    assert not (tmp_path / ".venv").exists()


def test_plot_writes_a_chart(tmp_path: Path) -> None:
    med = {"ttft_s.p99": {"median": 0.5}, "cpu_ms_per_request.total": {"median": 120.0}}
    report: dict[str, Any] = {"systems": {"llumnix": {}, "vllm-router:round_robin": {}}, "results": {"w:n=1": {}}}
    report["results"]["w:n=1"] = {"llumnix": {"median": med}, "vllm-router:round_robin": {"median": med}}
    plot(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_runs_where_every_request_failed(tmp_path: Path) -> None:
    """No TTFT anywhere (every request failed): still a chart, not a crash of the whole benchmark at its end (old:
    matplotlib's "Data cannot be log-scaled" ValueError after the runs, their JSON lost with it)."""
    med = {"ttft_s.p99": {"median": float("nan")}, "cpu_ms_per_request.total": {"median": 170.0}}
    report: dict[str, Any] = {"systems": {"llumnix": {}}, "results": {"w:n=1": {"llumnix": {"median": med}}}}
    plot(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_openai_mode_measures_a_streaming_frontend() -> None:
    """One client for every system: streamed completions against this project's HTTP API (fake llumlet behind it)."""
    from pyllumnix.tools.bench_serving import replay_openai, serving_result
    from tests.test_frontend_fakes import FakeLlumlet, running_stack

    arrivals = generate("fixed:const:rate=50:n=4:in=12:out=5", 0)
    async with running_stack([FakeLlumlet("i-1", delay=0.002)]) as stack:
        outcomes, duration = await replay_openai(stack.http.url, arrivals, stack.frontend.model)
    assert [o.error for o in outcomes] == [""] * 4
    assert [o.record.num_output_tokens for o in outcomes] == [5] * 4  # from the streamed usage block
    result = serving_result(outcomes, duration)
    assert result["completed"] == 4 and result["total_output_tokens"] == 20 and result["p99_ttft_ms"] is not None
    assert [len(a.prompt_token_ids) for a in stack.llumlets["i-1"].added] == [12] * 4  # exact-length prompts


class _Started(Exception):
    """Stops ``start_router`` once its workers are launched (no router, no real processes)."""


def test_router_workers_run_the_engines_llumnix_serve_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The routers' workers must be configured like this project's own cluster. They were started with the llumlet's
    bare defaults: the sim profile's full 512 KiB of KV payload per token instead of serve's 8 KiB (64x the bytes
    written in the event loop per prefill and recompute, which stalled them past AddRequest's 2 s and their lease),
    and the frontend's 4,096-token limit instead of the profile's."""
    from pyllumnix.data_plane.engine.profile import get_profile
    from pyllumnix.infra.etcd import embedded
    from pyllumnix.tools.serve import DEFAULTS

    launched: dict[str, list[str]] = {}

    class FakeEtcd:
        def __init__(self, n: int, data_dir: Path) -> None:
            self.endpoints = ["127.0.0.1:1"]
            self.members = [type("M", (), {"process": type("P", (), {"pid": os.getpid()})()})()]

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    class FakeLauncher:
        def __init__(self, log_dir: Path, die_with_parent: bool, secure: bool) -> None:
            assert not secure

        def start(self, name: str, kind: str, *args: str, timeout: float) -> Any:
            launched[name] = [kind, *args]
            return type("C", (), {"pid": os.getpid(), "ready": {"http_port": 1}})()

        def stop_all(self) -> None:
            pass

    def stop_at_wait(*_a: Any, **_k: Any) -> None:
        raise _Started

    monkeypatch.setattr(embedded, "EmbeddedEtcd", FakeEtcd)
    monkeypatch.setattr(bench_peers, "Launcher", FakeLauncher)
    monkeypatch.setattr(bench_peers, "_wait_http", stop_at_wait)
    with pytest.raises(_Started):
        bench_peers.start_router("vllm-router:round_robin", tmp_path, 520, 2, tmp_path)
    assert sorted(launched) == ["frontend-0", "frontend-1", "llumlet-0", "llumlet-1"]

    def value(argv: list[str], flag: str) -> str:
        assert flag in argv, f"{flag} missing from {argv}"
        return argv[argv.index(flag) + 1]

    profile = get_profile(str(DEFAULTS["profile"]))
    for i in range(2):
        ll, fe = launched[f"llumlet-{i}"], launched[f"frontend-{i}"]
        assert value(ll, "--bytes-per-token") == str(DEFAULTS["bytes_per_token"]) == "8192"
        assert value(ll, "--profile") == profile.name and value(ll, "--engine") == "sim"
        assert value(ll, "--transport") == "tcp" and value(ll, "--total-blocks") == "520"
        assert value(fe, "--max-model-len") == str(profile.max_model_len)
        assert value(fe, "--model") == profile.name
        assert value(ll, "--cluster") == value(fe, "--cluster") == f"peer{i}"


def test_set_policy_waits_for_a_leader_and_names_other_failures(tmp_path: Path) -> None:
    """serve can be ready before its scheduler won the first election: llmctl's exit 3 (no leader) is retried; any
    other exit fails at once with llmctl's message."""
    import stat

    counter = tmp_path / "calls"
    fake = tmp_path / "llmctl"
    fake.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}\n"
        'if [ "$n" -lt 3 ]; then echo "no scheduler leader reachable" >&2; exit 3; fi\n'
        'echo "$@" > ' + str(tmp_path / "args") + "\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    bench_peers.set_policy("infaas++", dict(os.environ), timeout=30, llmctl=str(fake))
    assert counter.read_text().strip() == "3"
    assert (tmp_path / "args").read_text().split() == ["config", "set", "dispatch.policy", "DISPATCH_POLICY_INFAAS_PP"]

    bad = tmp_path / "bad"
    bad.write_text('#!/bin/sh\necho "invalid argument: nope" >&2\nexit 2\n')
    bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(RuntimeError, match="exited 2: invalid argument: nope"):
        bench_peers.set_policy("infaas++", dict(os.environ), timeout=30, llmctl=str(bad))
