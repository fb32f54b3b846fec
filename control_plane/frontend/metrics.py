"""Prometheus metrics of one frontend, on a registry of its own.

A private registry keeps several frontends in one process (tests) apart; ``registry`` is the hook through which the
serve process adds its own collectors (per-instance freeness and other scheduler-side gauges) to the same /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# Label values exported from the start (at 0), as vLLM does for finished_reason: a dashboard's rate() over a series
# that appears only with its first event shows "No data" on a healthy cluster.
FINISH_REASONS = ("stop", "length", "abort", "error")
REFUSAL_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llumnix_frontend_requests", "Requests finished, by finish reason", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "llumnix_frontend_rejected_requests", "Requests refused, by status", ["code"], registry=r
        )
        for reason in FINISH_REASONS:
            self.requests.labels(reason)
        for code in REFUSAL_CODES:
            self.rejected.labels(code)
        self.timeouts = Counter(
            "llumnix_frontend_timed_out_requests",
            "Requests ended for lack of output (idle timeout, deadline)",
            registry=r,
        )
        self.inflight = Gauge("llumnix_frontend_inflight_requests", "Requests being served now", registry=r)
        self.prompt_tokens = Counter("llumnix_frontend_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("llumnix_frontend_generation_tokens", "Tokens streamed to clients", registry=r)
        self.ttft = Histogram(
            "llumnix_frontend_ttft_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "llumnix_frontend_e2e_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def count_calls(self, calls: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Exports ``llumnix_frontend_calls_total{method,transport}`` from ``calls()`` ((method, transport) -> calls
        made), read at scrape time: which transport carries this frontend's Dispatch and AddRequest calls."""
        self.registry.register(_CallsCollector(calls))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CallsCollector(Collector):
    def __init__(self, calls: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._calls = calls

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "llumnix_frontend_calls",
            "Dispatch and AddRequest calls made, by transport (framed: the peer's framed call listener; grpc: the "
            "first call to a peer, the fallback, or every call with tracing on)",
            labels=["method", "transport"],
        )
        for (method, transport), made in sorted(self._calls().items()):
            family.add_metric([method, transport], made)
        yield family
