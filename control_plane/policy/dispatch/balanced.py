"""Balanced: the instance with the fewest requests (running + waiting + dispatched since its last report)."""

from __future__ import annotations

from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy, argmax_where
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView


class BalancedDispatch(DispatchPolicy):
    name = "balanced"

    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        c = snapshot.columns
        i = argmax_where(-c.load, c.eligible)
        return None if i is None else snapshot.ids[i]
