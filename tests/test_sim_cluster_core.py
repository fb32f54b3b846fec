"""Cluster simulator: determinism, conservation, and migration only where the policy allows it."""

from __future__ import annotations

from functools import cache
from typing import Any

from pyllumnix.tools.sim import SimConfig, SimResult, load_workload, run_case
from pyllumnix.tools.sim.migration import Outcome
from pyllumnix.tools.workload.request import RequestArrival

# Overloaded on 4 "tiny" instances (64 blocks each): queues build, requests get preempted, pairing finds sources.
OVERLOAD = "uniform:poisson:rate=150:in_min=16:in_max=200:out_min=16:out_max=200:n=300"


@cache
def _arrivals(spec: str = OVERLOAD, seed: int = 1) -> tuple[RequestArrival, ...]:
    return tuple(load_workload(spec, seed, "tiny"))


@cache
def _run(policy: str, seed: int = 0) -> tuple[SimResult, Any]:
    return run_case(SimConfig(instances=4, profile="tiny", policy=policy, seed=seed), _arrivals())


def _fingerprint(result: SimResult) -> list[tuple[object, ...]]:
    return [
        (r.request_id, r.first_token_time, r.finish_time, len(r.preemptions), len(r.migrations)) for r in result.records
    ]


def test_same_seed_same_run() -> None:
    a, _ = _run("llumnix")
    b, _ = run_case(SimConfig(instances=4, profile="tiny", policy="llumnix"), _arrivals())
    assert _fingerprint(a) == _fingerprint(b)
    assert [(m.request_id, m.start_time, m.outcome) for m in a.migrations] == [
        (m.request_id, m.start_time, m.outcome) for m in b.migrations
    ]


def test_conservation_every_policy() -> None:
    expected = {a.request_id: a.output_len for a in _arrivals()}
    for policy in ("llumnix", "infaas++", "round-robin", "balanced"):
        result, summary = _run(policy)
        assert summary["conservation"]["ok"], (policy, summary["conservation"])
        assert len(result.records) == len(expected)
        assert all(r.finished and r.num_output_tokens == expected[r.request_id] for r in result.records)
        assert all(e.free_blocks == e.total_blocks and e.reserved_blocks == 0 for e in result.engines)
        assert not result.stalled


def test_overload_migrates_with_llumnix_never_with_infaas() -> None:
    result, summary = _run("llumnix")
    committed = [m for m in result.migrations if m.outcome is Outcome.COMMITTED]
    assert committed
    assert summary["overall"]["num_preemptions"] > 0
    # Downtime: the last stage only (a few blocks over the modelled link), far below a whole-request copy.
    assert all(0.0 < m.downtime_s < 0.05 for m in committed)
    infaas, infaas_summary = _run("infaas++")
    assert infaas.migrations == []
    assert infaas_summary["overall"]["num_migrations"] == 0


def test_no_migration_flag_turns_pairing_off() -> None:
    result, _ = run_case(SimConfig(instances=4, profile="tiny", enable_migration=False), _arrivals())
    assert result.migrations == []


def test_light_load_is_quiet() -> None:
    arrivals = load_workload("fixed:poisson:rate=5:in=32:out=16:n=40", 0, "tiny")
    _, summary = run_case(SimConfig(instances=2, profile="tiny"), arrivals)
    assert summary["conservation"]["ok"]
    assert summary["overall"]["num_preemptions"] == 0
    assert summary["fragmentation"] == 0.0
