"""The scaling warm-up and the drain-victim choice reach the live cluster: they travel through ClusterConfig
(``scaling.warmup_ms``, ``scaling.drain_victim``) and the leader's scaling loop holds its first decision for the
warm-up, as the simulator does, so a simulated run and a live one share the same options."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, cast

import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.scaling import ScalingDecision
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.scheduler.config_wire import config_from_pb, config_to_pb
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import config_pb2

DEADLINE_S = 10.0


@pytest.mark.parametrize(("warmup_ms", "victim"), [(0, "last"), (250_000, "fewest-requests"), (100_000, "last")])
def test_scaling_options_survive_the_cluster_config(warmup_ms: int, victim: str) -> None:
    config = PolicyConfig(scaling_warmup_ms=warmup_ms, drain_victim=victim)
    back = config_from_pb(config_pb2.ClusterConfig.FromString(config_to_pb(config).SerializeToString()))
    assert (back.scaling_warmup_ms, back.drain_victim) == (warmup_ms, victim)


def test_unset_scaling_options_mean_the_defaults() -> None:
    c = config_from_pb(config_pb2.ClusterConfig(scaling=config_pb2.ScalingConfig(enable=True)))
    assert (c.scaling_warmup_ms, c.drain_victim) == (100_000, "fewest-requests")


@pytest.mark.parametrize(
    ("scaling", "field"),
    [
        (config_pb2.ScalingConfig(drain_victim=cast(Any, 9)), "drain_victim"),
        (config_pb2.ScalingConfig(warmup_ms=-1), "scaling.warmup_ms"),
        (config_pb2.ScalingConfig(warmup_ms=3_600_001), "scaling.warmup_ms"),
    ],
)
def test_bad_scaling_options_are_refused_by_name(scaling: config_pb2.ScalingConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_pb(config_pb2.ClusterConfig(scaling=scaling))


class _Provider:
    """Starts nothing; the loop only needs one to run its automatic pass."""

    max_instances = 16

    def starting(self) -> set[str]:
        return set()

    async def start_instances(self, count: int) -> list[str]:
        return []


async def _first_decision_after(warmup_ms: int) -> float:
    """Seconds from the start of the leader's scaling loop to its first automatic decision."""
    replica = SchedulerReplica(cast(Any, object()), KeyLayout("c1"), "s0", "127.0.0.1:1")
    replica.provider = cast(Any, _Provider())
    replica.core.reconfigure(
        dataclasses.replace(PolicyConfig(), enable_scaling=True, scaling_interval_ms=100, scaling_warmup_ms=warmup_ms)
    )
    decided = asyncio.Event()

    def scale(snapshot: ClusterSnapshot, starting_count: int = 0, cancellable: object = None) -> ScalingDecision:
        decided.set()
        return ScalingDecision()

    replica.core.scale = scale  # type: ignore[method-assign]
    began = time.monotonic()
    loop = asyncio.create_task(replica._scaling_loop())
    try:
        async with asyncio.timeout(DEADLINE_S):
            await decided.wait()
        return time.monotonic() - began
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_the_live_scaling_loop_waits_for_the_warm_up() -> None:
    # Before the warm-up reached the live scheduler its first decision came after one interval (0.1 s).
    assert await _first_decision_after(800) >= 0.8


async def test_no_warm_up_decides_at_the_first_interval() -> None:
    assert await _first_decision_after(0) < 0.8
