"""``PolicyConfig`` and its ``llumnix.v1.ClusterConfig``: the scheduler's side of the stored and admin-API config.

The policy core owns the knobs, their defaults and their ranges (``control_plane/policy/config.py``) and imports no
proto; the round trip lives here, next to the wire→view adapters (``views.py``), with every enum crossing through
``infra/wire.py`` (policy names by ``wire.name_to_pb``/``name_from_pb``, priorities by ``wire.priority_*``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.protos.llumnix.v1 import common_pb2, config_pb2


def config_from_pb(pb: config_pb2.ClusterConfig) -> PolicyConfig:
    """Reads a ClusterConfig (zero values mean "default") and validates it: a ValueError names the bad field."""
    d = PolicyConfig()
    m, s, pr = pb.migration, pb.scaling, pb.priority
    normal_hr, high_hr = d.normal_headroom_blocks, d.high_headroom_blocks
    for h in pr.headroom:
        if wire.priority_from_pb(h.priority) is Priority.HIGH:
            high_hr = h.headroom_blocks
        else:
            normal_hr = h.headroom_blocks
    cfg = PolicyConfig(
        dispatch_policy=_name(wire.DISPATCH_POLICIES, pb.dispatch.policy, d.dispatch_policy),
        enable_migration=not m.disable,
        pairing_policy=_name(wire.PAIRING_POLICIES, m.pairing_policy, d.pairing_policy),
        migrate_out_threshold=(
            m.migrate_out_threshold if m.HasField("migrate_out_threshold") else d.migrate_out_threshold
        ),
        selection=d.selection if m.selection == 0 else _selection(m.selection),
        enable_defrag=not m.disable_defrag,
        pairing_interval_ms=m.pairing_interval_ms or d.pairing_interval_ms,
        last_stage_max_blocks=m.last_stage_max_blocks or d.last_stage_max_blocks,
        max_stages=m.max_stages or d.max_stages,
        pending_timeout_ms=m.pending_timeout_ms or d.pending_timeout_ms,
        transfer_timeout_ms=m.transfer_timeout_ms or d.transfer_timeout_ms,
        enable_scaling=s.enable,
        scale_up_threshold=s.scale_up_threshold if s.HasField("scale_up_threshold") else d.scale_up_threshold,
        scale_down_threshold=s.scale_down_threshold if s.HasField("scale_down_threshold") else d.scale_down_threshold,
        min_instances=s.min_instances or d.min_instances,
        max_instances=s.max_instances or d.max_instances,
        scaling_interval_ms=s.scaling_interval_ms or d.scaling_interval_ms,
        scaling_warmup_ms=s.warmup_ms if s.HasField("warmup_ms") else d.scaling_warmup_ms,
        drain_victim=_name(wire.DRAIN_VICTIMS, s.drain_victim, d.drain_victim),
        normal_headroom_blocks=normal_hr,
        high_headroom_blocks=high_hr,
        high_headroom_reserve_blocks=(
            pr.high_headroom_reserve_blocks
            if pr.HasField("high_headroom_reserve_blocks")
            else d.high_headroom_reserve_blocks
        ),
        normal_spill_floor_blocks=(
            pr.normal_spill_floor_blocks if pr.HasField("normal_spill_floor_blocks") else d.normal_spill_floor_blocks
        ),
        load_report_interval_ms=pb.load_report_interval_ms or d.load_report_interval_ms,
    )
    return cfg.validate()


def config_to_pb(config: PolicyConfig) -> config_pb2.ClusterConfig:
    """Writes every field explicitly, so the stored config does not depend on this build's defaults. A config the
    cluster cannot store (invalid, or a simulator-only dispatch policy) is a ValueError naming the field."""
    config.validate()
    return config_pb2.ClusterConfig(
        dispatch=config_pb2.DispatchConfig(
            policy=wire.name_to_pb(wire.DISPATCH_POLICIES, config.dispatch_policy, "dispatch_policy")
        ),
        migration=config_pb2.MigrationConfig(
            disable=not config.enable_migration,
            pairing_policy=wire.name_to_pb(wire.PAIRING_POLICIES, config.pairing_policy, "pairing_policy"),
            migrate_out_threshold=config.migrate_out_threshold,
            # Selection carries MigrationSelection's ints (tests/test_enum_vocabulary.py checks).
            selection=cast(common_pb2.MigrationSelection.ValueType, int(config.selection)),
            disable_defrag=not config.enable_defrag,
            pairing_interval_ms=config.pairing_interval_ms,
            last_stage_max_blocks=config.last_stage_max_blocks,
            max_stages=config.max_stages,
            pending_timeout_ms=config.pending_timeout_ms,
            transfer_timeout_ms=config.transfer_timeout_ms,
        ),
        scaling=config_pb2.ScalingConfig(
            enable=config.enable_scaling,
            scale_up_threshold=config.scale_up_threshold,
            scale_down_threshold=config.scale_down_threshold,
            min_instances=config.min_instances,
            max_instances=config.max_instances,
            scaling_interval_ms=config.scaling_interval_ms,
            warmup_ms=config.scaling_warmup_ms,
            drain_victim=wire.name_to_pb(wire.DRAIN_VICTIMS, config.drain_victim, "drain_victim"),
        ),
        priority=config_pb2.PriorityConfig(
            headroom=[
                config_pb2.PriorityHeadroom(
                    priority=wire.priority_to_pb(Priority.NORMAL), headroom_blocks=config.normal_headroom_blocks
                ),
                config_pb2.PriorityHeadroom(
                    priority=wire.priority_to_pb(Priority.HIGH), headroom_blocks=config.high_headroom_blocks
                ),
            ],
            high_headroom_reserve_blocks=config.high_headroom_reserve_blocks,
            normal_spill_floor_blocks=config.normal_spill_floor_blocks,
        ),
        load_report_interval_ms=config.load_report_interval_ms,
    )


def _name(names: Mapping[str, int], value: int, default: str) -> str:
    """UNSPECIFIED is the default; an unknown value becomes a name ``validate()`` refuses, naming the field."""
    if value == 0:
        return default
    name = wire.name_from_pb(names, value)
    return name if name is not None else f"<unknown enum {value}>"


def _selection(value: int) -> Selection:
    try:
        return Selection(value)
    except ValueError:
        raise ValueError(f"selection: unknown MigrationSelection {value}") from None


__all__ = ["config_from_pb", "config_to_pb"]
