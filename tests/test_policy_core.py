"""PolicyCore: determinism for a seed, reconfiguration, and the dispatch benchmark's plumbing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllumnix.control_plane.policy import DISPATCH_POLICIES
from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.tools.bench_dispatch_core import measure_dispatch_latency, random_view


def _run(core: PolicyCore, seed: int, steps: int = 30) -> list[object]:
    """Drives the core like a scheduler: dispatch + record, a load report now and then, pairing and scaling."""
    rng = random.Random(seed)
    ids = [f"i{k:02d}" for k in range(8)]
    snap = ClusterSnapshot.of(random_view(rng, i) for i in ids)
    out: list[object] = []
    for k in range(steps):
        req = DispatchRequestView(f"r{k}", rng.choice([Priority.NORMAL, Priority.HIGH]), rng.randint(1, 500))
        chosen = core.dispatch(snap, req)
        out.append(chosen)
        if chosen is not None:
            snap = snap.record_dispatch(chosen, 3, req.priority)
        if k % 5 == 4:
            snap = snap.updated([random_view(rng, rng.choice(ids))])
            out.append(core.pair(snap))
            out.append(core.scale(snap, starting_count=k % 2))
    return out


@settings(max_examples=25)
@given(st.integers(0, 2**32), st.sampled_from(DISPATCH_POLICIES), st.booleans())
def test_deterministic_for_a_seed(seed: int, policy: str, scaling: bool) -> None:
    cfg = PolicyConfig(dispatch_policy=policy, enable_scaling=scaling)
    assert _run(PolicyCore(cfg, seed=seed), seed) == _run(PolicyCore(cfg, seed=seed), seed)


def test_reconfigure_validates_and_keeps_round_robin_state() -> None:
    core = PolicyCore(PolicyConfig(dispatch_policy="round-robin"), seed=3)
    snap = ClusterSnapshot.of(random_view(random.Random(1), f"i{k}") for k in range(4))
    first = core.dispatch(snap, DispatchRequestView())
    with pytest.raises(ValueError):
        core.reconfigure(PolicyConfig(dispatch_policy="round-robin", min_instances=0))
    core.reconfigure(PolicyConfig(dispatch_policy="round-robin", migrate_out_threshold=5))
    assert core.config.migrate_out_threshold == 5
    assert core.dispatch(snap, DispatchRequestView()) != first or len(snap) == 1
    core.reconfigure(PolicyConfig(dispatch_policy="balanced"))
    assert core.dispatch_policy.name == "balanced"
    with pytest.raises(ValueError, match="dispatch_policy"):
        PolicyCore(PolicyConfig(dispatch_policy="x"))


def test_benchmark_smoke() -> None:
    r = measure_dispatch_latency(n_instances=64, n_decisions=200, seed=1)
    assert r["n_instances"] == 64 and float(r["p99_ms"]) >= float(r["p50_ms"]) > 0
