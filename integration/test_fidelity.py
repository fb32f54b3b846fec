"""Fidelity of the simulator: one workload through the live cluster (`llumnix serve`, real-time sim engines, the
serving benchmark client) and through `llumnix sim` (the same policy core and engine code on a virtual clock).

Both sides sleep the same modelled step, so agreeing mean step latencies alone would mostly measure sleep accuracy.
The workload is therefore a burst that overloads two instances: requests queue for admission (FCFS, the batch token
budget, the KV memory) and the running batch outgrows memory, so the engine scheduler preempts. What is compared is
what the scheduler and the policy decide, request by request: each request's queueing delay before its first token
(rank order and size) and the number of preemptions in the cluster, besides the mean prefill and decode latency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from integration.cluster import leader_of, list_instances, set_harness_pki
from pyllumnix.clients.client import tls_from_context
from pyllumnix.infra.security.context import load_context
from pyllumnix.infra.security.runtime import open_local_pki
from pyllumnix.tools.bench_serving import replay
from pyllumnix.tools.launch import Launcher
from pyllumnix.tools.metrics import prefill_latency, summarize
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.runner import run_case
from pyllumnix.tools.workload import generate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# 2 instances of the LLaMA-7B profile (792 blocks since #15), 64 requests of 512 prompt and 240 output tokens at
# 30 req/s (~36 s): the simulator predicts TTFTs from 0.1 s to ~19 s and ~14 preemptions (the old 80 x 300 tokens
# queued requests past the frontend's 30 s idle timeout on the smaller pool).
WORKLOAD = "fixed:poisson:rate=30:n=64:in=512:out=240"
INSTANCES = 2
TOLERANCE = 0.15


def ranks(values: list[float]) -> np.ndarray:
    """Ranks with ties averaged (the simulator admits a batch in one step: its requests share a TTFT)."""
    v = np.asarray(values)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tied = v == value
        r[tied] = r[tied].mean()
    return r


def order_agreement(live: list[float], sim: list[float], margin: float) -> tuple[int, int]:
    """Pairs of requests the simulator separates by more than ``margin`` seconds of TTFT, and how many of them the
    live cluster served first-token in the same order."""
    pairs = agree = 0
    for i in range(len(sim)):
        for j in range(i + 1, len(sim)):
            if abs(sim[i] - sim[j]) > margin:
                pairs += 1
                agree += (sim[i] < sim[j]) == (live[i] < live[j])
    return agree, pairs


def test_live_cluster_and_simulator_agree(tmp_path: Path) -> None:
    arrivals = generate(WORKLOAD, 0, max_model_len=8192)
    launcher = Launcher(tmp_path)
    # serve secure, its default: the workload goes through the frontend's TLS port with the admin context's
    # credentials, and the replicas are asked with a certificate from serve's own PKI.
    serve = launcher.start(
        "serve",
        "serve",
        *("--http-port", "0", "--grpc-port", "0", "--transport", "tcp", "--llumlets", str(INSTANCES)),
        *("--log-dir", str(tmp_path / "components"), "--context", str(tmp_path / "context.yaml")),
        timeout=120,
    )
    try:
        ctx = load_context(serve.ready["context"])
        assert ctx is not None and ctx.ca is not None, "a secure serve writes a TLS client context"
        live_records = asyncio.run(replay([serve.ready["grpc"]], arrivals, tls=tls_from_context(ctx)))
        set_harness_pki(open_local_pki(Path(serve.ready["tls_dir"])))
        try:
            leader = asyncio.run(leader_of(list(serve.ready["schedulers"]))).leader_address
            statuses = asyncio.run(list_instances(leader))
        finally:
            set_harness_pki(None)
    finally:
        launcher.stop_all()
    live = summarize(live_records)
    result, sim = run_case(SimConfig(instances=INSTANCES, profile="llama-7b-a10", report_interval_ms=50), arrivals)
    assert live["overall"]["num_finished"] == sim["overall"]["num_finished"] == len(arrivals)
    report = []

    # per request: the time to the first token is the queueing the scheduler and the dispatch policy caused
    live_ttft = {r.request_id: prefill_latency(r) for r in live_records}
    sim_ttft = {r.request_id: prefill_latency(r) for r in result.records}
    ids = sorted(sim_ttft)
    assert sorted(live_ttft) == ids
    lv = [float(live_ttft[i]) for i in ids]  # type: ignore[arg-type]
    sv = [float(sim_ttft[i]) for i in ids]  # type: ignore[arg-type]
    spearman = float(np.corrcoef(ranks(lv), ranks(sv))[0, 1])
    report.append(f"TTFT rank correlation {spearman:.3f}")
    assert max(sv) > 10 * min(sv), "the workload must make requests queue (else TTFT is just the prefill time)"
    assert spearman >= 0.75, report
    agree, pairs = order_agreement(lv, sv, margin=1.0)
    report.append(f"first-token order agrees on {agree}/{pairs} pairs the simulator separates by > 1 s")
    assert pairs >= 300 and agree >= 0.85 * pairs, report
    close = sum(1 for a, b in zip(lv, sv, strict=True) if abs(a - b) <= 0.5 + 0.25 * b)
    report.append(f"{close}/{len(ids)} TTFTs within 0.5 s + 25 %")
    assert close >= 0.8 * len(ids), report

    # preemptions: decided by the engine scheduler from the batch's memory growth
    live_preemptions = sum(s.load.total_preemptions for s in statuses)
    sim_preemptions = sum(len(r.preemptions) for r in result.records)
    report.append(f"preemptions live {live_preemptions} sim {sim_preemptions}")
    assert sim_preemptions >= 10, report
    assert abs(live_preemptions - sim_preemptions) <= max(5, 0.4 * sim_preemptions), report

    for metric in ("prefill_s", "decode_s"):
        measured, simulated = live["overall"][metric]["mean"], sim["overall"][metric]["mean"]
        report.append(f"{metric} mean live {measured:.4f} s sim {simulated:.4f} s")
        assert abs(measured / simulated - 1) <= TOLERANCE, report
    print("; ".join(report))
