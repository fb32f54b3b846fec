"""Per-request latencies (the paper's prefill, decode, end-to-end and preemption loss) and their summary statistics.

Percentiles use ``numpy.percentile`` with its default ``method="linear"`` (Hyndman-Fan type 7: linear interpolation
between the two closest ranks), so P50 of [1, 2, 3, 4] is 2.5 and P99 of 100 values lies between the 99th and 100th.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pyllumnix.tools.metrics.records import RequestRecord

Stats = dict[str, float | int | None]


def prefill_latency(record: RequestRecord) -> float | None:
    """Arrival to first token (queueing + prefill, including any re-prefill before the first token)."""
    if record.first_token_time is None:
        return None
    return record.first_token_time - record.arrival


def decode_latency(record: RequestRecord) -> float | None:
    """Mean gap between the request's later tokens: (last token - first token) / (n_out - 1); None if n_out <= 1.

    With ``token_times`` the first and last token times are taken from them; otherwise from first_token_time and
    finish_time (the finish is the last token's time).
    """
    if record.token_times is not None and len(record.token_times) >= 2:
        times = record.token_times
        return (times[-1] - times[0]) / (len(times) - 1)
    if record.first_token_time is None or record.finish_time is None or record.num_output_tokens <= 1:
        return None
    return (record.finish_time - record.first_token_time) / (record.num_output_tokens - 1)


def e2e_latency(record: RequestRecord) -> float | None:
    """Arrival to the last token."""
    if record.finish_time is None:
        return None
    return record.finish_time - record.arrival


def token_gaps(record: RequestRecord) -> list[float]:
    """Every gap between consecutive output tokens (needs ``token_times``; otherwise empty)."""
    if record.token_times is None:
        return []
    times = record.token_times
    return [b - a for a, b in itertools.pairwise(times)]


def preemption_loss(record: RequestRecord) -> float:
    """The paper's preemption loss of one request: summed over its preemptions, the time from preemption to
    re-prefill, plus the recompute prefill time, minus one decode step (the re-prefill emits the token a decode step
    would have). Each preemption's loss is floored at 0. A request never preempted has loss 0.

    The decode step is the preemption's own ``decode_step_s`` if set, else the request's mean decode latency, else 0.
    """
    if not record.preemptions:
        return 0.0
    default_step = decode_latency(record) or 0.0
    total = 0.0
    for p in record.preemptions:
        step = default_step if p.decode_step_s is None else p.decode_step_s
        total += max(0.0, (p.readmit_time - p.preempt_time) + p.recompute_prefill_s - step)
    return total


def stats(values: Iterable[float]) -> Stats:
    """count, mean, p50, p99 and max of ``values`` (None for each statistic when there are none)."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(array, [50.0, 99.0], method="linear")
    return {
        "count": int(array.size),
        "mean": float(array.mean()),
        "p50": float(p50),
        "p99": float(p99),
        "max": float(array.max()),
    }


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def latency_stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Latency statistics of a group of records, plus the group's preemption and migration figures.

    Prefill counts every request that got a first token; decode and end-to-end count finished requests (decode only
    those with more than one output token). ``preemption_loss_s`` is the mean over ALL records of the group,
    including those never preempted, as in the paper.
    """
    finished = [r for r in records if r.finished]
    losses = [preemption_loss(r) for r in records]
    gaps = [g for r in finished for g in token_gaps(r)]
    result: dict[str, Any] = {
        "num_requests": len(records),
        "num_finished": len(finished),
        "prefill_s": stats(_present(prefill_latency(r) for r in records)),
        "decode_s": stats(_present(decode_latency(r) for r in finished)),
        "e2e_s": stats(_present(e2e_latency(r) for r in finished)),
        "preemption_loss_s": float(np.mean(losses)) if losses else 0.0,
        "num_preemptions": sum(len(r.preemptions) for r in records),
        "num_preempted_requests": sum(1 for r in records if r.preemptions),
        "num_migrations": sum(len(r.migrations) for r in records),
        "num_failed_migrations": sum(1 for r in records for m in r.migrations if not m.succeeded),
    }
    if gaps:
        result["token_gap_s"] = stats(gaps)
    downtimes = [m.downtime_s for r in records for m in r.migrations if m.succeeded]
    if downtimes:
        result["migration_downtime_s"] = stats(downtimes)
    return result
