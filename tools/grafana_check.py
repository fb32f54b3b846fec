"""Checks a Grafana dashboard against live ``/metrics``: every metric name its PromQL queries use must be exported.

A dashboard keyed on a name nobody exports shows "No data" forever and nobody notices; this turns that into a failing
check. ``python -m pyllumnix.tools.grafana_check docs/grafana/llumnix.json http://HOST:PORT ...`` scrapes the given
endpoints and exits 1 naming every missing metric (used by ``integration/test_grafana_dashboard.py``).

The PromQL reading is lexical, enough for dashboard queries: strings, label matchers ``{...}``, range/subquery
selectors ``[...]`` and label lists after ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` are
removed; what remains of identifiers not called as functions and not operators/keywords are metric names.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (``label_values(metric, label)`` counts its metric)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\b\d[\w.]*", " ", text)  # numbers and durations (2e3, 0.99, 1h30m)
    names: set[str] = set()
    for m in _IDENT.finditer(text):
        name = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or name in _KEYWORDS or name.startswith("$"):
            continue
        if text[: m.start()].rstrip().endswith(","):  # the label argument of label_values(metric, label)
            continue
        if name.lower() in ("inf", "nan"):
            continue
        names.add(name)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL string of a dashboard: panel targets (rows' nested panels too) and templating queries."""

    def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield str(t["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        yield str(query.get("query", "") if isinstance(query, dict) else query or "")


def dashboard_metric_names(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """metric name -> the queries that use it."""
    used: dict[str, set[str]] = {}
    for expr in dashboard_queries(dashboard):
        for name in promql_metric_names(expr):
            used.setdefault(name, set()).add(expr)
    return used


def exported_names(exposition: str) -> set[str]:
    """Sample names of a Prometheus text exposition (``_bucket``/``_sum``/``_count``/``_total`` included)."""
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


def missing(dashboard: dict[str, Any], exported: set[str]) -> dict[str, set[str]]:
    return {name: exprs for name, exprs in dashboard_metric_names(dashboard).items() if name not in exported}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: grafana_check DASHBOARD.json http://HOST:PORT [...]", file=sys.stderr)
        return 2
    dashboard = json.loads(Path(argv[0]).read_text())
    exported: set[str] = set()
    for url in argv[1:]:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=10) as resp:
            exported |= exported_names(resp.read().decode())
    absent = missing(dashboard, exported)
    for name, exprs in sorted(absent.items()):
        print(f"{name}: not exported (used by {sorted(exprs)[0]!r})", file=sys.stderr)
    return 1 if absent else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
