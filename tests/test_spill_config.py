"""``priority.normal_spill_floor_blocks`` in ClusterConfig maps to ``PolicyConfig.normal_spill_floor_blocks``, so the
live scheduler and the simulator share the spill rule (``tests/test_dispatch_normal_spill.py``)."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.config import DEFAULT_NORMAL_SPILL_FLOOR_BLOCKS, PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.control_plane.scheduler.config_wire import config_from_pb, config_to_pb
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.protos.llumnix.v1 import config_pb2
from tests.test_policy_helpers import view


@pytest.mark.parametrize("floor", [0, 100, 400, 1_000_000])
def test_floor_survives_the_cluster_config(floor: int) -> None:
    config = PolicyConfig(normal_spill_floor_blocks=floor)
    back = config_from_pb(config_pb2.ClusterConfig.FromString(config_to_pb(config).SerializeToString()))
    assert back.normal_spill_floor_blocks == floor
    assert back == config


def test_unset_floor_is_the_default() -> None:
    assert config_from_pb(config_pb2.ClusterConfig()).normal_spill_floor_blocks == DEFAULT_NORMAL_SPILL_FLOOR_BLOCKS
    assert DEFAULT_NORMAL_SPILL_FLOOR_BLOCKS == PolicyConfig().normal_spill_floor_blocks == 0


@pytest.mark.parametrize("bad", [-1, 1_000_001])
def test_bad_floor_is_refused_by_its_path(bad: int) -> None:
    pb = config_pb2.ClusterConfig(priority=config_pb2.PriorityConfig(normal_spill_floor_blocks=bad))
    with pytest.raises(ValueError, match=r"priority\.normal_spill_floor_blocks"):
        config_from_pb(pb)


@pytest.mark.parametrize(("floor", "expected"), [(0, "h"), (100, "h"), (500, "n")])
def test_the_configured_floor_decides_dispatch(floor: int, expected: str) -> None:
    """n queues ((4 - 300)/40 < 0, demand 2 blocks > its avail); h (1,000 blocks, 2 high requests) has 400 free:
    400 - 2 >= 100 spills there, >= 500 does not."""
    pb = config_pb2.ClusterConfig(priority=config_pb2.PriorityConfig(normal_spill_floor_blocks=floor))
    snap = ClusterSnapshot.of(
        [
            view("h", free_blocks=400, num_running=2, num_running_high=2, running_high_blocks=600),
            view(
                "n",
                free_blocks=4,
                num_running=10,
                num_waiting=30,
                head_of_line_demand_blocks=10,
                waiting_demand_blocks=300,
            ),
        ]
    )
    normal = DispatchRequestView("r", Priority.NORMAL, num_prompt_tokens=32)
    assert LlumnixDispatch(config_from_pb(pb)).choose(snap, normal) == expected
