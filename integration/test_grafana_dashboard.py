"""The Grafana dashboard in docs/grafana/ charts only what a live cluster exports: every metric name of every PromQL
query (panels and template variables) is among the sample names scraped from a running `llumnix serve`'s frontend,
scheduler replicas and llumlets after a few requests and a migration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from integration.live_metrics import Scrape, live
from pyllumnix.tools.grafana_check import dashboard_metric_names, missing
from pyllumnix.tools.launch import Component

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "llumnix.json"
__all__ = ["live"]


def test_every_dashboard_query_names_exported_metrics(live: tuple[Component, Scrape]) -> None:
    _, scrape = live
    dashboard = json.loads(DASHBOARD.read_text())
    assert len(dashboard_metric_names(dashboard)) >= 15
    absent = missing(dashboard, scrape.names())
    assert not absent, f"the dashboard queries metrics nobody exports: {sorted(absent)}"
