"""Progress bars of the long benchmark and simulator runs: on stderr only, off when stderr is not a terminal
(``LLUMNIX_PROGRESS`` forces either way), and stdout stays nothing but the JSON the command prints."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from pyllumnix.tools import bench_engine
from pyllumnix.tools.cli import cli
from pyllumnix.tools.progress import Steps, progress_bar, progress_enabled


def test_enabled_only_on_a_terminal_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLUMNIX_PROGRESS", raising=False)
    assert not progress_enabled(Console(file=io.StringIO()))
    assert progress_enabled(Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setenv("LLUMNIX_PROGRESS", "0")
    assert not progress_enabled(Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    assert progress_enabled(Console(file=io.StringIO()))
    monkeypatch.delenv("LLUMNIX_PROGRESS")
    assert progress_bar().disable  # pytest's stderr is not a terminal


def test_steps_count_and_extend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    with progress_bar() as bar:
        steps = Steps(bar, "work", total=2)
        steps.step("a")
        steps.extend(1)
        steps.step("b")
        steps.describe("c")
        task = bar.tasks[0]
        assert (task.completed, task.total, task.description) == (2, 3, "work: c")
    Steps().step("nothing happens without a bar")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_sim_run_stdout_is_one_json_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", forced)
    args = ["sim", "--instances", "2", "--profile", "tiny", "--out", str(tmp_path / "run")]
    args += ["--workload", "fixed:poisson:rate=20:in=32:out=16:n=40"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(res.stdout.splitlines()) == 1 and json.loads(res.stdout)["requests"] == 40
    if forced == "0":
        assert res.stderr == ""


def test_sim_compare_stdout_is_one_json_line_and_progress_goes_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    args = ["sim", "compare", "--scenario", "paper-fig13", "--requests", "40", "--instances", "2", "--seeds", "1"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "cmp")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runs = json.loads(res.stdout)["runs"]
    assert "paper-fig13 runs" in res.stderr and f"{runs}/{runs}" in res.stderr


def test_bench_engine_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """One short shape (the bench's own smoke test covers the real ones); the summary line is on stderr.

    The command takes its shapes from ``shapes_for(profile)`` (SHAPES fitted to the profile's limits; SHAPES is bound
    as its default argument, so patching the module's SHAPES no longer reaches it): the one shape goes in there."""
    fit = bench_engine.shapes_for
    short = (bench_engine.Shape("prefill-256", 0, 256, 2),)
    monkeypatch.setattr(bench_engine, "shapes_for", lambda profile: fit(profile, short))
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    res = CliRunner().invoke(cli, ["bench", "engine", "--no-payload"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [s["shape"] for s in report["shapes"]] == ["prefill-256"]
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", res.stderr).strip().splitlines()[-1]
    assert last.startswith("engine[llama-7b-a10, payload=False] measured/modelled:"), last
    assert "bench engine" in res.stderr and "3/3" in res.stderr
