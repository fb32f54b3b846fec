"""summarize() is strict-JSON-able and complete; markdown_table() lines runs up against a baseline."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pyllumnix.tools.metrics import (
    ClusterSample,
    InstanceSample,
    Preemption,
    RequestRecord,
    markdown_table,
    summarize,
)
from pyllumnix.tools.workload import PRIORITY_HIGH, PRIORITY_NORMAL


def _records(scale: float) -> list[RequestRecord]:
    # Two requests; every latency multiplied by ``scale`` so ratios between runs are exact.
    return [
        RequestRecord("a", PRIORITY_NORMAL, 0.0, 2.0 * scale, 10.0 * scale, 5),
        RequestRecord(
            "b", PRIORITY_HIGH, 0.0, 1.0 * scale, 3.0 * scale, 3, preemptions=(Preemption(1.0, 1.0 + scale, 0.0),)
        ),
    ]


def test_summarize() -> None:
    samples = [
        ClusterSample(0.0, (InstanceSample("i", 10, 100, 1, 5),)),  # head fits locally: 0
        ClusterSample(5.0, (InstanceSample("i", 10, 100, 1, 50), InstanceSample("j", 60, 100))),  # 50 / 200
    ]
    s = summarize(_records(1.0), cluster_samples=samples, instance_series=[(0.0, 1), (5.0, 2)])
    json.dumps(s, allow_nan=False)
    assert s["overall"]["num_finished"] == 2
    assert s["overall"]["prefill_s"]["mean"] == 1.5  # (2 + 1) / 2
    assert set(s["by_priority"]) == {"normal", "high"}
    assert s["by_priority"]["high"]["prefill_s"]["mean"] == 1.0
    # b: preempted at 1, readmitted at 2, no recompute time, decode step (3 - 1) / 2 = 1: loss 0; mean 0.
    assert s["overall"]["preemption_loss_s"] == 0.0
    # Runs until the last finish, 10 s: 2 requests / 10 s and 8 tokens / 10 s.
    assert (s["duration_s"], s["throughput_rps"], s["output_tokens_per_s"]) == (10.0, 0.2, 0.8)
    # Fragmentation: 0 for [0, 5), 0.25 for [5, 10) (the blocked head's 50 of the 70 free): 0.125.
    # Instances: 1 x 5 s + 2 x 5 s = 15 s.
    assert s["fragmentation"] == pytest.approx(0.125)
    assert s["instance_hours"] == pytest.approx(15 / 3600)


def test_summarize_empty_is_json() -> None:
    s = summarize([])
    json.dumps(s, allow_nan=False)
    assert s["overall"]["prefill_s"]["mean"] is None
    assert s["by_priority"] == {} and s["fragmentation"] is None and s["instance_hours"] is None


def test_markdown_table() -> None:
    summaries: dict[str, dict[str, Any]] = {
        "infaas++": summarize(_records(2.0)),
        "llumnix": summarize(_records(1.0)),
    }
    table = markdown_table(summaries)
    lines = table.splitlines()
    assert lines[0] == "| metric | infaas++ (baseline) | llumnix |"
    assert lines[1] == "|---|---:|---:|"
    # Prefill mean: (4 + 2) / 2 = 3 vs (2 + 1) / 2 = 1.5 -> ratio 0.50x.
    assert "| prefill mean (s) | 3 | 1.5 (0.50x) |" in lines
    # Per-priority rows appear because the runs have two priority groups.
    assert "| high: prefill mean (s) | 2 | 1 (0.50x) |" in lines
    # No cluster series in either run: the fragmentation row is left out.
    assert not any(line.startswith("| fragmentation") for line in lines)


def test_markdown_table_baseline_and_missing_values() -> None:
    summaries = {"a": {"x": 2.0, "f": 0.079}, "b": {"x": 1.0, "f": 0.007}, "c": {"f": 0.0}}
    rows = [("x (s)", ("x",), "s"), ("frag", ("f",), "pct"), ("gone", ("nope",), "n")]
    table = markdown_table(summaries, baseline="b", rows=rows)
    assert table == (
        "| metric | b (baseline) | a | c |\n"
        "|---|---:|---:|---:|\n"
        "| x (s) | 1 | 2 (2.00x) | - |\n"
        "| frag | 0.70% | 7.90% (11.29x) | 0.00% (0.00x) |\n"
    )
    with pytest.raises(ValueError, match="baseline 'z'"):
        markdown_table(summaries, baseline="z")
    with pytest.raises(ValueError, match="no summaries"):
        markdown_table({})
