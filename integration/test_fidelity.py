"""Fidelity of the simulator: one workload through the live cluster (`llumnix serve`, real-time sim engines, the
serving benchmark client) and through `llumnix sim` (the same policy core and engine code on a virtual clock). Mean
prefill and decode latencies must agree within 15 %."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyllumnix.tools.bench_serving import run_serving_bench
from pyllumnix.tools.launch import Launcher
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import run_case
from pyllumnix.tools.workload import generate

pytestmark = pytest.mark.integration

# 4 instances of the LLaMA-7B profile, 120 requests of 512 prompt tokens and 32 output tokens at 4 req/s (~35 s).
WORKLOAD = "fixed:poisson:rate=4:n=120:in=512:out=32"
TOLERANCE = 0.15


def test_live_cluster_and_simulator_agree(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    serve = launcher.start(
        "serve",
        "serve",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--transport",
        "tcp",
        "--llumlets",
        "4",
        "--log-dir",
        str(tmp_path / "components"),
        timeout=120,
    )
    try:
        live = run_serving_bench([serve.ready["grpc"]], WORKLOAD, seed=0, max_model_len=8192)
    finally:
        launcher.stop_all()
    arrivals = generate(WORKLOAD, 0, max_model_len=8192)
    _, sim = run_case(SimConfig(instances=4, profile="llama-7b-a10", report_interval_ms=50), arrivals)
    assert live["overall"]["num_finished"] == sim["overall"]["num_finished"] == len(arrivals)
    for metric in ("prefill_s", "decode_s"):
        measured, simulated = live["overall"][metric]["mean"], sim["overall"][metric]["mean"]
        assert abs(measured / simulated - 1) <= TOLERANCE, f"{metric}: live {measured:.4f} s vs sim {simulated:.4f} s"
