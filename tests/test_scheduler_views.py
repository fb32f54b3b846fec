"""The scheduler's adapters from ``llumnix.v1`` messages to policy views (``control_plane/scheduler/views.py``)."""

from __future__ import annotations

from pyllumnix.control_plane.scheduler.views import from_instance_load
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
