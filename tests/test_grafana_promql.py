"""The dashboard checker's PromQL reading: it must find every metric a query selects (or the live dashboard test
could pass with a name nobody exports) and nothing else (labels, functions, keywords, durations)."""

from __future__ import annotations

import json
from pathlib import Path

from pyllumnix.tools.grafana_check import dashboard_metric_names, missing, promql_metric_names

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "llumnix.json"


def test_names_in_typical_queries() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, instance) (rate(vllm:time_to_first_token_seconds_bucket"
        '{model_name=~"$model_name", instance!="x{y}"}[$__rate_interval])))'
    )
    assert promql_metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket"}
    expr = "sum(rate(a_total[5m])) / on (instance) group_left (model) b + c offset 1h > bool 2e3"
    assert promql_metric_names(expr) == {"a_total", "b", "c"}
    assert promql_metric_names("label_values(vllm:num_requests_running, model_name)") == {"vllm:num_requests_running"}
    assert promql_metric_names("clamp_max(llumnix_instance_freeness, 1000)") == {"llumnix_instance_freeness"}


def test_the_repository_dashboard_uses_the_series_this_project_documents() -> None:
    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "llumnix_dispatch_decisions_total"):
        assert name in used
    # a name the cluster does not export is reported with the query that uses it
    absent = missing(json.loads(DASHBOARD.read_text()), set(used) - {"vllm:num_requests_waiting"})
    assert set(absent) == {"vllm:num_requests_waiting"}
