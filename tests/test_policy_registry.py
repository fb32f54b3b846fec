"""Policy facts live on the policy classes, and every name list comes from a registry: registering a policy in its
registry is all it takes for config validation, the CLIs' choices and pairing to know it.

Before, the names were literal tuples in ``config.py`` (``DISPATCH_POLICIES``, ``PAIRING_POLICIES``,
``DRAIN_VICTIMS``), whether a dispatch policy migrates was a name check (``NO_MIGRATION_POLICIES``) and the pairing
policy an ``if name == "balanced"``: a policy added to a registry was refused by validation, and its migration fact
had to be repeated by name elsewhere. The ``registered_*`` tests fail on that code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from pyllumnix.control_plane.policy import (
    DISPATCH_POLICIES,
    DISPATCH_REGISTRY,
    DRAIN_VICTIM_REGISTRY,
    DRAIN_VICTIMS,
    PAIRING_POLICIES,
    PAIRING_REGISTRY,
    PairingPolicy,
    PolicyCore,
    migration_active,
    pair_instances,
)
from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.scaling import decide_scaling
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, InstanceView
from tests.test_policy_helpers import view


def test_name_lists_are_the_registries_in_order() -> None:
    assert (
        DISPATCH_POLICIES
        == tuple(DISPATCH_REGISTRY)
        == ("llumnix", "infaas++", "infaas-mem", "round-robin", "balanced")
    )
    assert PAIRING_POLICIES == tuple(PAIRING_REGISTRY) == ("defrag", "balanced")
    assert DRAIN_VICTIMS == tuple(DRAIN_VICTIM_REGISTRY) == ("fewest-requests", "last")
    assert all(cls.name == name for name, cls in DISPATCH_REGISTRY.items())
    assert all(cls.name == name for name, cls in PAIRING_REGISTRY.items())


@pytest.mark.parametrize(
    ("policy", "enable_migration", "active"),
    [
        ("llumnix", True, True),
        ("llumnix", False, False),
        ("round-robin", True, True),
        ("balanced", True, True),
        ("infaas++", True, False),  # the baselines never migrate, whatever the flag says
        ("infaas-mem", True, False),
        ("infaas++", False, False),
    ],
)
def test_migration_follows_the_dispatch_policy_fact(policy: str, enable_migration: bool, active: bool) -> None:
    config = PolicyConfig(dispatch_policy=policy, enable_migration=enable_migration)
    assert DISPATCH_REGISTRY[policy].allows_migration is (policy not in ("infaas++", "infaas-mem"))
    assert migration_active(config) is active
    assert PolicyCore(config).migration_active is active


def overloaded_pair() -> ClusterSnapshot:
    """``hot`` is below the migrate-out threshold (3) with running requests, ``cold`` empty: one pair."""
    return ClusterSnapshot.of(
        [view("hot", free_blocks=10, num_running=10, running_blocks=990), view("cold", free_blocks=1000)]
    )


class NeverMigrating(LlumnixDispatch):
    name = "never-migrating"
    allows_migration = False


def test_a_registered_dispatch_policy_is_valid_and_its_migration_fact_is_obeyed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snap = overloaded_pair()
    assert [(o.source, o.destination) for o in pair_instances(snap, PolicyConfig())] == [("hot", "cold")]
    monkeypatch.setitem(DISPATCH_REGISTRY, NeverMigrating.name, NeverMigrating)
    config = PolicyConfig(dispatch_policy=NeverMigrating.name).validate()
    core = PolicyCore(config)
    assert core.dispatch(snap, DispatchRequestView("r", num_prompt_tokens=16)) == "cold"
    assert core.pair(snap) == []
    assert not core.migration_active


class KeepsNothing(PairingPolicy):
    name = "keeps-nothing"

    @classmethod
    def keeps(cls, src: InstanceView, dst: InstanceView, f_src: float, f_dst: float, config: PolicyConfig) -> bool:
        return False


def test_a_registered_pairing_policy_is_valid_and_decides_the_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PAIRING_REGISTRY, KeepsNothing.name, KeepsNothing)
    config = PolicyConfig(pairing_policy=KeepsNothing.name).validate()
    assert pair_instances(overloaded_pair(), config) == []
    assert len(pair_instances(overloaded_pair(), PolicyConfig(pairing_policy="defrag"))) == 1


def test_a_registered_drain_victim_is_valid_and_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    def first(cands: Sequence[InstanceView], config: PolicyConfig) -> InstanceView:
        return min(cands, key=lambda v: v.instance_id)

    monkeypatch.setitem(DRAIN_VICTIM_REGISTRY, "first", first)
    base = PolicyConfig(enable_scaling=True, min_instances=1, scale_down_threshold=60.0)
    snap = ClusterSnapshot.of([view(f"i{k}") for k in (1, 2, 3)])  # all idle: the average freeness is infinite
    assert decide_scaling(snap, dataclasses.replace(base, drain_victim="first").validate()).drain == ("i1",)
    assert decide_scaling(snap, dataclasses.replace(base, drain_victim="last")).drain == ("i3",)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dispatch_policy", "nope", "dispatch_policy: unknown policy 'nope'; known: ('llumnix', 'infaas++',"),
        ("pairing_policy", "nope", "pairing_policy: unknown policy 'nope'; known: ('defrag', 'balanced')"),
        ("drain_victim", "nope", "drain_victim: unknown choice 'nope'; known: ('fewest-requests', 'last')"),
    ],
)
def test_unknown_names_are_refused_naming_the_registry(field: str, value: str, message: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError) as err:
        PolicyConfig(**kwargs).validate()
    assert str(err.value).startswith(message)
