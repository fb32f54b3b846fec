"""One vocabulary: every Python enum that mirrors a proto enum agrees with it, member for member, so a phase, finish
reason, instance state, priority, selection or migration outcome means the same on the wire, in the policy and in
the engine. The checks walk the proto descriptors, so a value added to a proto enum without its mirror fails here,
and so does a new proto enum that nobody decided to mirror or not."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.descriptor import EnumDescriptor

from pyllumnix.clients.client import GenerationChunk, parse_priority
from pyllumnix.clients.errors import InvalidArgumentError
from pyllumnix.control_plane.frontend.errors import InvalidRequestError
from pyllumnix.control_plane.frontend.openai_schema import PRIORITIES, finish_reason_name
from pyllumnix.control_plane.frontend.openai_schema import parse_priority as http_priority
from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.dispatch import DISPATCH_REGISTRY
from pyllumnix.control_plane.policy.pairing import PAIRING_REGISTRY
from pyllumnix.control_plane.policy.scaling import DRAIN_VICTIM_REGISTRY
from pyllumnix.data_plane.engine.base import Finish, Phase, RequestLoadInfo, TokenOutput
from pyllumnix.data_plane.engine.vllm import vllm_available
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.migration.events import Outcome
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import (
    ENDED_OUTCOMES,
    FinishReason,
    InstanceState,
    MigrationOutcome,
    Priority,
    RequestPhase,
)
from pyllumnix.protos.llumnix.v1 import common_pb2, config_pb2, frontend_pb2, llumlet_pb2

# Every proto enum with a Python mirror outside ``wire.MIRRORS``: (mirror, descriptor, prefix).
OTHER_MIRRORS: list[tuple[type[enum.Enum], EnumDescriptor, str]] = [
    (Selection, common_pb2.MigrationSelection.DESCRIPTOR, "MIGRATION_SELECTION_"),
]
# Proto enums deliberately without a Python enum: their values are config names (the policy registries' keys),
# mapped by ``infra/wire.py``'s name tables, checked below.
NOT_MIRRORED = {
    "llumnix.v1.DispatchPolicy",
    "llumnix.v1.PairingPolicy",
    "llumnix.v1.DrainVictim",
}
ALL_MIRRORS = [(m.vocabulary, m.proto, m.prefix) for m in wire.MIRRORS] + OTHER_MIRRORS


def proto_values(descriptor: EnumDescriptor, prefix: str) -> dict[str, int]:
    """NAME -> int of every value of a proto enum, the prefix stripped (UNSPECIFIED included)."""
    return {v.name.removeprefix(prefix): v.number for v in descriptor.values}


def test_every_proto_enum_is_mirrored_or_declared_unmirrored() -> None:
    mirrored = {d.full_name for _, d, _ in ALL_MIRRORS}
    protos = {
        e.full_name
        for module in (common_pb2, llumlet_pb2, config_pb2)
        for e in module.DESCRIPTOR.enum_types_by_name.values()
    }
    assert mirrored.isdisjoint(NOT_MIRRORED)
    assert protos == mirrored | NOT_MIRRORED, "a new proto enum: mirror it in infra/wire.py or list it as unmirrored"


@pytest.mark.parametrize(("mirror", "descriptor", "prefix"), ALL_MIRRORS, ids=[m.__name__ for m, _, _ in ALL_MIRRORS])
def test_each_mirror_equals_its_proto_enum_value_for_value(
    mirror: type[enum.Enum], descriptor: EnumDescriptor, prefix: str
) -> None:
    wire_values = proto_values(descriptor, prefix)
    canonical = {m.name: m.value for m in mirror}  # aliases (RequestPhase.SUSPENDED) are no values of their own
    if "UNSPECIFIED" not in canonical:  # Selection has no UNSPECIFIED: a config without one means its default
        wire_values.pop("UNSPECIFIED")
    assert canonical == wire_values


@pytest.mark.parametrize("mirror", [m.vocabulary for m in wire.MIRRORS], ids=[m.proto.name for m in wire.MIRRORS])
def test_wire_mappings_round_trip_and_read_unknown_values_as_unspecified(mirror: type[enum.IntEnum]) -> None:
    conversions: dict[type[enum.IntEnum], tuple[Callable[[Any], int], Callable[[int], enum.IntEnum]]] = {
        RequestPhase: (wire.phase_to_pb, wire.phase_from_pb),
        FinishReason: (wire.finish_to_pb, wire.finish_from_pb),
        InstanceState: (wire.state_to_pb, wire.state_from_pb),
        Priority: (wire.priority_to_pb, wire.priority_from_pb),
        MigrationOutcome: (wire.outcome_to_pb, wire.outcome_from_pb),
    }
    to_pb, from_pb = conversions[mirror]
    for member in mirror:
        back = from_pb(to_pb(member))
        # Priority is normalised on the way in: UNSPECIFIED reads as NORMAL.
        assert back is (Priority.NORMAL if member is Priority.UNSPECIFIED else member)
    assert from_pb(99) is (Priority.HIGH if mirror is Priority else mirror(0))


@pytest.mark.parametrize(
    ("names", "descriptor", "registry", "simulator_only"),
    [
        (wire.DISPATCH_POLICIES, config_pb2.DispatchPolicy.DESCRIPTOR, DISPATCH_REGISTRY, {"infaas-mem"}),
        (wire.PAIRING_POLICIES, config_pb2.PairingPolicy.DESCRIPTOR, PAIRING_REGISTRY, set()),
        (wire.DRAIN_VICTIMS, config_pb2.DrainVictim.DESCRIPTOR, DRAIN_VICTIM_REGISTRY, set()),
    ],
    ids=["DispatchPolicy", "PairingPolicy", "DrainVictim"],
)
def test_config_name_tables_name_every_proto_value_and_every_registered_policy(
    names: dict[str, int], descriptor: EnumDescriptor, registry: dict[str, object], simulator_only: set[str]
) -> None:
    """Each non-UNSPECIFIED proto value has exactly one policy name, and every registered policy but the
    simulator-only ones has a value: a policy added on either side without the other fails here."""
    values = sorted(names.values())
    assert values == sorted(v.number for v in descriptor.values if v.number != 0)
    assert set(names) == set(registry) - simulator_only
    for name in names:
        assert wire.name_from_pb(names, wire.name_to_pb(names, name, "field")) == name
    assert wire.name_from_pb(names, 99) is None
    for name in (*simulator_only, "bogus"):
        with pytest.raises(ValueError, match=f"field: '{name}' has no ClusterConfig value"):
            wire.name_to_pb(names, name, "field")


def load_info(phase: Phase) -> RequestLoadInfo:
    return RequestLoadInfo("r", phase, 1, 0, 0, 1, 0, 0, 0.0)


def test_the_engines_speak_the_vocabulary() -> None:
    assert Phase is RequestPhase and Finish is FinishReason
    # The engine's SUSPENDED is the wire's MIGRATING (a request held for its last migration stage).
    assert Phase.SUSPENDED is RequestPhase.MIGRATING  # type: ignore[comparison-overlap]
    assert Phase.SUSPENDED.label == "suspended"
    for phase in (Phase.WAITING, Phase.RUNNING, Phase.SUSPENDED, Phase.FINISHED):
        assert convert.request_load_to_pb(load_info(phase)).phase == int(phase)
    assert convert.request_load_to_pb(load_info(Phase.SUSPENDED)).phase == common_pb2.REQUEST_PHASE_MIGRATING


def test_every_finish_reason_reaches_clients_under_its_proto_name() -> None:
    for value in common_pb2.FinishReason.DESCRIPTOR.values:
        name = value.name.removeprefix("FINISH_REASON_").lower()
        reason = FinishReason(value.number)
        out = convert.queued_output(TokenOutput("r", (), 0, reason is not FinishReason.UNSPECIFIED, reason))
        built = frontend_pb2.PushOutputsRequest()
        out.add_to(built.outputs, "i")
        assert out.finish_reason == built.outputs[0].finish_reason == value.number
        label = None if name == "unspecified" else name
        assert wire.finish_label(value.number) == label
        chunk = GenerationChunk.from_pb(
            frontend_pb2.GenerateResponse(request_id="r", finished=True, finish_reason=wire.finish_to_pb(reason))
        )
        assert chunk.finish_reason == label
        assert finish_reason_name(value.number, finished=True) == (label or "stop")
    assert convert.queued_output(TokenOutput("r", (1,), 0, False, None)).finish_reason == 0
    assert wire.finish_label(99) is None and finish_reason_name(99, finished=False) is None


def test_priority_parsing_and_normalising() -> None:
    assert PRIORITIES == {"normal": common_pb2.PRIORITY_NORMAL, "high": common_pb2.PRIORITY_HIGH}
    assert http_priority("HIGH", "priority") == common_pb2.PRIORITY_HIGH
    with pytest.raises(InvalidRequestError):
        http_priority("urgent", "priority")
    assert parse_priority("high") == parse_priority("PRIORITY_HIGH") == parse_priority(2) == common_pb2.PRIORITY_HIGH
    for bad in ("urgent", 7, True):
        with pytest.raises(InvalidArgumentError, match="bad priority"):
            parse_priority(bad)
    # What an engine is given: UNSPECIFIED is NORMAL, anything at or above HIGH is HIGH.
    for sent, kept in ((0, Priority.NORMAL), (1, Priority.NORMAL), (2, Priority.HIGH), (9, Priority.HIGH)):
        spec = convert.spec_from_pb(common_pb2.EngineRequest(request_id="r", priority=sent))  # type: ignore[arg-type]
        assert spec.priority is kept
        assert convert.spec_to_pb(spec, "f").priority == int(kept)


def test_the_migration_machines_speak_the_vocabulary() -> None:
    """The machines' Outcome is the mirrored MigrationOutcome (its RUNNING the wire's UNSPECIFIED), and each ended
    outcome's label is the MigrationStats field and metric label it is counted under."""
    assert Outcome is MigrationOutcome
    assert Outcome.RUNNING is MigrationOutcome.UNSPECIFIED  # type: ignore[comparison-overlap]
    assert Outcome.RUNNING.label == "running"
    assert wire.outcome_to_pb(Outcome.RUNNING) == llumlet_pb2.MIGRATION_OUTCOME_UNSPECIFIED
    assert ENDED_OUTCOMES == (Outcome.COMMITTED, Outcome.ABORTED_BY_SOURCE, Outcome.ABORTED_BY_DESTINATION)
    stats_fields = set(common_pb2.MigrationStats.DESCRIPTOR.fields_by_name)
    for outcome in ENDED_OUTCOMES:
        assert outcome.label == outcome.name.lower() and outcome.label in stats_fields
        assert outcome.counted_as is outcome
    # A result without an outcome this version knows counts as the source giving up (the request stayed put).
    assert wire.outcome_from_pb(99).counted_as is MigrationOutcome.ABORTED_BY_SOURCE


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_the_vllm_finish_reasons_map_into_the_vocabulary() -> None:
    engine = pytest.importorskip("vllm.v1.engine")
    from pyllumnix.data_plane.engine.vllm.adapter import _FINISH_FROM_VLLM

    for member in engine.FinishReason:
        assert int(member) in _FINISH_FROM_VLLM, f"vLLM finish reason {member.name} has no mapping"
        mapped = _FINISH_FROM_VLLM[int(member)]
        # Same name where the vocabulary has it; vLLM's REPETITION (a stop condition) reads as STOP.
        assert mapped.name == (member.name if member.name in FinishReason.__members__ else "STOP")
