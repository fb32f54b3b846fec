"""Every mapping between the one vocabulary (:mod:`pyllumnix.infra.vocabulary`) and the ``llumnix.v1`` proto enums.

The vocabulary's enums carry the proto's ints, so each mapping is an ``int()`` one way and the enum's lenient ``of``
the other (a value from a newer peer reads as UNSPECIFIED instead of failing the message); keeping them here, typed,
means no other module spells a proto enum out member by member. ``MIRRORS`` lists every pair for
``tests/test_enum_vocabulary.py``, which checks member for member, from the proto descriptors, that they agree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import NamedTuple, TypeVar, cast

from google.protobuf.descriptor import EnumDescriptor

from pyllumnix.infra.vocabulary import (
    FinishReason,
    InstanceState,
    MigrationOutcome,
    Priority,
    RequestPhase,
    normalize_priority,
)
from pyllumnix.protos.llumnix.v1 import common_pb2, config_pb2, llumlet_pb2


class Mirror(NamedTuple):
    """A vocabulary enum and the proto enum it mirrors; proto value names are ``prefix`` + the member's name."""

    vocabulary: type[enum.IntEnum]
    proto: EnumDescriptor
    prefix: str


MIRRORS: tuple[Mirror, ...] = (
    Mirror(RequestPhase, common_pb2.RequestPhase.DESCRIPTOR, "REQUEST_PHASE_"),
    Mirror(FinishReason, common_pb2.FinishReason.DESCRIPTOR, "FINISH_REASON_"),
    Mirror(InstanceState, common_pb2.InstanceState.DESCRIPTOR, "INSTANCE_STATE_"),
    Mirror(Priority, common_pb2.Priority.DESCRIPTOR, "PRIORITY_"),
    Mirror(MigrationOutcome, llumlet_pb2.MigrationOutcome.DESCRIPTOR, "MIGRATION_OUTCOME_"),
)


# ---------------------------------------------------------------------------------------------------- request phase
def phase_to_pb(phase: RequestPhase) -> common_pb2.RequestPhase.ValueType:
    return cast(common_pb2.RequestPhase.ValueType, int(phase))


def phase_from_pb(value: int) -> RequestPhase:
    return RequestPhase.of(value)


# ---------------------------------------------------------------------------------------------------- finish reason
def finish_to_pb(reason: FinishReason | None) -> common_pb2.FinishReason.ValueType:
    """None (not finished) is UNSPECIFIED on the wire."""
    return cast(common_pb2.FinishReason.ValueType, int(reason) if reason is not None else 0)


def finish_from_pb(value: int) -> FinishReason:
    return FinishReason.of(value)


def finish_label(value: int) -> str | None:
    """The client-facing name of a wire finish reason ("stop", "length", "abort", "error"); None for UNSPECIFIED or a
    value this version does not know."""
    return FinishReason.of(value).label


# ---------------------------------------------------------------------------------------------------- instance state
def state_to_pb(state: InstanceState) -> common_pb2.InstanceState.ValueType:
    return cast(common_pb2.InstanceState.ValueType, int(state))


def state_from_pb(value: int) -> InstanceState:
    return InstanceState.of(value)


# ---------------------------------------------------------------------------------------------------- priority
def priority_to_pb(priority: int) -> common_pb2.Priority.ValueType:
    """A priority as it goes on the wire (as given: the receiver normalises)."""
    return cast(common_pb2.Priority.ValueType, int(priority))


def priority_from_pb(value: int) -> Priority:
    """A received priority, normalised (UNSPECIFIED and unknown values below HIGH are NORMAL)."""
    return normalize_priority(value)


# ---------------------------------------------------------------------------------------------------- migration outcome
def outcome_to_pb(outcome: MigrationOutcome) -> llumlet_pb2.MigrationOutcome.ValueType:
    """A migration not ended (RUNNING) is UNSPECIFIED on the wire."""
    return cast(llumlet_pb2.MigrationOutcome.ValueType, int(outcome))


def outcome_from_pb(value: int) -> MigrationOutcome:
    """A received outcome (an unknown value reads as UNSPECIFIED: ``counted_as`` says how to count it)."""
    return MigrationOutcome.of(value)


# ---------------------------------------------------------------------------------------------------- config names
# ClusterConfig's policy enums carry names, not vocabulary enums: the policy registries (``DISPATCH_REGISTRY``,
# ``PAIRING_REGISTRY``, ``DRAIN_VICTIM_REGISTRY``) are keyed by these names. ``tests/test_enum_vocabulary.py`` checks
# that each table names every proto value and only registered policies. infaas-mem has no ClusterConfig value
# (simulator only).
DISPATCH_POLICIES: Mapping[str, config_pb2.DispatchPolicy.ValueType] = {
    "llumnix": config_pb2.DISPATCH_POLICY_LLUMNIX,
    "infaas++": config_pb2.DISPATCH_POLICY_INFAAS_PP,
    "round-robin": config_pb2.DISPATCH_POLICY_ROUND_ROBIN,
    "balanced": config_pb2.DISPATCH_POLICY_BALANCED,
}
PAIRING_POLICIES: Mapping[str, config_pb2.PairingPolicy.ValueType] = {
    "defrag": config_pb2.PAIRING_POLICY_DEFRAG,
    "balanced": config_pb2.PAIRING_POLICY_BALANCED,
}
DRAIN_VICTIMS: Mapping[str, config_pb2.DrainVictim.ValueType] = {
    "fewest-requests": config_pb2.DRAIN_VICTIM_FEWEST_REQUESTS,
    "last": config_pb2.DRAIN_VICTIM_LAST,
}

_V = TypeVar("_V", bound=int)


def name_to_pb(names: Mapping[str, _V], name: str, field: str) -> _V:
    """The wire value of a config name; a name without one (a simulator-only policy) is a ValueError naming
    ``field``."""
    try:
        return names[name]
    except KeyError:
        raise ValueError(f"{field}: {name!r} has no ClusterConfig value (known: {tuple(names)})") from None


def name_from_pb(names: Mapping[str, int], value: int) -> str | None:
    """The config name of a wire value; None for a value this version does not know (the caller names the field)."""
    for name, number in names.items():
        if number == value:
            return name
    return None


__all__ = [
    "DISPATCH_POLICIES",
    "DRAIN_VICTIMS",
    "MIRRORS",
    "PAIRING_POLICIES",
    "Mirror",
    "finish_from_pb",
    "finish_label",
    "finish_to_pb",
    "name_from_pb",
    "name_to_pb",
    "outcome_from_pb",
    "outcome_to_pb",
    "phase_from_pb",
    "phase_to_pb",
    "priority_from_pb",
    "priority_to_pb",
    "state_from_pb",
    "state_to_pb",
]
