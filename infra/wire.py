"""Every mapping between the one vocabulary (:mod:`pyllumnix.infra.vocabulary`) and the ``llumnix.v1`` proto enums.

The vocabulary's enums carry the proto's ints, so each mapping is an ``int()`` one way and the enum's lenient ``of``
the other (a value from a newer peer reads as UNSPECIFIED instead of failing the message); keeping them here, typed,
means no other module spells a proto enum out member by member. ``MIRRORS`` lists every pair for
``tests/test_enum_vocabulary.py``, which checks member for member, from the proto descriptors, that they agree.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, cast

from google.protobuf.descriptor import EnumDescriptor

from pyllumnix.infra.vocabulary import FinishReason, InstanceState, Priority, RequestPhase, normalize_priority
from pyllumnix.protos.llumnix.v1 import common_pb2


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


__all__ = [
    "MIRRORS",
    "Mirror",
    "finish_from_pb",
    "finish_label",
    "finish_to_pb",
    "phase_from_pb",
    "phase_to_pb",
    "priority_from_pb",
    "priority_to_pb",
    "state_from_pb",
    "state_to_pb",
]
