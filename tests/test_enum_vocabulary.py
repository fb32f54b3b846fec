"""One vocabulary: every Python enum that mirrors a proto enum agrees with it, member for member, so a phase, finish
reason, instance state, priority, selection or migration outcome means the same on the wire, in the policy and in
the engine. A member added on one side only fails here."""

from __future__ import annotations

import enum

import pytest

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.snapshot import InstanceState, Priority, RequestPhase, RequestView
from pyllumnix.data_plane.engine.base import Finish, Phase, RequestLoadInfo, TokenOutput
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.migration.events import Outcome
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2


def proto_values(wrapper: object, prefix: str) -> dict[str, int]:
    """NAME -> int of a proto enum, the prefix stripped, UNSPECIFIED left out."""
    items: list[tuple[str, int]] = wrapper.items()  # type: ignore[attr-defined]
    return {n.removeprefix(prefix): v for n, v in items if not n.endswith("_UNSPECIFIED")}


@pytest.mark.parametrize(
    ("mirror", "wrapper", "prefix"),
    [
        (InstanceState, common_pb2.InstanceState, "INSTANCE_STATE_"),
        (Priority, common_pb2.Priority, "PRIORITY_"),
        (RequestPhase, common_pb2.RequestPhase, "REQUEST_PHASE_"),
        (Selection, common_pb2.MigrationSelection, "MIGRATION_SELECTION_"),
    ],
)
def test_int_mirrors_equal_their_proto_values(mirror: type[enum.IntEnum], wrapper: object, prefix: str) -> None:
    assert {m.name: int(m) for m in mirror if m.name != "UNSPECIFIED"} == proto_values(wrapper, prefix)


def load_info(phase: Phase) -> RequestLoadInfo:
    return RequestLoadInfo("r", phase, 1, 0, 0, 1, 0, 0, 0.0)


def test_engine_phase_means_the_same_on_the_wire_and_in_the_policy() -> None:
    wire = {p: convert.request_load_to_pb(load_info(p)).phase for p in Phase}
    policy = {p: int(RequestView.from_engine(load_info(p)).phase) for p in Phase}
    assert wire == policy
    assert sorted(wire.values()) == sorted(proto_values(common_pb2.RequestPhase, "REQUEST_PHASE_").values())
    # Same names but one: the engine's SUSPENDED is the wire's MIGRATING (a request held for its last stage).
    names = {p.name: common_pb2.RequestPhase.Name(v).removeprefix("REQUEST_PHASE_") for p, v in wire.items()}
    assert {k: v for k, v in names.items() if k != v} == {"SUSPENDED": "MIGRATING"}


def test_engine_finish_reasons_are_the_proto_finish_reasons() -> None:
    wire = {
        f.name: common_pb2.FinishReason.Name(
            convert.output_to_pb(TokenOutput("r", (), 0, True, f), "i").finish_reason
        ).removeprefix("FINISH_REASON_")
        for f in Finish
    }
    assert wire == {n: n for n in proto_values(common_pb2.FinishReason, "FINISH_REASON_")}


def test_migration_outcomes_are_the_proto_outcomes() -> None:
    names = {o.name for o in Outcome if o is not Outcome.RUNNING}
    assert names == set(proto_values(llumlet_pb2.MigrationOutcome, "MIGRATION_OUTCOME_"))
