"""Dispatch policies, one module each behind ``DispatchPolicy``, looked up by name."""

from __future__ import annotations

import random

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.balanced import BalancedDispatch
from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy
from pyllumnix.control_plane.policy.dispatch.infaas import InfaasMemDispatch, InfaasPlusPlusDispatch
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.dispatch.round_robin import RoundRobinDispatch

DISPATCH_REGISTRY: dict[str, type[DispatchPolicy]] = {
    cls.name: cls
    for cls in (LlumnixDispatch, InfaasPlusPlusDispatch, InfaasMemDispatch, RoundRobinDispatch, BalancedDispatch)
}
# The names config validation and the CLIs accept, in registry order.
DISPATCH_POLICIES: tuple[str, ...] = tuple(DISPATCH_REGISTRY)


def make_dispatch_policy(name: str, config: PolicyConfig, rng: random.Random | None = None) -> DispatchPolicy:
    """Raises ValueError for an unknown name."""
    try:
        cls = DISPATCH_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dispatch policy {name!r}; known: {sorted(DISPATCH_REGISTRY)}") from None
    return cls(config, rng)


__all__ = [
    "DISPATCH_POLICIES",
    "DISPATCH_REGISTRY",
    "BalancedDispatch",
    "DispatchPolicy",
    "InfaasMemDispatch",
    "InfaasPlusPlusDispatch",
    "LlumnixDispatch",
    "RoundRobinDispatch",
    "make_dispatch_policy",
]
