"""Policy views of the wire: the adapters from ``llumnix.v1`` messages to what the pure policy core reads.

They live on the scheduler side, next to the one caller that reads load reports, so that the policy core imports no
proto (as the engine→view adapters live with the engine, in ``data_plane/llumlet/views.py``); every enum crosses
through ``infra/wire.py``.
"""

from __future__ import annotations

from pyllumnix.control_plane.policy.views import InstanceView, priority_split, view_of
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2


def from_instance_load(
    pb: common_pb2.InstanceLoad,
    *,
    state: InstanceState | None = None,
    healthy: bool = True,
    dispatched: tuple[int, int, int] = (0, 0, 0),
) -> InstanceView:
    """Builds a view from a llumlet's load report. ``state`` overrides the reported one (the leader knows drains and
    cordons first); an UNSPECIFIED (or unknown) reported state is read as ACTIVE, since the instance is reporting
    load. ``dispatched`` = (requests, demand blocks, high-priority requests) sent there that the report does not list
    yet."""
    if state is None:
        reported = wire.state_from_pb(pb.state)
        state = InstanceState.ACTIVE if reported == InstanceState.UNSPECIFIED else reported
    if pb.HasField("summary"):
        s = pb.summary
        rh, rhb, wh, rb = s.num_running_high, s.running_high_blocks, s.num_waiting_high, s.running_blocks
        seen = bool(pb.requests)
    else:
        # The wire ints are the vocabulary's (``priority_split`` compares them as ints): no enum per request here,
        # on the leader's report path.
        rh, rhb, wh, rb, seen = priority_split((r.phase, r.priority, r.num_blocks) for r in pb.requests)
    return view_of(
        pb,
        pb.instance_id,
        (rh, rhb, wh, rb, seen),
        state=state,
        healthy=healthy,
        migrating_in=pb.migrating_in,
        migrating_out=pb.migrating_out,
        dispatched_since_report=dispatched[0],
        dispatched_demand_blocks=dispatched[1],
        dispatched_high=dispatched[2],
        seq=pb.seq,
    )
