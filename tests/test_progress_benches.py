"""Progress on the long runs (bench dataplane, sim, migration, peers; sim live; drill): the bar and the summary line
go to stderr, stdout is the JSON report alone even with the bar forced on (``... | jq`` keeps working)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


@pytest.mark.parametrize("forced", ["0", "1"])
def test_bench_dataplane_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", forced)
    args = ["bench", "dataplane", "--sizes", "1", "--transports", "inproc", "--repeat", "1"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # nothing but the JSON
    assert report["gib_s"]["inproc"]["1"] > 0
    err = plain(res.stderr)
    assert err.strip().splitlines()[-1].startswith("dataplane 16MiB GiB/s:")
    if forced == "1":
        assert "bench dataplane" in err and "4/4" in err  # memcpy, memcpy_ring, socket, inproc
    else:
        assert "bench dataplane" not in err


def test_bench_sim_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    args = ["bench", "sim", "--instances", "2", "--instances", "3", "--requests", "20"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [r["instances"] for r in json.loads(res.stdout)["results"]] == [2, 3]
    err = plain(res.stderr)
    assert "bench sim" in err and "2/2" in err
    assert err.strip().splitlines()[-1].startswith("sim: 2 instances x 20 requests")


def test_bench_migration_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real llumlet processes (one secure phase, one length): one progress step per migration pair."""
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    args = ["bench", "migration", "--lengths", "64", "--repeats", "1", "--transport", "tcp", "--security", "mtls"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [row["seq_len"] for row in json.loads(res.stdout)["rows"]] == [64]
    err = plain(res.stderr)
    assert "bench migration" in err and "1/1" in err
    assert err.strip().splitlines()[-1].startswith("migration (mtls) downtime ms 64:")


def test_a_bar_inside_a_running_bar_draws_on_the_same_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench peers' runs hold a replay's request bar: one console draws both, not two fighting over the cursor."""
    from pyllumnix.tools.progress import progress_bar

    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    with progress_bar() as outer, progress_bar() as inner:
        assert inner.console is outer.console and not inner.disable
    monkeypatch.setenv("LLUMNIX_PROGRESS", "0")
    with progress_bar() as after:  # the outer bar is over: the environment decides again
        assert after.disable


def _fake_peers(monkeypatch: pytest.MonkeyPatch, ran: list[str]) -> None:
    """bench peers without processes: a system that stops at once, a run that replays nothing but draws the request
    bar replay_openai draws (nested in the runs' bar)."""
    from pyllumnix.tools import bench_peers
    from pyllumnix.tools.progress import progress_bar

    def start_project(policy: str, work: object, blocks: int, instances: int) -> bench_peers.System:
        system = bench_peers.System(policy, "http://127.0.0.1:9", None, [], notes={"dispatch_policy": policy})
        system.probes.frontends = [system.url]
        system.probes.llumlet_metrics = {f"llumlet-{i}": f"127.0.0.1:{i + 1}" for i in range(instances)}
        return system

    def run_once(system: bench_peers.System, arrivals: list[object], idle: dict[str, float]) -> dict[str, object]:
        with progress_bar() as bar:
            task = bar.add_task("requests", total=len(arrivals))
            bar.advance(task, len(arrivals))
        ran.append(system.name)
        return {
            "completed": len(arrivals),
            "failed": 0,
            "errors": [],
            "dead_processes": [],
            "ttft_s": {"p99": 0.5},
            "cpu_ms_per_request": {"total": 3.0},
            "cpu_ms_per_token_llumlet_frontend": 0.1,
        }

    monkeypatch.setattr(bench_peers, "start_project", start_project)
    monkeypatch.setattr(bench_peers, "run_once", run_once)
    monkeypatch.setattr(bench_peers, "idle_rates", lambda system: {})
    monkeypatch.setattr(
        bench_peers, "check_drained", lambda system: {"ok": True, "seconds": 0.0, "left": [], "dead": []}
    )


@pytest.mark.parametrize("forced", ["0", "1"])
def test_bench_peers_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    """One progress step per run (system x workload x repeat); the processes and the replay are faked (see
    integration/test_bench_peers_smoke.py for the real thing)."""
    ran: list[str] = []
    _fake_peers(monkeypatch, ran)
    monkeypatch.setenv("LLUMNIX_PROGRESS", forced)
    args = ["bench", "peers", "--systems", "llumnix,infaas++", "--workload", "fixed:poisson:rate=4:n=3:in=8:out=4"]
    res = CliRunner().invoke(cli, [*args, "--repeats", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert ran == ["llumnix"] * 3 + ["infaas++"] * 3  # per system: its warm-up, then its two runs
    report = json.loads(res.stdout)  # nothing but the JSON
    runs = report["results"]["fixed:poisson:rate=4:n=3:in=8:out=4"]
    assert [len(runs[s]["runs"]) for s in ("llumnix", "infaas++")] == [2, 2]
    err = plain(res.stderr)
    assert err.strip().splitlines()[-2].startswith("peers fixed:poisson:rate=4:n=3:in=8:out=4: llumnix TTFT p99 0.50 s")
    assert err.strip().splitlines()[-1].startswith("peers total wall ")
    assert err.strip().splitlines()[-1].endswith("min): 2 system(s), 4 run(s)")
    assert report["wall_s"] > 0 and report["failed_runs"] == []
    assert "infaas++ fixed:poisson:rate=4:n=3:in=8:out=4 run 2/2: 3/3 done" in err  # the per-run lines stay
    if forced == "1":
        assert "bench peers" in err and "4/4" in err and "requests" in err
    else:
        assert "bench peers" not in err and "requests" not in err


@pytest.mark.parametrize("forced", ["0", "1"])
def test_sim_live_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch, forced: str, tmp_path: Path) -> None:
    """The prediction alone (no cluster): one step per simulated policy, the summary on stderr."""
    monkeypatch.setenv("LLUMNIX_PROGRESS", forced)
    args = ["sim", "live", "--predict-only", "--workload", "M-M:poisson:rate=4:n=20", "--instances", "2"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # nothing but the JSON
    assert report["live"] is None and set(report["simulated"]) == {"llumnix", "infaas++"}
    assert report == json.loads((tmp_path / "live.json").read_text())
    err = plain(res.stderr)
    assert err.strip().splitlines()[-1].startswith("prefill P99 INFaaS++/Llumnix: simulated")
    if forced == "1":
        assert "sim live" in err and "2/2" in err
    else:
        assert "sim live" not in err


@pytest.mark.parametrize("forced", ["0", "1"])
def test_drill_bar_counts_the_phases_and_stdout_is_the_json_report(
    monkeypatch: pytest.MonkeyPatch, forced: str
) -> None:
    """Attach mode with the drill faked: it says the runner's phase lines (reference run, each scenario's start and
    verdict) through the callback the command gives it; the bar counts the reference run and each scenario."""
    from pyllumnix.tools.drill import cli as drill_cli
    from pyllumnix.tools.drill.report import DrillReport
    from pyllumnix.tools.drill.scenarios import Scenario

    class FakeDrill:
        def __init__(self, opts: object, *, progress: Callable[[str], None], **kwargs: object) -> None:
            self.say = progress

        async def run(self, scenarios: list[Scenario]) -> DrillReport:
            self.say("reference run (no fault)")
            for s in scenarios:
                self.say(f"[bold]{s.label}[/bold]: running")
                self.say(f"{s.label}: fault over; waiting for 0 streams")
                self.say(f"{s.label}: [green]pass[/green]")
            return DrillReport(config={}, reference={"unfinished": []}, results=[], error="fake drill: no results")

    monkeypatch.setattr(drill_cli, "Drill", FakeDrill)
    monkeypatch.setenv("LLUMNIX_PROGRESS", forced)
    args = ["drill", "--frontend", "127.0.0.1:9", "--scheduler", "127.0.0.1:9", "--scenario", "leader-resign,burst"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 1, res.output  # no results: not passed
    report = json.loads(res.stdout)  # nothing but the JSON
    assert report["error"] == "fake drill: no results" and report["passed"] is False
    err = plain(res.stderr)
    assert "reference run (no fault)" in err and "burst" in err  # the phase lines still print
    if forced == "1":
        assert "drill" in err and "3/3" in err  # reference run + 2 scenarios
    else:
        assert "3/3" not in err
