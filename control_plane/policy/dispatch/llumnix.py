"""Llumnix dispatch: the instance with the highest dispatch freeness, priority-aware.

A high-priority request prefers instances where its headroom (and its prefill) still fits; a normal request avoids
instances that hold high-priority requests while any other instance can take it. Both tiers rank by freeness.
"""

from __future__ import annotations

import numpy as np

from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy, argmax_where
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot, DispatchRequestView, FloatArray, Priority


class LlumnixDispatch(DispatchPolicy):
    name = "llumnix"

    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        c = snapshot.columns
        cfg = self.config
        if request.priority >= Priority.HIGH:
            # Freeness as if it were placed here: the instance then holds the high-priority headroom.
            num = c.avail - (cfg.high_headroom_blocks + cfg.normal_headroom_blocks * c.holds_normal)
            demand = -(-request.num_prompt_tokens // np.maximum(c.block_size, 1))
            preferred = c.eligible & (num - demand >= 0)
        else:
            num = c.avail - (cfg.high_headroom_blocks * c.holds_high + cfg.normal_headroom_blocks * c.holds_normal)
            preferred = c.eligible & ~c.holds_high
        freeness = freeness_of(num, c.load)
        i = argmax_where(freeness, preferred)
        if i is None:
            i = argmax_where(freeness, c.eligible)
        return None if i is None else snapshot.ids[i]


def freeness_of(num: FloatArray, load: FloatArray) -> FloatArray:
    """num / load with +inf where the instance is empty."""
    out: FloatArray = np.full(num.shape, np.inf)
    np.divide(num, load, out=out, where=load > 0)
    return out
