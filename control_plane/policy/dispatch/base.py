"""The one interface every dispatch policy implements, and the vectorized arg-max they share."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.snapshot import BoolArray, ClusterSnapshot, FloatArray
from pyllumnix.control_plane.policy.views import DispatchRequestView


class DispatchPolicy(ABC):
    """Chooses the instance for a new request from a snapshot. Never returns an instance that is not ACTIVE and
    healthy; returns None when no instance can take requests. Policies may keep state (a cursor) but read no clock and
    draw randomness only from the seeded ``rng`` they are given."""

    name: ClassVar[str]
    # Whether pairing may migrate requests under this policy. False for the baselines that by definition never migrate
    # (INFaaS++ and its variant): pairing is then off whatever ``enable_migration`` says.
    allows_migration: ClassVar[bool] = True

    def __init__(self, config: PolicyConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng if rng is not None else random.Random(0)

    @abstractmethod
    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None: ...


def argmax_where(values: FloatArray, mask: BoolArray) -> int | None:
    """Index of the largest value among ``mask``; ties go to the lowest index (= lowest instance id)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    return int(idx[int(np.argmax(values[idx]))])
