"""PolicyConfig: the paper's defaults, proto round trip, and validate()."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyllumnix.control_plane.policy.config import (
    RANGES,
    ZERO_KEEPS_LLUMLETS,
    PolicyConfig,
    Selection,
    check_scale_target,
)
from pyllumnix.control_plane.scheduler.config_wire import config_from_pb, config_to_pb
from pyllumnix.data_plane.llumlet.migration.plan import DEFAULT_LAST_STAGE_MAX_BLOCKS, DEFAULT_MAX_STAGES
from pyllumnix.protos.llumnix.v1 import common_pb2, config_pb2


def test_defaults_are_the_papers() -> None:
    c = PolicyConfig()
    assert c.dispatch_policy == "llumnix"
    assert c.migrate_out_threshold == 3.0
    assert c.pairing_policy == "defrag"
    assert c.selection == Selection.SR
    assert c.enable_defrag and c.enable_migration
    assert (c.scale_up_threshold, c.scale_down_threshold) == (10.0, 60.0)
    assert (c.min_instances, c.max_instances) == (1, 16)
    assert (c.pairing_interval_ms, c.scaling_interval_ms, c.load_report_interval_ms) == (100, 10_000, 50)
    # 0: each llumlet's own --last-stage-max-blocks / --max-stages, whose defaults are the paper's 4 / 3
    assert (c.last_stage_max_blocks, c.max_stages) == (0, 0)
    assert (DEFAULT_LAST_STAGE_MAX_BLOCKS, DEFAULT_MAX_STAGES) == (4, 3)
    # All but 100 blocks of the instance, whatever its size (the artifact's total - 100), and never negative.
    assert c.headroom(common_pb2.PRIORITY_HIGH, 792) == 792 - 100
    assert c.headroom(common_pb2.PRIORITY_HIGH, 1300) == 1300 - 100
    assert c.headroom(common_pb2.PRIORITY_HIGH, 64) == 0
    assert c.headroom(common_pb2.PRIORITY_NORMAL, 792) == 0
    assert c.headroom(common_pb2.PRIORITY_UNSPECIFIED, 792) == 0
    # an absolute ClusterConfig headroom caps it
    assert PolicyConfig(high_headroom_blocks=300).headroom(common_pb2.PRIORITY_HIGH, 792) == 300
    assert (c.scaling_warmup_ms, c.drain_victim) == (100_000, "fewest-requests")
    assert c.validate() is c


def test_empty_proto_means_defaults() -> None:
    assert config_from_pb(config_pb2.ClusterConfig()) == PolicyConfig()


def test_proto_round_trip() -> None:
    c = PolicyConfig(
        dispatch_policy="balanced",
        enable_migration=False,
        pairing_policy="balanced",
        migrate_out_threshold=0.0,
        selection=Selection.LCR,
        enable_defrag=False,
        enable_scaling=True,
        scale_up_threshold=5,
        scale_down_threshold=55,
        min_instances=2,
        max_instances=8,
        normal_headroom_blocks=7,
        high_headroom_blocks=900,
    )
    assert config_from_pb(config_to_pb(c)) == c


def test_explicit_zero_threshold_is_kept() -> None:
    pb = config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(migrate_out_threshold=0.0))
    assert config_from_pb(pb).migrate_out_threshold == 0.0


def test_headroom_from_proto() -> None:
    pb = config_pb2.ClusterConfig(
        priority=config_pb2.PriorityConfig(
            headroom=[config_pb2.PriorityHeadroom(priority=common_pb2.PRIORITY_HIGH, headroom_blocks=321)]
        )
    )
    c = config_from_pb(pb)
    assert (c.high_headroom_blocks, c.normal_headroom_blocks) == (321, 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"migrate_out_threshold": -1.0}, "migrate_out_threshold"),
        ({"scale_up_threshold": -0.5}, "scale_up_threshold"),
        ({"scale_up_threshold": math.nan}, "scale_up_threshold"),
        ({"scale_down_threshold": math.inf}, "scale_down_threshold"),
        ({"scale_up_threshold": 60.0, "scale_down_threshold": 60.0}, "scale_down_threshold"),
        ({"scale_up_threshold": 70.0}, "scale_down_threshold"),
        ({"min_instances": 5, "max_instances": 4}, "min_instances"),
        ({"min_instances": 0}, "min_instances"),
        ({"dispatch_policy": "random"}, "dispatch_policy"),
        ({"pairing_policy": "greedy"}, "pairing_policy"),
        ({"pairing_interval_ms": 0}, "pairing_interval_ms"),
        ({"max_stages": -1}, "max_stages"),
        ({"drain_victim": "first"}, "drain_victim"),
        ({"scaling_warmup_ms": -1}, "scaling_warmup_ms"),
        ({"high_headroom_reserve_blocks": -5}, "high_headroom_reserve_blocks"),
        ({"high_headroom_blocks": -1}, "high_headroom_blocks"),
    ],
)
def test_validate_rejects(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(PolicyConfig(), **changes).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pb", "message"),
    [
        (config_pb2.ClusterConfig(dispatch=config_pb2.DispatchConfig(policy=99)), "dispatch_policy"),  # type: ignore[arg-type]
        (config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(selection=42)), "selection"),  # type: ignore[arg-type]
        (config_pb2.ClusterConfig(scaling=config_pb2.ScalingConfig(min_instances=20)), "min_instances"),
        (config_pb2.ClusterConfig(scaling=config_pb2.ScalingConfig(scale_down_threshold=5)), "scale_down"),
    ],
)
def test_from_proto_rejects(pb: config_pb2.ClusterConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_pb(pb)


@given(
    up=st.floats(-10, 100) | st.just(math.nan),
    down=st.floats(-10, 100) | st.just(math.nan),
    lo=st.integers(-2, 20),
    hi=st.integers(-2, 20),
    thr=st.floats(-5, 50),
    policy=st.sampled_from(["llumnix", "infaas++", "round-robin", "balanced", "bogus"]),
)
def test_validate_accepts_exactly_the_valid_configs(
    *, up: float, down: float, lo: int, hi: int, thr: float, policy: str
) -> None:
    c = replace(
        PolicyConfig(),
        scale_up_threshold=up,
        scale_down_threshold=down,
        min_instances=lo,
        max_instances=hi,
        migrate_out_threshold=thr,
        dispatch_policy=policy,
    )
    valid = (
        not math.isnan(up)
        and not math.isnan(down)
        and up >= 0
        and down > up
        and 1 <= lo <= hi
        and thr >= 0
        and policy != "bogus"
    )
    if valid:
        assert c.validate() is c
        assert config_from_pb(config_to_pb(c)) == c
    else:
        with pytest.raises(ValueError):
            c.validate()


@pytest.mark.parametrize(
    ("pb", "message"),
    [
        # The values the reliability review got accepted: each is now refused with field, range and value.
        (
            config_pb2.ClusterConfig(scaling=config_pb2.ScalingConfig(max_instances=1_000_000)),
            "scaling.max_instances: 1000000 is outside the range [1, 4096]",
        ),
        (
            config_pb2.ClusterConfig(load_report_interval_ms=2_147_483_647),
            "load_report_interval_ms: 2147483647 is outside the range [10, 1000]",
        ),
        (
            config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(migrate_out_threshold=1e308)),
            "migration.migrate_out_threshold: 1e+308 is outside the range [0.0, 1000000.0]",
        ),
        (
            config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(pairing_interval_ms=1)),
            "migration.pairing_interval_ms: 1 is outside the range [10, 60000]",
        ),
        (
            config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(max_stages=1000)),
            "migration.max_stages: 1000 is outside the range [1, 64] (or 0: each llumlet's own flag)",
        ),
        (
            config_pb2.ClusterConfig(scaling=config_pb2.ScalingConfig(scaling_interval_ms=2_000_000_000)),
            "scaling.scaling_interval_ms: 2000000000 is outside the range [100, 3600000]",
        ),
    ],
)
def test_upper_bounds_are_enforced_with_field_range_and_value(pb: config_pb2.ClusterConfig, message: str) -> None:
    with pytest.raises(ValueError) as err:
        config_from_pb(pb)
    assert str(err.value) == message


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_range_bound_is_inclusive_and_enforced(name: str) -> None:
    """Both ends of every range are accepted and one step beyond either is refused, for every numeric knob."""
    lo, hi = RANGES[name]
    base = PolicyConfig(scale_up_threshold=0.0, scale_down_threshold=1.0)
    step: float = 1 if isinstance(getattr(base, name), int) else 0.5
    for ok in (lo, hi):
        c = replace(base, **{name: type(getattr(base, name))(ok)})
        if name in ("scale_up_threshold", "scale_down_threshold", "min_instances", "max_instances"):
            continue  # their pairwise constraint is covered above; only the range matters here
        assert c.validate() is c
    # Where 0 means "each llumlet's own flag" it is valid: one step below is then a negative number.
    below = -1 if lo - step == 0 and name in ZERO_KEEPS_LLUMLETS else lo - step
    for bad in (below, hi + step):
        with pytest.raises(ValueError, match=name):
            replace(base, **{name: type(getattr(base, name))(bad)}).validate()


def test_scale_target_check_names_the_range_and_the_provider_cap() -> None:
    cfg = PolicyConfig(min_instances=2, max_instances=100)
    check_scale_target(2, cfg)
    check_scale_target(100, cfg)
    check_scale_target(64, cfg, provider_cap=64)
    with pytest.raises(ValueError, match=r"target_instances: 1 is outside the range \[2, 100\]"):
        check_scale_target(1, cfg)
    with pytest.raises(ValueError) as err:
        check_scale_target(1_000_000, cfg, provider_cap=64)
    assert str(err.value) == (
        "target_instances: 1000000 is outside the range [2, 64] "
        "(scaling.min_instances 2, scaling.max_instances 100, provider cap 64)"
    )
