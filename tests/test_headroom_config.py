"""The high-priority headroom's size reaches the live cluster: ``priority.high_headroom_reserve_blocks`` in
ClusterConfig maps to ``PolicyConfig.high_headroom_reserve_blocks`` (the headroom is total - reserve), so the
simulator and a live scheduler share it. Before, the field did not exist and every round trip reset it to 100."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.control_plane.scheduler.config_wire import config_from_pb, config_to_pb
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.protos.llumnix.v1 import config_pb2
from tests.test_policy_helpers import view


@pytest.mark.parametrize("reserve", [0, 100, 400, 1_000_000])
def test_reserve_survives_the_cluster_config(reserve: int) -> None:
    config = PolicyConfig(high_headroom_reserve_blocks=reserve)
    back = config_from_pb(config_pb2.ClusterConfig.FromString(config_to_pb(config).SerializeToString()))
    assert back.high_headroom_reserve_blocks == reserve
    assert back == config


def test_unset_reserve_means_the_artifacts_100() -> None:
    assert config_from_pb(config_pb2.ClusterConfig()).high_headroom_reserve_blocks == 100


@pytest.mark.parametrize("bad", [-1, 1_000_001])
def test_bad_reserve_is_refused_by_its_path(bad: int) -> None:
    pb = config_pb2.ClusterConfig(priority=config_pb2.PriorityConfig(high_headroom_reserve_blocks=bad))
    with pytest.raises(ValueError, match=r"priority\.high_headroom_reserve_blocks"):
        config_from_pb(pb)


@pytest.mark.parametrize(
    ("reserve", "expected"),
    [
        # 1,000-block instances. Reserve 100: h is charged 900, (950 - 900)/1 = 50 < n's 600/4 = 150 -> n.
        (100, "n"),
        # Reserve 500: h is charged 500, (950 - 500)/1 = 450 > 150 -> h.
        (500, "h"),
    ],
)
def test_the_configured_reserve_decides_dispatch(reserve: int, expected: str) -> None:
    pb = config_pb2.ClusterConfig(priority=config_pb2.PriorityConfig(high_headroom_reserve_blocks=reserve))
    config = config_from_pb(pb)
    snap = ClusterSnapshot.of(
        [view("h", free_blocks=950, num_running=1, num_running_high=1), view("n", free_blocks=600, num_running=4)]
    )
    normal = DispatchRequestView("r", Priority.NORMAL, num_prompt_tokens=32)
    assert LlumnixDispatch(config).choose(snap, normal) == expected
