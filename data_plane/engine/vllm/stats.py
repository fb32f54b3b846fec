"""vLLM's own scheduler statistics, kept per engine for the llumlet's ``/metrics``.

The adapter runs vLLM's EngineCore with ``log_stats=True``, so every step's outputs carry vLLM's ``SchedulerStats``
(running and waiting requests, KV-cache usage as vLLM computes it, prefix-cache queries and hits of that step). vLLM's
own Prometheus logger lives in its API-server process, which this in-process engine does not have; these totals are
what that logger would count, and the llumlet exports them under vLLM's names (``vllm:kv_cache_usage_perc``,
``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``).

Written by the engine's step (in a worker thread), read by a scrape on the event loop: plain numbers, each assignment
atomic, a scrape sees the latest step's or the previous step's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class VllmSchedulerStats:
    steps: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def record(self, stats: Any) -> None:
        """Folds one step's ``vllm.v1.metrics.stats.SchedulerStats`` in."""
        self.steps += 1
        self.num_running = int(stats.num_running_reqs)
        self.num_waiting = int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0))
        self.kv_cache_usage = float(stats.kv_cache_usage)
        prefix = stats.prefix_cache_stats
        if prefix is not None:
            self.prefix_cache_queries += int(prefix.queries)
            self.prefix_cache_hits += int(prefix.hits)
