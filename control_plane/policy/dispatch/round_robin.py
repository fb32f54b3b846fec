"""Round-robin (the paper's naive baseline): the next eligible instance after the last one chosen, in id order.

The cursor is the last chosen *id*, not a position, so instances joining or leaving do not make it skip or repeat.
The first pick is drawn from the seeded rng, so replicas with different seeds do not all start on the same instance.
"""

from __future__ import annotations

import bisect

import numpy as np

from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView


class RoundRobinDispatch(DispatchPolicy):
    name = "round-robin"
    cursor: str | None = None

    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        idx = np.flatnonzero(snapshot.columns.eligible)
        if idx.size == 0:
            return None
        if self.cursor is None:
            j = self.rng.randrange(idx.size)
        else:
            j = int(np.searchsorted(idx, bisect.bisect_right(snapshot.ids, self.cursor)))
            if j == idx.size:
                j = 0
        self.cursor = snapshot.ids[int(idx[j])]
        return self.cursor
