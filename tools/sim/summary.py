"""One run's JSON summary: the ``tools.metrics`` summary plus migration, conservation and simulator figures."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from pyllumnix.tools.metrics.latency import decode_latency, e2e_latency, prefill_latency, stats
from pyllumnix.tools.metrics.records import RequestRecord
from pyllumnix.tools.metrics.summary import summarize
from pyllumnix.tools.sim.cluster import SimResult
from pyllumnix.tools.sim.migration import Outcome


def migration_summary(result: SimResult) -> dict[str, Any]:
    by_outcome = {o.label: 0 for o in Outcome if o is not Outcome.RUNNING}
    for m in result.migrations:
        if m.outcome is not Outcome.RUNNING:
            by_outcome[m.outcome.label] += 1
    committed = [m for m in result.migrations if m.outcome is Outcome.COMMITTED]
    return {
        "attempted": len(result.migrations),
        **by_outcome,
        "downtime_s": stats(m.downtime_s for m in committed),
        "duration_s": stats(m.end_time - m.start_time for m in committed),
        "stages": stats(float(m.stages) for m in committed),
        "blocks_copied_total": sum(m.blocks_copied for m in committed),
    }


def conservation(result: SimResult, expected_tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """Every request finished exactly once with all its tokens, every engine's pool whole again."""
    unfinished = sum(1 for r in result.records if not r.finished)
    mismatched = (
        sum(1 for r in result.records if r.num_output_tokens != expected_tokens[r.request_id])
        if expected_tokens is not None
        else None
    )
    leaky = [e.instance_id for e in result.engines if e.free_blocks != e.total_blocks or e.reserved_blocks]
    left = [e.instance_id for e in result.engines if e.requests_left]
    return {
        "unfinished": unfinished,
        "token_count_mismatches": mismatched,
        "engines_with_blocks_held": leaky,
        "engines_with_requests_left": left,
        "ok": unfinished == 0 and not mismatched and not leaky and not left,
    }


# Prefill waits the tail table counts (s): beyond 2 s a user notices, beyond 10 s the request is as good as lost.
PREFILL_WAIT_THRESHOLDS_S = (2.0, 10.0)


def tail_summary(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """P50 / P99 / P99.9 of prefill, decode and end-to-end latency, and the share of requests whose prefill took
    longer than each of ``PREFILL_WAIT_THRESHOLDS_S`` (requests with no first token count as over every threshold).
    Tails are where the paper's claims live, and P99 alone swings widely between seeds."""
    out: dict[str, Any] = {}
    for name, fn, group in (
        ("prefill_s", prefill_latency, records),
        ("decode_s", decode_latency, [r for r in records if r.finished]),
        ("e2e_s", e2e_latency, [r for r in records if r.finished]),
    ):
        values = np.asarray([v for r in group if (v := fn(r)) is not None], dtype=np.float64)
        if values.size == 0:
            out[name] = {"p50": None, "p99": None, "p999": None}
            continue
        p50, p99, p999 = np.percentile(values, [50.0, 99.0, 99.9], method="linear")
        out[name] = {"p50": float(p50), "p99": float(p99), "p999": float(p999)}
    n = len(records)
    prefills = [prefill_latency(r) for r in records]
    for limit in PREFILL_WAIT_THRESHOLDS_S:
        over = sum(1 for v in prefills if v is None or v > limit)
        out[f"prefill_over_{limit:g}s"] = over / n if n else 0.0
    return out


def run_summary(result: SimResult, expected_tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """JSON-able; ``expected_tokens`` (request id -> output length) enables the token-count check."""
    summary = summarize(
        result.records,
        cluster_samples=result.cluster_samples,
        instance_series=result.instance_series,
        end_time_s=result.end_time_s,
    )
    counts = [n for _, n in result.instance_series]
    summary["tail"] = tail_summary(result.records)
    summary["migration"] = migration_summary(result)
    summary["conservation"] = conservation(result, expected_tokens)
    summary["instances"] = {"initial": counts[0] if counts else 0, "peak": max(counts, default=0)}
    summary["sim"] = {
        "wall_s": result.wall_s,
        "virtual_s": result.end_time_s,
        "events": result.events,
        "steps": result.steps,
        "load_calls": result.load_calls,
        "stalled": result.stalled,
    }
    config = dataclasses.asdict(result.config)
    summary["config"] = config
    return summary
