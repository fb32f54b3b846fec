"""Per-request latencies, percentiles and preemption loss on tiny hand-computed cases."""

from __future__ import annotations

import pytest

from pyllumnix.tools.metrics import (
    Migration,
    Preemption,
    RequestRecord,
    decode_latency,
    e2e_latency,
    latency_stats,
    preemption_loss,
    prefill_latency,
    stats,
    token_gaps,
)
from pyllumnix.tools.workload import PRIORITY_HIGH, PRIORITY_NORMAL

# A: arrives 0, first token 2, finishes 10 with 5 tokens: prefill 2, decode (10 - 2) / 4 = 2, e2e 10.
A = RequestRecord("a", PRIORITY_NORMAL, 0.0, 2.0, 10.0, 5)
# B: arrives 1, first token 1.5, finishes 3.5 with 3 tokens: prefill 0.5, decode 2 / 2 = 1, e2e 2.5.
B = RequestRecord("b", PRIORITY_HIGH, 1.0, 1.5, 3.5, 3)
# C: one output token: prefill 2, no decode latency, e2e 2.
C = RequestRecord("c", PRIORITY_NORMAL, 2.0, 4.0, 4.0, 1)
# D: got its first token at 6 but never finished: prefill 3 only.
D = RequestRecord("d", PRIORITY_NORMAL, 3.0, 6.0, None, 2)
# E: never started.
E = RequestRecord("e", PRIORITY_NORMAL, 4.0, None, None, 0)


def test_per_request_latencies() -> None:
    assert [prefill_latency(r) for r in (A, B, C, D, E)] == [2.0, 0.5, 2.0, 3.0, None]
    assert [decode_latency(r) for r in (A, B, C, D, E)] == [2.0, 1.0, None, None, None]
    assert [e2e_latency(r) for r in (A, B, C, D, E)] == [10.0, 2.5, 2.0, None, None]


def test_token_times_drive_decode_latency() -> None:
    # Tokens at 2, 3, 3.5, 6: gaps 1, 0.5, 2.5; mean decode = (6 - 2) / 3 = 4/3.
    r = RequestRecord("t", PRIORITY_NORMAL, 0.0, 2.0, 6.0, 4, token_times=(2.0, 3.0, 3.5, 6.0))
    assert decode_latency(r) == pytest.approx(4 / 3)
    assert token_gaps(r) == [1.0, 0.5, 2.5]


def test_stats_use_linear_percentiles() -> None:
    # [1, 2, 3, 4]: mean 2.5; P50 at rank 0.5 * 3 = 1.5 -> 2.5; P99 at rank 0.99 * 3 = 2.97 -> 3 + 0.97 = 3.97.
    assert stats([4.0, 1.0, 3.0, 2.0]) == {"count": 4, "mean": 2.5, "p50": 2.5, "p99": pytest.approx(3.97), "max": 4.0}
    assert stats([]) == {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}


def test_preemption_loss() -> None:
    # Preempted at 4, re-prefill starts at 7 and takes 0.5 s; A's decode step is 2 s: loss = 3 + 0.5 - 2 = 1.5.
    a = RequestRecord("a", PRIORITY_NORMAL, 0.0, 2.0, 10.0, 5, preemptions=(Preemption(4.0, 7.0, 0.5),))
    assert preemption_loss(a) == pytest.approx(1.5)
    # Two preemptions, the second with its own decode step 0.1: (1.5) + (8 - 7.5 + 0.2 - 0.1 = 0.6) = 2.1.
    a2 = RequestRecord(
        "a", PRIORITY_NORMAL, 0.0, 2.0, 10.0, 5, preemptions=(Preemption(4.0, 7.0, 0.5), Preemption(7.5, 8.0, 0.2, 0.1))
    )
    assert preemption_loss(a2) == pytest.approx(2.1)
    # A short wait with a quick re-prefill costs less than the decode step it replaces: floored at 0.
    quick = RequestRecord("q", PRIORITY_NORMAL, 0.0, 2.0, 10.0, 5, preemptions=(Preemption(4.0, 4.5, 0.5),))
    assert preemption_loss(quick) == 0.0
    # A single-token request has no decode step to subtract: loss = 1 + 0.5.
    one = RequestRecord("o", PRIORITY_NORMAL, 0.0, 3.0, 3.0, 1, preemptions=(Preemption(1.0, 2.0, 0.5),))
    assert preemption_loss(one) == pytest.approx(1.5)
    assert preemption_loss(B) == 0.0


def test_group_stats_average_preemption_loss_over_all_requests() -> None:
    preempted = RequestRecord("a", PRIORITY_NORMAL, 0.0, 2.0, 10.0, 5, preemptions=(Preemption(4.0, 7.0, 0.5),))
    records = [preempted, B, C, D, E]
    s = latency_stats(records)
    assert s["num_requests"] == 5 and s["num_finished"] == 3
    # Prefill over the 4 requests with a first token: [2, 0.5, 2, 3] -> mean 7.5 / 4 = 1.875.
    assert s["prefill_s"] == {"count": 4, "mean": 1.875, "p50": 2.0, "p99": pytest.approx(2.97), "max": 3.0}
    # Decode over finished requests with > 1 token: [2, 1] -> mean 1.5.
    assert s["decode_s"]["mean"] == 1.5
    # End-to-end over finished requests: [10, 2.5, 2] -> mean 14.5 / 3.
    assert s["e2e_s"]["mean"] == pytest.approx(14.5 / 3)
    # Loss 1.5 on one request, 0 on the other four: 1.5 / 5 = 0.3.
    assert s["preemption_loss_s"] == pytest.approx(0.3)
    assert (s["num_preemptions"], s["num_preempted_requests"]) == (1, 1)


def test_migration_counts_and_downtime() -> None:
    migrated = RequestRecord(
        "m",
        PRIORITY_NORMAL,
        0.0,
        1.0,
        5.0,
        3,
        migrations=(Migration(2.0, 2.5, 0.02), Migration(3.0, 3.1, 0.0, succeeded=False)),
    )
    s = latency_stats([migrated, A])
    assert (s["num_migrations"], s["num_failed_migrations"]) == (2, 1)
    assert s["migration_downtime_s"]["mean"] == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"first_token_time": -1.0}, "first_token_time precedes arrival"),
        ({"first_token_time": None, "finish_time": 1.0}, "finish_time without first_token_time"),
        ({"first_token_time": 2.0, "finish_time": 1.0}, "finish_time precedes first_token_time"),
        ({"priority": 3}, "priority must be one of"),
        ({"token_times": (2.0, 1.0)}, "token_times must be non-decreasing"),
    ],
)
def test_inconsistent_records_rejected(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "request_id": "x",
        "priority": PRIORITY_NORMAL,
        "arrival": 0.0,
        "first_token_time": 1.0,
        "finish_time": 2.0,
        "num_output_tokens": 2,
    }
    with pytest.raises(ValueError, match=message):
        RequestRecord(**{**base, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precedes preempt_time"):
        Preemption(2.0, 1.0, 0.1)
