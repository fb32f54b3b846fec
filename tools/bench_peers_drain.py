"""``llumnix bench peers``' check between two runs on the same warm cluster: every request ended everywhere and every KV
block is free again, read from the endpoints any operator can read (no credentials needed).

Why: ``bench peers`` starts each system once and replays all its runs against it. A run that left a request running,
a request queued, a block held (a leak, or a migration's reservation not given back) or a process dead would bias the
next run; so the next run starts only once the cluster is back to empty, and a run after which it does not get there
fails loudly instead of being averaged in.

What is read: each frontend's ``GET /get_load`` (requests in flight there, ``{"load": n}``) and each llumlet's
Prometheus ``/metrics`` (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``:
used blocks over total, 0 exactly when every block is free).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# The llumlet series that must read 0 on an idle instance.
IDLE_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass
class Probes:
    """Where a system's emptiness is read: frontends' HTTP base URLs and llumlets' ``host:port`` of ``/metrics``."""

    frontends: list[str] = field(default_factory=list)
    llumlet_metrics: dict[str, str] = field(default_factory=dict)  # name -> host:port


def _get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def llumlet_busy(text: str) -> dict[str, float]:
    """The idle series of one llumlet's /metrics that are not 0 (series name -> value); a series missing from the
    scrape counts as busy (NaN), so a scrape of the wrong endpoint cannot pass for an empty instance."""
    seen: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in IDLE_SERIES:
                seen[sample.name] = seen.get(sample.name, 0.0) + float(sample.value)
    return {name: seen.get(name, float("nan")) for name in IDLE_SERIES if seen.get(name, float("nan")) != 0.0}


def preemptions(probes: Probes, timeout: float = 2.0, get: Callable[[str, float], str] = _get) -> float | None:
    """The llumlets' ``vllm:num_preemptions`` summed (None if one does not answer). Why: a run's difference tells
    whether its instances ran out of KV blocks (the memory pressure at which dispatch decisions start to matter)."""
    total = 0.0
    for address in probes.llumlet_metrics.values():
        try:
            text = get(f"http://{address}/metrics", timeout)
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            if family.name == "vllm:num_preemptions":
                total += sum(float(s.value) for s in family.samples if s.name.endswith("_total"))
    return total


def not_drained(probes: Probes, timeout: float = 2.0, get: Callable[[str, float], str] = _get) -> list[str]:
    """What is not back to empty right now (empty list: drained); an endpoint that does not answer is listed too."""
    left: list[str] = []
    for url in probes.frontends:
        try:
            load = json.loads(get(f"{url.rstrip('/')}/get_load", timeout))["load"]
        except (OSError, ValueError, KeyError) as exc:
            left.append(f"frontend {url}: /get_load failed ({exc})")
            continue
        if load:
            left.append(f"frontend {url}: {load} request(s) in flight")
    for name, address in probes.llumlet_metrics.items():
        try:
            busy = llumlet_busy(get(f"http://{address}/metrics", timeout))
        except (OSError, ValueError) as exc:
            left.append(f"{name}: /metrics failed ({exc})")
            continue
        if busy:
            left.append(f"{name}: " + ", ".join(f"{k.split(':', 1)[1]} {v:g}" for k, v in busy.items()))
    return left


def wait_drained(
    probes: Probes,
    dead: Callable[[], Sequence[str]],
    timeout: float,
    poll: float = 0.25,
    check: Callable[[Probes], list[str]] = not_drained,
) -> dict[str, Any]:
    """Polls until the cluster is empty (``ok``) or ``timeout`` passes; a dead process ends the wait at once (it will
    not come back to drain). Returns ``{"ok", "seconds", "left", "dead"}``: ``left`` is what was still not empty at
    the last look, ``dead`` the processes found gone."""
    t0 = time.monotonic()
    while True:
        gone = list(dead())
        left = check(probes)
        if gone or not left or time.monotonic() - t0 >= timeout:
            return {"ok": not gone and not left, "seconds": time.monotonic() - t0, "left": left, "dead": gone}
        time.sleep(poll)
