"""The INFaaS++ baselines; migration is off under both (``allows_migration = False``).

- ``infaas++``: the paper's strongest baseline as its artifact ran it: Llumnix's own load-based dispatch (highest
  dispatch freeness, (free - all waiting demand) / (running + waiting)) with migration and de-fragmentation off.
- ``infaas-mem``: the highest fraction of free blocks left after waiting demand; the variant this project used before
  reading the artifact, kept for comparison (simulator only).
"""

from __future__ import annotations

import numpy as np

from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy, argmax_where
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView


class InfaasPlusPlusDispatch(LlumnixDispatch):
    name = "infaas++"
    allows_migration = False


class InfaasMemDispatch(DispatchPolicy):
    name = "infaas-mem"
    allows_migration = False

    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        c = snapshot.columns
        i = argmax_where(c.avail / np.maximum(c.total, 1.0), c.eligible)
        return None if i is None else snapshot.ids[i]
