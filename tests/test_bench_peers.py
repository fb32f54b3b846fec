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


# -- one warm cluster per system, a drain check between runs (session 10) ------------------------------------------
def _instance_metrics(free_blocks: int = 520, num_waiting: int = 0, total_preemptions: int = 0) -> str:
    """A llumlet's real /metrics text (``InstanceMetrics``) for an engine load."""
    from prometheus_client import generate_latest

    from pyllumnix.data_plane.engine.base import LoadSnapshot
    from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics
    from pyllumnix.protos.llumnix.v1 import common_pb2

    snapshot = LoadSnapshot(
        total_blocks=520,
        free_blocks=free_blocks,
        block_size=16,
        watermark_blocks=5,
        num_running=0,
        num_waiting=num_waiting,
        num_preempted=0,
        head_of_line_demand_blocks=0,
        waiting_demand_blocks=0,
        reserved_blocks=0,
        total_preemptions=total_preemptions,
    )
    metrics = InstanceMetrics("i-0", "llama-7b-a10", lambda: snapshot, common_pb2.MigrationStats, lambda: ())
    return generate_latest(metrics.registry).decode()


def test_the_drain_check_reads_frontends_and_llumlets() -> None:
    """Empty only when no frontend has a request in flight and every llumlet has nothing running or waiting and every
    block free; an endpoint that does not answer, or a scrape without the series, is not empty."""
    from pyllumnix.tools.bench_peers_drain import Probes, not_drained, preemptions

    pages = {"http://f/get_load": '{"load": 0}', "http://l0/metrics": _instance_metrics()}

    def get(url: str, timeout: float) -> str:
        if url not in pages:
            raise OSError("connection refused")
        return pages[url]

    probes = Probes(["http://f"], {"llumlet-0": "l0"})
    assert not_drained(probes, get=get) == []
    pages["http://l0/metrics"] = _instance_metrics(free_blocks=519, total_preemptions=3)  # one block held
    assert not_drained(probes, get=get) == [f"llumlet-0: kv_cache_usage_perc {1 / 520:g}"]
    assert preemptions(probes, get=get) == 3.0
    pages["http://l0/metrics"] = _instance_metrics(num_waiting=2)
    pages["http://f/get_load"] = '{"load": 1}'
    assert not_drained(probes, get=get) == [
        "frontend http://f: 1 request(s) in flight",
        "llumlet-0: num_requests_waiting 2",
    ]
    pages["http://l0/metrics"] = "# nothing here\n"
    assert not_drained(Probes([], {"llumlet-0": "l0"}), get=get) == [
        "llumlet-0: num_requests_running nan, num_requests_waiting nan, kv_cache_usage_perc nan"
    ]
    left = not_drained(Probes(["http://gone"], {}), get=get)
    assert len(left) == 1 and "http://gone: /get_load failed (connection refused)" in left[0]


def test_wait_drained_waits_gives_up_and_stops_at_a_dead_process() -> None:
    from pyllumnix.tools.bench_peers_drain import Probes, wait_drained

    looks = iter([["llumlet-0: num_requests_running 1"], []])
    done = wait_drained(Probes(), lambda: [], 5.0, poll=0.01, check=lambda _p: next(looks))
    assert done["ok"] and done["left"] == [] and done["dead"] == []
    t = time.monotonic()
    stuck = wait_drained(Probes(), lambda: [], 0.2, poll=0.01, check=lambda _p: ["llumlet-0: kv 0.1"])
    assert not stuck["ok"] and stuck["left"] == ["llumlet-0: kv 0.1"] and stuck["seconds"] >= 0.2
    dead = wait_drained(Probes(), lambda: ["llumlet-1 (pid 7)"], 60.0, check=lambda _p: ["x"])
    assert not dead["ok"] and dead["dead"] == ["llumlet-1 (pid 7)"] and time.monotonic() - t < 5


def test_repeats_keep_arrivals_and_lengths_but_change_the_prompts() -> None:
    """A cache-aware router keeps its prefix tree across runs on one cluster: each run's prompts are new text of the
    same token counts, at the same times."""
    w = "S-S:poisson:rate=8:n=20:len_max=320"
    tok = SimTokenizer()
    a, b, c = (bench_peers.run_arrivals(w, i, 0, r) for i, r in ((0, 0), (0, 1), (1, 0)))
    for other in (b, c):
        assert [(x.arrival_time_s, x.input_len, x.output_len) for x in other] == [
            (x.arrival_time_s, x.input_len, x.output_len) for x in a
        ]
    prompts = [{text_prompt_of(x) for x in run} for run in (a, b, c)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2])
    assert [len(tok.encode(text_prompt_of(x))) for x in b] == [x.input_len for x in b]


def _fake_cluster(
    monkeypatch: pytest.MonkeyPatch, drains: list[bool]
) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """bench peers on fakes: starts, replays (system, first request id) and stops are recorded; the drain check after
    each replay answers from ``drains`` (True while it runs out)."""
    started: list[str] = []
    replays: list[tuple[str, str]] = []
    stopped: list[str] = []

    def start(name: str, work: Path, blocks: int, instances: int) -> bench_peers.System:
        started.append(name)
        system = bench_peers.System(name, "http://127.0.0.1:9", None, [], notes={"name": name})
        try:
            from pyllumnix.tools.bench_peers_drain import Probes
        except ImportError:  # the code before the drain check: these fakes still run on it, and fail its assertions
            pass
        else:
            llumlets = {f"llumlet-{i}": f"127.0.0.1:{i + 1}" for i in range(instances)}
            system.probes = Probes(["http://127.0.0.1:9"], llumlets)
        system.stoppers.append(lambda: stopped.append(name))
        return system

    def run_once(
        system: bench_peers.System, arrivals: list[Any], idle: dict[str, float] | None = None
    ) -> dict[str, Any]:
        replays.append((system.name, arrivals[0].request_id))
        return {
            "completed": len(arrivals),
            "failed": 0,
            "errors": [],
            "dead_processes": [],
            "ttft_s": {"p99": 0.5},
            "cpu_ms_per_request": {"total": 3.0},
            "cpu_ms_per_token_llumlet_frontend": 0.1,
        }

    def check_drained(system: bench_peers.System) -> dict[str, Any]:
        ok = drains.pop(0) if drains else True
        return {"ok": ok, "seconds": 0.1, "left": [] if ok else ["llumlet-0: kv_cache_usage_perc 0.01"], "dead": []}

    monkeypatch.setattr(bench_peers, "start_project", start)
    monkeypatch.setattr(bench_peers, "run_once", run_once)
    # raising=False: the same fakes run against the code before the warm cluster (which had neither)
    monkeypatch.setattr(bench_peers, "idle_rates", lambda system: {"llumlet": 0.01}, raising=False)
    monkeypatch.setattr(bench_peers, "check_drained", check_drained, raising=False)
    return started, replays, stopped


def test_each_system_starts_once_and_its_runs_go_round_by_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Old: a fresh cluster for every run (12 starts here, 19 min per repeat of the default run). Now one start per
    system, a warm-up replay, then every workload once per round."""
    from click.testing import CliRunner

    started, replays, stopped = _fake_cluster(monkeypatch, [])
    w0, w1 = "fixed:poisson:rate=4:n=3:in=8:out=4", "fixed:gamma:rate=4:cv=4:n=3:in=8:out=4"
    args = ["--systems", "llumnix,infaas++", "--workload", w0, "--workload", w1, "--repeats", "3"]
    res = CliRunner().invoke(bench_peers.bench_peers, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert started == stopped == ["llumnix", "infaas++"]
    order = [f"w{i}r{r}-" for r in range(3) for i in range(2)]
    for name in ("llumnix", "infaas++"):
        mine = [rid for system, rid in replays if system == name]
        assert mine[0].startswith("w-1r1-")  # the warm-up, not measured
        assert [rid[: len(order[0])] for rid in mine[1:]] == order
    report = json_report(res.stdout)
    assert report["run_order"][:3] == [f"run 1: {w0} repeat 1", f"run 2: {w1} repeat 1", f"run 3: {w0} repeat 2"]
    cell = report["results"][w1]["infaas++"]
    assert [r["repeat"] for r in cell["runs"]] == [1, 2, 3] and [r["order"] for r in cell["runs"]] == [2, 4, 6]
    assert cell["median"]["ttft_s.p99"] == {"median": 0.5, "min": 0.5, "max": 0.5}
    assert report["systems"]["llumnix"]["cluster_starts"] == 1 and report["systems"]["llumnix"]["warmup_ok"]
    assert report["wall_s"] > 0 and report["failed_runs"] == []


def test_a_run_that_does_not_drain_fails_loudly_and_the_next_gets_a_fresh_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    started, replays, stopped = _fake_cluster(monkeypatch, [True, False])  # warm-up drains, run 1 leaves a block
    w0 = "fixed:poisson:rate=4:n=3:in=8:out=4"
    args = ["--systems", "llumnix", "--workload", w0, "--repeats", "2"]
    res = CliRunner().invoke(bench_peers.bench_peers, args, catch_exceptions=False)
    assert res.exit_code == 1
    assert started == stopped == ["llumnix", "llumnix"]
    assert [rid.split("-")[0] for _, rid in replays] == ["w", "w0r0", "w", "w0r1"]  # warm-up again after the restart
    assert "NOT DRAINED after 0 s: ['llumlet-0: kv_cache_usage_perc 0.01'] (the cluster is restarted)" in res.stderr
    report = json_report(res.stdout)
    assert report["failed_runs"] == [f"llumnix {w0} run 1"]
    assert [r["cluster_start"] for r in report["results"][w0]["llumnix"]["runs"]] == [1, 2]
    assert "FAILED: ['llumnix" in res.stderr.strip().splitlines()[-1]


def json_report(stdout: str) -> dict[str, Any]:
    import json

    report: dict[str, Any] = json.loads(stdout)
    return report
