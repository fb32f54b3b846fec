"""Shared builders and hypothesis strategies for the policy-core tests (no tests here)."""

from __future__ import annotations

from hypothesis import strategies as st

from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import InstanceView
from pyllumnix.infra.vocabulary import InstanceState


def view(instance_id: str, **kw: object) -> InstanceView:
    """An ACTIVE healthy 1,000-block instance unless told otherwise; running_blocks defaults to total - free."""
    kw.setdefault("total_blocks", 1000)
    kw.setdefault("free_blocks", kw["total_blocks"])
    kw.setdefault("running_blocks", int(kw["total_blocks"]) - int(kw["free_blocks"]))  # type: ignore[call-overload]
    return InstanceView(instance_id=instance_id, **kw)  # type: ignore[arg-type]


@st.composite
def instance_views(draw: st.DrawFn, instance_id: str) -> InstanceView:
    total = draw(st.integers(1, 2000))
    free = draw(st.integers(0, total))
    running = draw(st.integers(0, 50))
    waiting = draw(st.integers(0, 10))
    hol = draw(st.integers(1, 200)) if waiting else 0
    high_running = draw(st.integers(0, running))
    return InstanceView(
        instance_id=instance_id,
        state=draw(st.sampled_from(list(InstanceState))),
        healthy=draw(st.booleans()),
        total_blocks=total,
        free_blocks=free,
        block_size=draw(st.sampled_from([8, 16, 32])),
        num_running=running,
        num_waiting=waiting,
        num_preempted=draw(st.integers(0, waiting)),
        head_of_line_demand_blocks=hol,
        waiting_demand_blocks=hol + draw(st.integers(0, 500)) if waiting else 0,
        num_running_high=high_running,
        num_waiting_high=draw(st.integers(0, waiting)),
        running_blocks=total - free,
        migrating_in=draw(st.booleans()),
        migrating_out=draw(st.booleans()),
        dispatched_since_report=draw(st.integers(0, 3)),
        dispatched_demand_blocks=draw(st.integers(0, 100)),
    )


@st.composite
def snapshots(draw: st.DrawFn, min_size: int = 0, max_size: int = 24) -> ClusterSnapshot:
    n = draw(st.integers(min_size, max_size))
    ids = draw(st.permutations([f"i{k:03d}" for k in range(n)]))
    return ClusterSnapshot.of(draw(instance_views(iid)) for iid in ids)
