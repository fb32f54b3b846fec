"""``llumnix bench peers`` pieces that need no cluster: exact-length prompts, /proc CPU accounting, the aggregation
over repeats, the chart, and the refusal to install the routers into the project's virtualenv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.tools.bench_peers import _aggregate, alive, cpu_seconds, ensure_peers, plot
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
