"""``llumnix bench serving`` against a fake frontend (grpc.aio): stdout is nothing but the JSON report, the vLLM-style
result block on stderr shows exactly the JSON's figures, and those figures agree with each other and with the paper
metrics computed from the same records; a failing stream is counted, not fatal, and exits 1."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pyllumnix.tools.bench_serving import Outcome, result_block, serving_result
from pyllumnix.tools.cli import cli
from pyllumnix.tools.metrics import RequestRecord
from tests.test_clients_fakes import FakeFrontend, serve_frontend

N, IN, OUT = 12, 16, 6
WORKLOAD = f"fixed:poisson:rate=40:in={IN}:out={OUT}:n={N}"
BLOCK_FIELDS = {
    "Successful requests:": "completed",
    "Failed requests:": "failed",
    "Benchmark duration (s):": "duration",
    "Total input tokens:": "total_input_tokens",
    "Total generated tokens:": "total_output_tokens",
    "Request throughput (req/s):": "request_throughput",
    "Output token throughput (tok/s):": "output_throughput",
    "Total Token throughput (tok/s):": "total_token_throughput",
    "Mean TTFT (ms):": "mean_ttft_ms",
    "Median TTFT (ms):": "median_ttft_ms",
    "P99 TTFT (ms):": "p99_ttft_ms",
    "Mean TPOT (ms):": "mean_tpot_ms",
    "Median TPOT (ms):": "median_tpot_ms",
    "P99 TPOT (ms):": "p99_tpot_ms",
    "Mean ITL (ms):": "mean_itl_ms",
    "Median ITL (ms):": "median_itl_ms",
    "P99 ITL (ms):": "p99_itl_ms",
}


async def bench(address: str, *extra: str) -> Result:
    args = ["bench", "serving", "--frontend", address, "--workload", WORKLOAD, *extra]
    return await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)


def block_values(stderr: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in stderr.splitlines():
        for label, key in BLOCK_FIELDS.items():
            if line.startswith(label):
                out[key] = line[len(label) :].strip()
    return out


async def test_piped_output_is_clean_json_and_the_result_block_matches_it(tmp_path: Path) -> None:
    server = await serve_frontend(FakeFrontend("fe"))
    try:
        res = await bench(server.address, "--json", str(tmp_path / "serving.json"))
    finally:
        await server.stop(None)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # nothing but the JSON on stdout (no bar, no block, no summary line)
    assert json.loads((tmp_path / "serving.json").read_text()) == report
    assert "Serving Benchmark Result" in res.stderr and "\x1b[" not in res.stderr  # no bar drawn on a non-terminal

    # the block shows the JSON's figures, every field present
    shown = block_values(res.stderr)
    assert set(shown) == set(BLOCK_FIELDS.values())
    for key, text in shown.items():
        value = report[key]
        assert text == (f"{value:.2f}" if isinstance(value, float) else str(value)), key

    # the figures agree with each other ...
    assert (report["completed"], report["failed"]) == (N, 0)
    assert report["total_input_tokens"] == N * IN and report["total_output_tokens"] == N * OUT
    assert report["request_throughput"] == pytest.approx(N / report["duration"])
    assert report["output_throughput"] == pytest.approx(N * OUT / report["duration"])
    assert report["total_token_throughput"] == pytest.approx(N * (IN + OUT) / report["duration"])
    for m in ("ttft", "tpot", "itl"):
        assert 0 <= report[f"median_{m}_ms"] <= report[f"p99_{m}_ms"], m
        assert report[f"mean_{m}_ms"] <= report[f"p99_{m}_ms"] + 1e-9, m
    # ... and with the paper metrics computed from the same records by tools.metrics
    overall = report["overall"]
    assert overall["num_finished"] == N
    assert report["mean_ttft_ms"] == pytest.approx(overall["prefill_s"]["mean"] * 1000, rel=1e-9)
    assert report["duration"] >= report["duration_s"] - 1e-9  # first send to last end covers first arrival..finish
    summary = res.stderr.strip().splitlines()[-1]
    assert (
        summary.startswith(f"serving {WORKLOAD}: {N}/{N} finished") and f"{report['request_throughput']:.2f}" in summary
    )


async def test_failed_streams_are_counted_and_exit_1() -> None:
    server = await serve_frontend(FakeFrontend("fe", break_after=2))
    try:
        res = await bench(server.address)
    finally:
        await server.stop(None)
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert (report["completed"], report["failed"]) == (0, N)
    assert report["mean_ttft_ms"] is None and report["request_throughput"] == 0
    assert any("UNAVAILABLE" in e and "frontend lost its connection" in e for e in report["errors"])
    assert re.search(r"Failed requests:\s+12\b", res.stderr)


def record(rid: str, arrival: float, times: list[float]) -> Outcome:
    rec = RequestRecord(
        request_id=rid,
        priority=1,
        arrival=arrival,
        first_token_time=times[0],
        finish_time=times[-1],
        num_output_tokens=len(times),
        input_len=10,
        token_times=tuple(times),
    )
    return Outcome(rec, sorted(set(times)))


def test_serving_result_definitions_match_vllm() -> None:
    """TTFT from the send, TPOT over tokens after the first, ITL over chunk gaps (a 2-token chunk is one gap)."""
    outcomes = [
        record("a", 0.0, [0.1, 0.2, 0.3, 0.4]),  # ttft 100 ms, tpot 100 ms, itl 100,100,100
        record("b", 1.0, [1.3, 1.5, 1.5, 1.9]),  # ttft 300 ms, tpot 200 ms, chunks 1.3,1.5,1.9 -> itl 200,400
    ]
    r = serving_result(outcomes, duration_s=2.0)
    assert (r["completed"], r["total_output_tokens"], r["total_input_tokens"]) == (2, 8, 20)
    assert r["request_throughput"] == 1.0 and r["output_throughput"] == 4.0 and r["total_token_throughput"] == 14.0
    assert r["mean_ttft_ms"] == pytest.approx(200.0) and r["median_ttft_ms"] == pytest.approx(200.0)
    assert r["mean_tpot_ms"] == pytest.approx(150.0)
    assert r["mean_itl_ms"] == pytest.approx(180.0) and r["median_itl_ms"] == pytest.approx(100.0)
    # sorted gaps 100,100,100,200,400: the linear 99th percentile sits at index 3.96 -> 200 + 0.96 * 200
    assert r["p99_itl_ms"] == pytest.approx(392.0)
    block = result_block(r)
    assert block.splitlines()[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12
    assert "Mean TPOT (ms):" in block and "150.00" in block


async def test_forced_progress_bar_goes_to_stderr_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the bar forced on (LLUMNIX_PROGRESS=1) it is drawn on stderr; stdout still parses as JSON."""
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    server = await serve_frontend(FakeFrontend("fe"))
    try:
        res = await bench(server.address)
    finally:
        await server.stop(None)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["completed"] == N
    assert f"{N}/{N}" in res.stderr and "requests" in res.stderr


async def test_frontend_and_credentials_from_the_context_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --frontend the client context file (what `llumnix serve` writes) names the frontend; without either,
    a usage error (exit 2) says where the context file was looked for."""
    server = await serve_frontend(FakeFrontend("fe"))
    try:
        ctx = tmp_path / "context.yaml"
        ctx.write_text(f"contexts:\n- name: dev\n  frontend: [{server.address}]\n")
        ctx.chmod(0o600)
        monkeypatch.setenv("LLUMNIX_CONTEXT", str(ctx))
        args = ["bench", "serving", "--workload", WORKLOAD]
        res = await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["completed"] == N
        monkeypatch.setenv("LLUMNIX_CONTEXT", str(tmp_path / "none.yaml"))
        res = await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)
        assert res.exit_code == 2 and "none.yaml names none" in res.output
    finally:
        await server.stop(None)


async def test_records_hold_every_request_with_its_token_times(tmp_path: Path) -> None:
    """--records writes one JSON line per request, the same records the report's figures come from (the live
    demonstration compares them request by request with the simulator's)."""
    server = await serve_frontend(FakeFrontend("fe"))
    try:
        res = await bench(server.address, "--records", str(tmp_path / "records.jsonl"))
    finally:
        await server.stop(None)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert sorted(r["request_id"] for r in lines) == [f"req-{i:06d}" for i in range(N)]
    for r in lines:
        assert r["input_len"] == IN and r["num_output_tokens"] == OUT == len(r["token_times"]) and not r["error"]
        assert r["arrival"] <= r["first_token_time"] <= r["finish_time"]
        assert r["token_times"][0] == pytest.approx(r["first_token_time"], abs=1e-4)
    ttft = [r["first_token_time"] - r["arrival"] for r in lines]
    assert json.loads(res.stdout)["mean_ttft_ms"] == pytest.approx(1000 * sum(ttft) / N, rel=1e-9)
