"""The llumlet's vLLM-named metrics: each series follows the events fed to it (fake clock), and the exposition uses
vLLM's metric names with ``model_name`` and ``instance`` labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pyllumnix.data_plane.engine.base import Finish, LoadSnapshot, TokenOutput
from pyllumnix.data_plane.llumlet.llumlet import LlumletStats
from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics
from pyllumnix.protos.llumnix.v1 import llumlet_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def load(running: int = 1, waiting: int = 2) -> LoadSnapshot:
    return LoadSnapshot(
        total_blocks=100,
        free_blocks=75,
        block_size=16,
        watermark_blocks=1,
        num_running=running,
        num_waiting=waiting,
        num_preempted=0,
        head_of_line_demand_blocks=0,
        waiting_demand_blocks=0,
        reserved_blocks=0,
        total_preemptions=3,
    )


def samples(m: InstanceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = m.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


LABELS = (("instance", "i0"), ("model_name", "m"))


def reason(r: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((*LABELS, ("finished_reason", r))))


def test_request_lifecycle_feeds_every_series() -> None:
    clock = Clock()
    stats = LlumletStats()
    ids: list[str] = []
    m = InstanceMetrics("i0", "m", load, lambda: stats.migration, lambda: ids, clock=clock)
    m.added("r1", 7, arrival=clock.now - 0.5)  # arrived in the cluster 0.5 s before reaching this instance
    ids.append("r1")
    clock.now += 0.2
    step_start = clock.now
    clock.now += 0.1
    m.outputs([TokenOutput("r1", (5,), 0)], step_start)
    clock.now += 0.05
    m.outputs([TokenOutput("r1", (6, 7), 1)], clock.now)
    clock.now += 0.05
    m.outputs([TokenOutput("r1", (8,), 3, finished=True, finish=Finish.LENGTH)], clock.now)
    s = samples(m)
    assert s["vllm:prompt_tokens_total", LABELS] == 7
    assert s["vllm:generation_tokens_total", LABELS] == 4
    assert s["vllm:request_success_total", reason("length")] == 1
    assert s["vllm:request_success_total", reason("stop")] == 0
    assert abs(s["vllm:time_to_first_token_seconds_sum", LABELS] - 0.3) < 1e-9
    assert abs(s["vllm:request_queue_time_seconds_sum", LABELS] - 0.2) < 1e-9
    assert s["vllm:inter_token_latency_seconds_count", LABELS] == 2
    assert abs(s["vllm:inter_token_latency_seconds_sum", LABELS] - 0.1) < 1e-9
    # e2e from the cluster arrival: 0.5 + 0.2 + 0.1 + 0.05 + 0.05
    assert abs(s["vllm:e2e_request_latency_seconds_sum", LABELS] - 0.9) < 1e-9
    assert abs(s["vllm:request_time_per_output_token_seconds_sum", LABELS] - 0.1 / 3) < 1e-9
    assert s["vllm:num_requests_running", LABELS] == 1
    assert s["vllm:num_requests_waiting", LABELS] == 2
    assert s["vllm:kv_cache_usage_perc", LABELS] == 0.25
    # the pre-V1 names older dashboards chart: the same figures
    assert s["vllm:gpu_cache_usage_perc", LABELS] == 0.25
    assert s["vllm:time_per_output_token_seconds_count", LABELS] == 2
    assert s["vllm:time_per_output_token_seconds_sum", LABELS] == s["vllm:inter_token_latency_seconds_sum", LABELS]
    assert s["vllm:num_preemptions_total", LABELS] == 3

    # cumulative buckets with Prometheus' le (<=): TTFT 0.3 s is above 0.25, within 0.5 and +Inf
    def bucket(name: str, le: str) -> float:
        return s[f"{name}_bucket", tuple(sorted((*LABELS, ("le", le))))]

    assert bucket("vllm:time_to_first_token_seconds", "0.25") == 0
    assert bucket("vllm:time_to_first_token_seconds", "0.5") == 1
    assert bucket("vllm:time_to_first_token_seconds", "+Inf") == 1
    assert bucket("vllm:request_prompt_tokens", "5.0") == 0 and bucket("vllm:request_prompt_tokens", "10.0") == 1
    assert bucket("vllm:request_generation_tokens", "2.0") == 0 and bucket("vllm:request_generation_tokens", "5.0") == 1


def test_migrated_in_request_counts_only_what_happened_here() -> None:
    clock = Clock()
    stats = LlumletStats()
    m = InstanceMetrics("i0", "m", load, lambda: stats.migration, lambda: ["r2"], clock=clock)
    m.adopted("r2", 100, num_generated=10, arrival=clock.now - 2.0, first_token=clock.now - 1.0)
    clock.now += 0.03
    m.outputs([TokenOutput("r2", (1,), 10)], clock.now)
    clock.now += 0.03
    m.outputs([TokenOutput("r2", (2,), 11, finished=True, finish=Finish.STOP)], clock.now)
    s = samples(m)
    assert s["vllm:prompt_tokens_total", LABELS] == 0  # prefilled on the source
    assert s["vllm:time_to_first_token_seconds_count", LABELS] == 0
    assert s["vllm:generation_tokens_total", LABELS] == 2
    assert s["vllm:inter_token_latency_seconds_count", LABELS] == 1
    assert abs(s["vllm:e2e_request_latency_seconds_sum", LABELS] - 2.06) < 1e-9
    assert s["vllm:request_success_total", reason("stop")] == 1


def test_migrations_and_downtime_come_from_the_llumlet_stats() -> None:
    stats = LlumletStats()
    stats.record_migration(llumlet_pb2.MigrationResult(outcome=llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, downtime_ms=4))
    stats.record_migration(llumlet_pb2.MigrationResult(outcome=llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION))
    m = InstanceMetrics("i0", "m", load, lambda: stats.migration, lambda: [])
    s = samples(m)
    assert s["llumnix_llumlet_migrations_total", (("instance", "i0"), ("outcome", "committed"))] == 1
    assert s["llumnix_llumlet_migrations_total", (("instance", "i0"), ("outcome", "aborted_by_destination"))] == 1
    assert s["llumnix_llumlet_migration_downtime_seconds_bucket", (("instance", "i0"), ("le", "0.002"))] == 0
    assert s["llumnix_llumlet_migration_downtime_seconds_bucket", (("instance", "i0"), ("le", "0.005"))] == 1
    assert s["llumnix_llumlet_migration_downtime_seconds_count", (("instance", "i0"),)] == 1


def test_requests_that_left_silently_are_pruned_at_scrape() -> None:
    here = ["a"]
    m = InstanceMetrics("i0", "m", load, lambda: LlumletStats().migration, lambda: here)
    m.added("a", 1)
    m.added("b", 1)  # e.g. migrated out since: the engine no longer has it
    m.render()
    assert set(m._tracked) == {"a"}
