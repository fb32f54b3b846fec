"""The scheduler's adapters from ``llumnix.v1`` messages to policy views (``control_plane/scheduler/views.py``)."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.views import InstanceView, priority_split, view_of
from pyllumnix.control_plane.scheduler.views import from_instance_load
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2


def _requests() -> list[tuple[str, int, int, int, int]]:
    # id, phase, priority, blocks, demand
    return [
        ("r1", common_pb2.REQUEST_PHASE_RUNNING, common_pb2.PRIORITY_HIGH, 12, 0),
        ("r2", common_pb2.REQUEST_PHASE_RUNNING, common_pb2.PRIORITY_UNSPECIFIED, 30, 0),
        ("r3", common_pb2.REQUEST_PHASE_WAITING, common_pb2.PRIORITY_HIGH, 0, 9),
        ("r4", common_pb2.REQUEST_PHASE_MIGRATING, common_pb2.PRIORITY_NORMAL, 5, 0),
    ]


def _load() -> common_pb2.InstanceLoad:
    return common_pb2.InstanceLoad(
        instance_id="a",
        seq=7,
        total_blocks=1300,
        free_blocks=1200,
        block_size=16,
        num_running=3,
        num_waiting=1,
        head_of_line_demand_blocks=9,
        waiting_demand_blocks=9,
        migrating_out=True,
        requests=[
            common_pb2.RequestLoad(request_id=i, phase=ph, priority=p, num_blocks=b, demand_blocks=d)  # type: ignore[arg-type]
            for i, ph, p, b, d in _requests()
        ],
    )


def test_from_instance_load() -> None:
    pb = _load()
    v = from_instance_load(pb)
    assert v.state == InstanceState.ACTIVE  # UNSPECIFIED while reporting reads as ACTIVE
    assert (v.num_running_high, v.running_high_blocks, v.num_waiting_high) == (1, 12, 1)
    assert v.running_blocks == 12 + 30 + 5
    assert v.migrating_out and not v.migrating_in and v.seq == 7
    assert v.holds_high and v.holds_normal
    assert from_instance_load(pb, state=InstanceState.DRAINING, healthy=False).state == InstanceState.DRAINING
    pb.state = common_pb2.INSTANCE_STATE_CORDONED
    assert from_instance_load(pb).state == InstanceState.CORDONED
    # No request list: running blocks from the block counts.
    bare = from_instance_load(
        common_pb2.InstanceLoad(instance_id="b", total_blocks=100, free_blocks=60, reserved_blocks=10)
    )
    assert bare.running_blocks == 30


def test_from_instance_load_reads_an_unknown_state_as_active() -> None:
    """A newer llumlet may report a state this version does not know: still a reporting (so active) instance."""
    pb = common_pb2.InstanceLoad(instance_id="a", total_blocks=10, free_blocks=10)
    pb.state = 99  # type: ignore[assignment]
    assert from_instance_load(pb).state == InstanceState.ACTIVE


def _keyword_view(
    pb: common_pb2.InstanceLoad,
    state: InstanceState | None = None,
    healthy: bool = True,
    dispatched: tuple[int, int, int] = (0, 0, 0),
) -> InstanceView:
    """The mapping by keywords through the policy core's ``view_of`` (what ``from_instance_load`` builds
    positionally, for speed on the leader's report path)."""
    if state is None:
        reported = wire.state_from_pb(pb.state)
        state = InstanceState.ACTIVE if reported == InstanceState.UNSPECIFIED else reported
    if pb.HasField("summary"):
        s = pb.summary
        split = (s.num_running_high, s.running_high_blocks, s.num_waiting_high, s.running_blocks, bool(pb.requests))
    else:
        split = priority_split((r.phase, r.priority, r.num_blocks) for r in pb.requests)
    return view_of(
        pb,
        pb.instance_id,
        split,
        state=state,
        healthy=healthy,
        migrating_in=pb.migrating_in,
        migrating_out=pb.migrating_out,
        dispatched_since_report=dispatched[0],
        dispatched_demand_blocks=dispatched[1],
        dispatched_high=dispatched[2],
        seq=pb.seq,
    )


def _variants() -> list[common_pb2.InstanceLoad]:
    listed = _load()
    summarised = _load()
    summarised.summary.num_running_high, summarised.summary.running_high_blocks = 1, 12
    summarised.summary.num_waiting_high, summarised.summary.running_blocks = 1, 47
    summary_only = common_pb2.InstanceLoad(instance_id="c", total_blocks=90, free_blocks=20, reserved_blocks=5)
    summary_only.summary.running_blocks = 3  # a summary but no request list: the block counts decide
    odd = common_pb2.InstanceLoad(
        instance_id="d",
        total_blocks=10,
        free_blocks=40,  # more free than total: running blocks clamp at 0
        block_size=32,
        watermark_blocks=2,
        num_preempted=3,
        migrating_in=True,
        reserved_blocks=1,
        seq=2**40,
    )
    odd.state = 99  # type: ignore[assignment]
    states = []
    for st in (
        common_pb2.INSTANCE_STATE_DRAINING,
        common_pb2.INSTANCE_STATE_CORDONED,
        common_pb2.INSTANCE_STATE_STARTING,
        common_pb2.INSTANCE_STATE_UNSPECIFIED,
    ):
        pb = _load()
        pb.state = st
        states.append(pb)
    return [listed, summarised, summary_only, odd, *states]


@pytest.mark.parametrize("state", [None, InstanceState.DRAINING, InstanceState.ACTIVE])
@pytest.mark.parametrize("healthy", [True, False])
@pytest.mark.parametrize("dispatched", [(0, 0, 0), (3, 41, 1)])
def test_positional_view_is_the_keyword_mapping(
    state: InstanceState | None, healthy: bool, dispatched: tuple[int, int, int]
) -> None:
    """``from_instance_load`` builds the view positionally (the leader's fold runs it per report): field for field
    the mapping through ``view_of``, for every state, override, health, pending dispatch and report shape."""
    for pb in _variants():
        fast = from_instance_load(pb, state=state, healthy=healthy, dispatched=dispatched)
        slow = _keyword_view(pb, state, healthy, dispatched)
        assert fast == slow and type(fast) is InstanceView, (pb.instance_id, fast, slow)
        assert fast._asdict() == slow._asdict()
        assert type(fast.state) is InstanceState
