"""Policy views of an engine's state: the adapters from engine types to what the pure policy core reads.

They live on the engine side so that the policy core depends on no engine type (``control_plane/policy`` imports
nothing of ``data_plane``); the two engine-side callers share them: the llumlet's migration coordinator (choosing the
request to migrate out) and the simulator (building the cluster snapshot from its engines, choosing requests too).
"""

from __future__ import annotations

from collections.abc import Iterable

from pyllumnix.control_plane.policy.views import InstanceView, RequestView, priority_split, view_of
from pyllumnix.data_plane.engine.base import LoadSnapshot, RequestLoadInfo
from pyllumnix.infra.vocabulary import InstanceState, normalize_priority


def request_view(info: RequestLoadInfo) -> RequestView:
    return RequestView(
        request_id=info.request_id,
        phase=info.phase,
        priority=normalize_priority(info.priority),
        num_blocks=info.num_blocks,
        demand_blocks=info.demand_blocks,
        arrival_time=info.arrival_time,
    )


def request_views(requests: Iterable[RequestLoadInfo]) -> list[RequestView]:
    """What request selection reads: one view per request of an engine snapshot."""
    return [request_view(r) for r in requests]


def instance_view(
    instance_id: str,
    load: LoadSnapshot,
    *,
    state: InstanceState = InstanceState.ACTIVE,
    healthy: bool = True,
    migrating_in: bool = False,
    migrating_out: bool = False,
    seq: int = 0,
) -> InstanceView:
    """The view of an engine's snapshot (the simulator's path; the state and the migration flags are its own)."""
    split = priority_split((r.phase, r.priority, r.num_blocks) for r in load.requests)
    return view_of(
        load,
        instance_id,
        split,
        state=state,
        healthy=healthy,
        migrating_in=migrating_in,
        migrating_out=migrating_out,
        seq=seq,
    )
