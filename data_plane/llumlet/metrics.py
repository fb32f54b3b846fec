"""Per-instance Prometheus metrics of one llumlet, under vLLM's metric names (``vllm:*``) so dashboards built for vLLM
work unchanged, plus the llumlet's own migration figures (``llumnix_llumlet_*``).

Why the llumlet and not the frontend: these are the engine's figures (queue time, running and waiting requests, KV
usage), which vLLM reports per engine; only the instance sees when a request was scheduled. Every series carries
``model_name`` (vLLM's label) and ``instance`` (the instance id, the label the other ``llumnix_*`` series use).
Because ``instance`` is also Prometheus' target label, scrape llumlets with ``honor_labels: true``.

Request-level figures follow vLLM V1's definitions as far as an instance can see them:

- ``vllm:request_queue_time_seconds``: arrival at this instance to the start of the step that produced the first
  token (the engine has no chunked prefill, so that step is the request's first scheduling);
- ``vllm:time_to_first_token_seconds``: arrival at this instance to the first token leaving the engine step;
- ``vllm:inter_token_latency_seconds``: time between two consecutive outputs of a request on this instance;
- ``vllm:e2e_request_latency_seconds`` and ``vllm:request_time_per_output_token_seconds``: at the finish, from the
  request's arrival in the cluster (a migrated request keeps its original arrival time);
- ``vllm:prompt_tokens_total`` counts a prompt once it is prefilled here (a request migrated in was prefilled
  elsewhere); ``vllm:generation_tokens_total`` counts every token this instance produced.

A request migrated in is therefore counted where each event happened: its first token and queue time on the source,
its later tokens and its finish on the destination. Gauges are read from the engine at scrape time (the scrape runs
on the llumlet's event loop, between two engine steps).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pyllumnix.data_plane.engine.base import LoadSnapshot, TokenOutput
from pyllumnix.protos.llumnix.v1 import common_pb2

if TYPE_CHECKING:
    from pyllumnix.data_plane.engine.vllm.stats import VllmSchedulerStats

# vLLM V1's buckets (vllm/v1/metrics/loggers.py), so histogram_quantile over both gives comparable answers.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# vLLM's finished_reason label values; every one is exported from the start (at 0) as vLLM does.
FINISHED_REASONS = ("stop", "length", "abort", "error")
# Requests remembered before the ones that left without a final output (migrated out) are pruned outside a scrape.
PRUNE_AT = 4096


class _Histogram:
    """A histogram's state: per-bucket counts (``bisect``: the first bound >= the value, Prometheus' ``le``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=labels)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), float(cumulative)))
        family.add_metric(values, buckets, self.sum)
        return family


@dataclass
class _Tracked:
    """What the metrics remember of one request while this instance holds it."""

    arrival: float  # wall-clock arrival in the cluster (time.time())
    arrived_here: float  # wall-clock arrival at this instance
    num_prompt_tokens: int
    first_token: float | None = None  # wall clock of its first token (here or, migrated in, on the source)
    last_output: float | None = None  # wall clock of its latest output on this instance
    num_generated: int = 0  # tokens generated so far (all instances)


class InstanceMetrics(Collector):
    """The registry served at a llumlet's ``/metrics``; the llumlet calls :meth:`added`, :meth:`adopted` and
    :meth:`outputs`, and the gauges read ``load()`` (the engine's load snapshot) and ``migration()`` at scrape time."""

    def __init__(
        self,
        instance_id: str,
        model_name: str,
        load: Callable[[], LoadSnapshot],
        migration: Callable[[], common_pb2.MigrationStats],
        request_ids: Callable[[], Iterable[str]],
        *,
        vllm_stats: Callable[[], VllmSchedulerStats] | None = None,
        late_adds_refused: Callable[[], int] = lambda: 0,
        report_failures: Callable[[], int] = lambda: 0,
        streams_opened: Callable[[], dict[tuple[str, str], int]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance_id = instance_id
        self.model_name = model_name
        self._load = load
        self._migration = migration
        self._request_ids = request_ids
        self._vllm_stats = vllm_stats
        # The llumlet's own counters of things an operator must see grow (read at scrape time, as the gauges).
        self._late_adds_refused = late_adds_refused
        self._report_failures = report_failures
        # (stream, transport) -> streams opened: the outputs and the load reports, over frames or gRPC.
        self._streams_opened = streams_opened
        self._clock = clock
        self._tracked: dict[str, _Tracked] = {}
        # Plain accumulators rendered at scrape time: the per-output path takes no lock and allocates nothing (it
        # runs for every token batch of every request, between engine steps).
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.tpot = _Histogram(ITL_BUCKETS)
        self.e2e = _Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = _Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_prompt = _Histogram(TOKEN_COUNT_BUCKETS)
        self.request_generation = _Histogram(TOKEN_COUNT_BUCKETS)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # --- events (called by the llumlet, on its loop) ---
    def added(self, request_id: str, num_prompt_tokens: int, arrival: float | None = None) -> None:
        """A request arrived here from its frontend; ``arrival``: its cluster arrival time (default: now)."""
        now = self._clock()
        if len(self._tracked) >= PRUNE_AT:
            self.prune()
        self._tracked[request_id] = _Tracked(arrival or now, now, num_prompt_tokens)

    def adopted(
        self, request_id: str, num_prompt_tokens: int, num_generated: int, arrival: float, first_token: float
    ) -> None:
        """A request migrated in, with ``num_generated`` tokens already produced elsewhere."""
        now = self._clock()
        self._tracked[request_id] = _Tracked(
            arrival or now,
            now,
            num_prompt_tokens,
            first_token=first_token or None,
            last_output=None,
            num_generated=num_generated,
        )

    def outputs(self, outputs: list[TokenOutput], step_started: float | None = None) -> None:
        """One step's outputs (or outputs produced between steps: aborts, errors); ``step_started``: wall clock of
        the start of the step that produced them."""
        now = self._clock()
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            n = len(out.token_ids)
            if n:
                self.generation_tokens += n
                if t.first_token is None and t.num_generated == 0:
                    t.first_token = now
                    self.ttft.observe(now - t.arrived_here)
                    self.queue.observe(max(0.0, (step_started if step_started is not None else now) - t.arrived_here))
                    self.prompt_tokens += t.num_prompt_tokens
                    self.request_prompt.observe(t.num_prompt_tokens)
                elif t.last_output is not None:
                    self.itl.observe(now - t.last_output)
                t.last_output = now
                t.num_generated += n
            if out.finished:
                del self._tracked[out.request_id]
                reason = out.finish.name.lower() if out.finish is not None else "stop"
                self.success[reason if reason in self.success else "error"] += 1
                if reason in ("stop", "length"):
                    self.e2e.observe(max(0.0, now - t.arrival))
                    self.request_generation.observe(t.num_generated)
                    if t.first_token is not None and t.num_generated > 1:
                        self.tpot.observe(max(0.0, now - t.first_token) / (t.num_generated - 1))

    def prune(self) -> None:
        """Forgets requests that left without a final output here (migrated out, aborted silently)."""
        here = set(self._request_ids())
        for rid in [r for r in self._tracked if r not in here]:
            del self._tracked[rid]

    # --- scrape ---
    def collect(self) -> Iterator[Metric]:
        self.prune()
        labels = ["model_name", "instance"]
        values = [self.model_name, self.instance_id]
        load = self._load()
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels=labels
        )
        running.add_metric(values, load.num_running)
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=labels
        )
        waiting.add_metric(values, load.num_waiting)
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels
        )
        vllm = self._vllm_stats() if self._vllm_stats is not None else None
        if vllm is not None and vllm.steps:  # vLLM's own figure (its block accounting) once it has stepped
            kv_usage = vllm.kv_cache_usage
        else:
            kv_usage = (load.total_blocks - load.free_blocks) / load.total_blocks if load.total_blocks else 0.0
        usage.add_metric(values, kv_usage)
        # The pre-V1 name, for dashboards that still chart it (vLLM V1 shows it only with --show-hidden-metrics).
        gpu_usage = GaugeMetricFamily(
            "vllm:gpu_cache_usage_perc", "Deprecated name of vllm:kv_cache_usage_perc.", labels=labels
        )
        gpu_usage.add_metric(values, kv_usage)
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=labels
        )
        preemptions.add_metric(values, load.total_preemptions)
        yield from (running, waiting, usage, gpu_usage, preemptions)
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels)
        prompt.add_metric(values, self.prompt_tokens)
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        generation.add_metric(values, self.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*labels, "finished_reason"]
        )
        for reason, count in self.success.items():
            success.add_metric([*values, reason], count)
        yield from (prompt, generation, success)
        yield self.ttft.family(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, values
        )
        yield self.itl.family(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels, values
        )
        # The pre-V1 name of the inter-token latency (same observations), for older dashboards.
        yield self.itl.family(
            "vllm:time_per_output_token_seconds",
            "Deprecated name of vllm:inter_token_latency_seconds.",
            labels,
            values,
        )
        yield self.tpot.family(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            labels,
            values,
        )
        yield self.e2e.family(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels, values
        )
        yield self.queue.family(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", labels, values
        )
        yield self.request_prompt.family(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", labels, values
        )
        yield self.request_generation.family(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", labels, values
        )
        if vllm is not None:
            queries = CounterMetricFamily(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                labels=labels,
            )
            queries.add_metric(values, vllm.prefix_cache_queries)
            hits = CounterMetricFamily(
                "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels=labels
            )
            hits.add_metric(values, vllm.prefix_cache_hits)
            yield from (queries, hits)
        stats = self._migration()
        migrations = CounterMetricFamily(
            "llumnix_llumlet_migrations",
            "Outgoing migrations of this instance by outcome",
            labels=["instance", "outcome"],
        )
        migrations.add_metric([self.instance_id, "committed"], stats.committed)
        migrations.add_metric([self.instance_id, "aborted_by_source"], stats.aborted_by_source)
        migrations.add_metric([self.instance_id, "aborted_by_destination"], stats.aborted_by_destination)
        yield migrations
        downtime = HistogramMetricFamily(
            "llumnix_llumlet_migration_downtime_seconds",
            "Last-stage downtime of this instance's committed outgoing migrations",
            labels=["instance"],
        )
        # The llumlet's bucket counts are already cumulative (each counts the downtimes <= its bound).
        buckets = [
            ("+Inf" if math.isinf(le) else repr(le / 1000), float(count))
            for le, count in zip(stats.downtime_bucket_le_ms, stats.downtime_bucket_counts, strict=True)
        ]
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", float(stats.committed)))
        downtime.add_metric([self.instance_id], buckets, stats.downtime_sum_ms / 1000)
        yield downtime
        late = CounterMetricFamily(
            "llumnix_llumlet_late_adds_refused",
            "AddRequests refused because their caller had given up (deadline passed, or its abort came first)",
            labels=["instance"],
        )
        late.add_metric([self.instance_id], self._late_adds_refused())
        failures = CounterMetricFamily(
            "llumnix_llumlet_load_report_failures",
            "Load-report ticks skipped because the instance's load could not be read",
            labels=["instance"],
        )
        failures.add_metric([self.instance_id], self._report_failures())
        streams = CounterMetricFamily(
            "llumnix_llumlet_streams_opened",
            "Output and load-report streams opened, by transport (framed: the peer's framed TLS port; grpc: the "
            "fallback when it offers none or cannot be reached)",
            labels=["instance", "stream", "transport"],
        )
        for (stream, transport), opened in sorted(self._streams_opened().items()):
            streams.add_metric([self.instance_id, stream, transport], opened)
        yield from (late, failures, streams)

    def render(self) -> bytes:
        return generate_latest(self.registry)
