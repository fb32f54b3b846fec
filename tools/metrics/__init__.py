"""Serving metrics: per-request records in, the paper's latency, preemption-loss, fragmentation and cost figures out.

Pure functions over plain records, shared by the discrete-event simulator and the live benchmark client.
"""

from __future__ import annotations

from pyllumnix.tools.metrics.cluster import (
    ClusterSample,
    InstanceSample,
    fragmentation,
    fragmentation_fraction,
    fragmented_blocks,
    instance_hours,
    time_weighted_mean,
)
from pyllumnix.tools.metrics.latency import (
    Stats,
    decode_latency,
    e2e_latency,
    latency_stats,
    preemption_loss,
    prefill_latency,
    stats,
    token_gaps,
)
from pyllumnix.tools.metrics.records import Migration, Preemption, RequestRecord
from pyllumnix.tools.metrics.summary import PRIORITY_NAMES, Row, default_rows, markdown_table, summarize

__all__ = [
    "PRIORITY_NAMES",
    "ClusterSample",
    "InstanceSample",
    "Migration",
    "Preemption",
    "RequestRecord",
    "Row",
    "Stats",
    "decode_latency",
    "default_rows",
    "e2e_latency",
    "fragmentation",
    "fragmentation_fraction",
    "fragmented_blocks",
    "instance_hours",
    "latency_stats",
    "markdown_table",
    "preemption_loss",
    "prefill_latency",
    "stats",
    "summarize",
    "time_weighted_mean",
    "token_gaps",
]
