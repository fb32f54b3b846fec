"""Request by request: a kept live run (``llumnix sim live --work-dir``) beside the simulation of the same arrivals.

Where the live and simulated ratios part, the aggregate table cannot say why; this compares the runs on the same
request ids: how many requests went to each instance (the live frontend's dispatch spans, ``--trace``), how long
each request waited for its first token and which requests make up the tail (a P99 of 600 requests is the 6th
worst), the per-token decode time, and the migrations.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyllumnix.tools.metrics.latency import decode_latency, prefill_latency, stats
from pyllumnix.tools.metrics.records import RequestRecord

# Prefill latencies counted as "queued" (the share of requests waiting longer than these, seconds).
QUEUED_S = (2.0, 10.0)
TAIL = 6  # the P99 of 600 requests is the 6th worst


def live_records(path: Path) -> list[RequestRecord]:
    """The records ``bench serving --records`` wrote."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append(
            RequestRecord(
                request_id=r["request_id"],
                priority=r["priority"],
                arrival=r["arrival"],
                first_token_time=r["first_token_time"],
                finish_time=r["finish_time"],
                num_output_tokens=r["num_output_tokens"],
                input_len=r["input_len"],
                token_times=tuple(r["token_times"]) or None,
            )
        )
    return out


def live_dispatch(traces: Path) -> list[int]:
    """Requests the frontend dispatched to each instance (ascending), from its ``dispatch`` spans."""
    counts: Counter[str] = Counter()
    for f in sorted(traces.glob("*frontend*.jsonl")):
        for line in f.read_text().splitlines():
            span = json.loads(line)
            if span.get("name") == "dispatch" and "llumnix.instance_id" in span.get("attributes", {}):
                counts[span["attributes"]["llumnix.instance_id"]] += 1
    return sorted(counts.values())


def live_migrations(traces: Path) -> dict[str, Any]:
    """The llumlets' ``migration`` spans: attempts, committed ones, their duration and downtime (seconds)."""
    spans = [
        json.loads(line)
        for f in sorted(traces.glob("*llumlet*.jsonl"))
        for line in f.read_text().splitlines()
        if '"migration"' in line
    ]
    spans = [s for s in spans if s.get("name") == "migration"]
    done = [s for s in spans if s.get("attributes", {}).get("llumnix.outcome") == "MIGRATION_OUTCOME_COMMITTED"]
    return {
        "attempted": len(spans),
        "committed": len(done),
        "duration_s": stats((s["end_ns"] - s["start_ns"]) / 1e9 for s in done),
        "downtime_s": stats(float(s["attributes"].get("llumnix.downtime_ms", 0.0)) / 1000 for s in done),
    }


def _by_id(records: Sequence[RequestRecord], fn: Any) -> dict[str, float]:
    return {r.request_id: v for r in records if (v := fn(r)) is not None}


def compare(live: Sequence[RequestRecord], sim: Sequence[RequestRecord]) -> dict[str, Any]:
    """Per-request agreement of one policy's live and simulated runs (same request ids)."""
    lp, sp = _by_id(live, prefill_latency), _by_id(sim, prefill_latency)
    ld, sd = _by_id(live, decode_latency), _by_id(sim, decode_latency)
    ids = sorted(lp.keys() & sp.keys())
    lv = np.array([lp[i] for i in ids])
    sv = np.array([sp[i] for i in ids])

    def ranks(a: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(a)).astype(float)

    worst_live = sorted(ids, key=lambda i: -lp[i])[:TAIL]
    worst_sim = sorted(ids, key=lambda i: -sp[i])[:TAIL]
    dec_ids = sorted(ld.keys() & sd.keys())
    dec_ratio = np.array([ld[i] / sd[i] for i in dec_ids if sd[i] > 0])
    out: dict[str, Any] = {
        "requests": len(ids),
        "prefill_spearman": float(np.corrcoef(ranks(lv), ranks(sv))[0, 1]) if len(ids) > 2 else None,
        "prefill_live_over_sim_median": float(np.median(lv / np.maximum(sv, 1e-9))) if ids else None,
        "worst_live": [(i, round(lp[i], 2), round(sp[i], 2)) for i in worst_live],
        "worst_sim": [(i, round(sp[i], 2), round(lp[i], 2)) for i in worst_sim],
        "worst_shared": len(set(worst_live) & set(worst_sim)),
        "decode_live_over_sim_median": float(np.median(dec_ratio)) if len(dec_ratio) else None,
    }
    for s in QUEUED_S:
        out[f"share_prefill_over_{s:g}s"] = {
            "live": float(np.mean(lv > s)) if ids else None,
            "sim": float(np.mean(sv > s)) if ids else None,
        }
    # Which requests wait: the simulated and live sets of requests that queued more than 10 s.
    lq = {i for i in ids if lp[i] > QUEUED_S[-1]}
    sq = {i for i in ids if sp[i] > QUEUED_S[-1]}
    out["queued_over_10s"] = {"live": len(lq), "sim": len(sq), "both": len(lq & sq)}
    return out
