"""INFaaS++ (the paper's strongest baseline): the least memory-loaded instance, i.e. the highest fraction of free
blocks left after its waiting demand. Migration is off under this policy (see PolicyConfig.migration_active)."""

from __future__ import annotations

import numpy as np

from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy, argmax_where
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot, DispatchRequestView


class InfaasPlusPlusDispatch(DispatchPolicy):
    name = "infaas++"

    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        c = snapshot.columns
        i = argmax_where(c.avail / np.maximum(c.total, 1.0), c.eligible)
        return None if i is None else snapshot.ids[i]
