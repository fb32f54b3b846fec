"""Policy views of the wire: the adapters from ``llumnix.v1`` messages to what the pure policy core reads.

They live on the scheduler side, next to the one caller that reads load reports, so that the policy core imports no
proto (as the engine→view adapters live with the engine, in ``data_plane/llumlet/views.py``); every enum crosses
through ``infra/wire.py``.

``from_instance_load`` runs once per full load report the leader folds (up to 20 Hz x every instance), so it builds the
view positionally: the keyword form through ``view_of`` cost ~6x as much (a 23-field named tuple by keywords, plus the
lenient enum lookup), about half of the leader's per-report fold. It is ``view_of``'s mapping, field for field
(``tests/test_scheduler_views.py`` checks the two agree).
"""

from __future__ import annotations

from pyllumnix.control_plane.policy.views import InstanceView, priority_split
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2

# The reported state as the leader reads it: UNSPECIFIED (and a value this version does not know) is ACTIVE, since
# the instance is reporting load. Built through wire.py once; the hot path is one dict lookup.
_REPORTED_STATE: dict[int, InstanceState] = {
    v: s for v in common_pb2.InstanceState.values() if (s := wire.state_from_pb(v)) != InstanceState.UNSPECIFIED
}
_new_view = tuple.__new__
# The positional order below is InstanceView's field order; a change there must fail loudly here, not mis-assign.
_FIELD_ORDER = (
    "instance_id",
    "state",
    "healthy",
    "total_blocks",
    "free_blocks",
    "block_size",
    "watermark_blocks",
    "num_running",
    "num_waiting",
    "num_preempted",
    "head_of_line_demand_blocks",
    "waiting_demand_blocks",
    "num_running_high",
    "running_high_blocks",
    "num_waiting_high",
    "running_blocks",
    "reserved_blocks",
    "migrating_in",
    "migrating_out",
    "dispatched_since_report",
    "dispatched_demand_blocks",
    "dispatched_high",
    "seq",
)
if InstanceView._fields != _FIELD_ORDER:  # not an assert: ``python -O`` would strip it
    raise RuntimeError("InstanceView's fields changed: update from_instance_load's positional order")


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
        state = _REPORTED_STATE.get(pb.state, InstanceState.ACTIVE)
    if pb.HasField("summary"):
        s = pb.summary
        rh, rhb, wh, rb = s.num_running_high, s.running_high_blocks, s.num_waiting_high, s.running_blocks
        seen = bool(pb.requests)
    else:
        # The wire ints are the vocabulary's (``priority_split`` compares them as ints): no enum per request here,
        # on the leader's report path.
        rh, rhb, wh, rb, seen = priority_split((r.phase, r.priority, r.num_blocks) for r in pb.requests)
    total, free, reserved = pb.total_blocks, pb.free_blocks, pb.reserved_blocks
    if not seen:  # no request list: the blocks in use count as running blocks (as view_of)
        rb = max(0, total - free - reserved)
    return _new_view(
        InstanceView,
        (
            pb.instance_id,
            state,
            healthy,
            total,
            free,
            pb.block_size,
            pb.watermark_blocks,
            pb.num_running,
            pb.num_waiting,
            pb.num_preempted,
            pb.head_of_line_demand_blocks,
            pb.waiting_demand_blocks,
            rh,
            rhb,
            wh,
            rb,
            reserved,
            pb.migrating_in,
            pb.migrating_out,
            dispatched[0],
            dispatched[1],
            dispatched[2],
            pb.seq,
        ),
    )
