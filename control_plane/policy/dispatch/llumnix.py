"""Llumnix dispatch: the instance with the highest dispatch freeness, priority-aware.

A high-priority request prefers instances where its headroom (and its prefill) still fits. A normal request ranks
every instance by its freeness with the instance's headroom charged: an instance holding high-priority work carries
the high headroom (all but 100 blocks), so normal requests keep away from it while the rest of the cluster is freer,
and use its spare memory once every other instance is more loaded than that (the artifact's dispatch load: one soft
ranking, no tier that excludes high-priority instances). A hard exclusion left those instances' memory idle while
normal requests queued elsewhere (Fig. 13, S-S at 36 req/s: 3 of 16 instances held 1,550-2,100 free blocks while
over 1,000 normal requests waited). The soft ranking alone still left it idle in a burst (see ``_spill``): a normal
request the ranking would queue goes to an instance holding high-priority work where it runs at once and leaves
``normal_spill_floor_blocks`` free; the engines serve high-priority requests first and preempt normal ones for them
(``data_plane/engine/scheduler.py``), so the high-priority work there does not queue behind it.

The high headroom is relative to the instance (``PolicyConfig.high_headroom``: by default all but 100 blocks). As in
the artifact, a high-priority request is charged it only where no high-priority work is yet: an instance already
holding high-priority requests has paid it (its normal-request freeness carries it), so there the request sees the
freeness without it. High-priority requests therefore concentrate on a few instances, whose batches stay small
because normal requests are steered away from them.

The ranking keys depend only on the snapshot and the headroom config, not on the request (a high request adds only a
fit test against its prompt). So they are kept per snapshot and, when the next snapshot was derived from the one they
were computed for (``ClusterSnapshot.updated``: a report or a dispatch changed a few instances), patched at the changed
positions instead of recomputed over every instance. The patch is the scalar form of the same arithmetic, so the
choice is exactly the full computation's (checked by property tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyllumnix.control_plane.policy.dispatch.base import DispatchPolicy
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot, FloatArray, IntArray
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.infra.vocabulary import Priority

NOT_A_CANDIDATE = -math.inf


@dataclass(slots=True)
class _Keys:
    """Ranking keys for one snapshot. Freeness is finite or +inf, never -inf, so -inf marks "not a candidate".

    ``normal_eligible``: freeness with the instance's current headroom. ``high_*``: freeness as a high request sees
    it (charged the high headroom only where no high-priority work is yet); ``high_num`` is that numerator and
    ``block_size`` the instance's, for the request's fit test; ``watermark`` the blocks its engine keeps free when it
    admits a request, for the spill's "runs at once" test. ``headroom`` = (high cap, high reserve, normal) the keys
    were computed with."""

    serial: int
    headroom: tuple[int, int, int]
    normal_eligible: FloatArray
    high_num: FloatArray
    high_eligible: FloatArray
    block_size: IntArray
    watermark: FloatArray


class LlumnixDispatch(DispatchPolicy):
    name = "llumnix"
    _keys: _Keys | None = None

    def choose(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        if len(snapshot) == 0:
            return None
        keys = self._keys_for(snapshot)
        if request.priority >= Priority.HIGH:
            demand = -(-request.num_prompt_tokens // np.maximum(keys.block_size, 1))
            preferred = np.where(keys.high_num >= demand, keys.high_eligible, NOT_A_CANDIDATE)
            # Where the headroom fits nowhere, an instance the prompt still fits (behind its queue) before one where
            # it would wait: the headroom charged elsewhere must not send it to a full high-priority instance.
            fits = np.where(snapshot.columns.avail >= demand, keys.high_eligible, NOT_A_CANDIDATE)
            if fits.max() == NOT_A_CANDIDATE:
                # Nowhere yet: where it fits by preempting normal requests (the engine does so for a high-priority
                # head), else anywhere. Left to the freeness alone, a 384-block prompt queued ~100 s behind the
                # long-lived high-priority batch of a full instance, where no migration could reach it (Fig. 13).
                fits = np.where(_room_with_normal_blocks(snapshot) >= demand, keys.high_eligible, NOT_A_CANDIDATE)
            fallback = fits if fits.max() > NOT_A_CANDIDATE else keys.high_eligible
        else:
            i = int(keys.normal_eligible.argmax())  # ties: the lowest index, i.e. the lowest instance id
            if keys.normal_eligible[i] == NOT_A_CANDIDATE:
                return None
            return snapshot.ids[self._spill(snapshot, keys, request, i)]
        i = int(preferred.argmax())  # ties: the lowest index, i.e. the lowest instance id
        if preferred[i] == NOT_A_CANDIDATE:
            i = int(fallback.argmax())
            if fallback[i] == NOT_A_CANDIDATE:
                return None
        return snapshot.ids[i]

    def _spill(self, snapshot: ClusterSnapshot, keys: _Keys, request: DispatchRequestView, best: int) -> int:
        """Where a normal request goes when the ranking's choice ``best`` would queue it: the best-ranked instance
        holding high-priority work where it runs at once and leaves ``normal_spill_floor_blocks`` (at least its
        watermark) free; else ``best``.

        The charged freeness alone leaves that memory idle in a burst: charged the headroom (all but 100 blocks),
        an instance with a few high-priority requests and hundreds of free blocks has a negative numerator divided by
        its small batch, while a normal instance with a long queue has one divided by its many requests, so the queue
        looks freer and keeps growing (Fig. 13, docs/sim/REPORT.md)."""
        c = snapshot.columns
        # "Runs at once": the engine admits a request only while its prefill leaves the watermark free.
        if c.avail[best] + request.num_prompt_tokens // -max(int(keys.block_size[best]), 1) >= keys.watermark[best]:
            return best
        demand = -(-request.num_prompt_tokens // np.maximum(keys.block_size, 1))
        floor = np.maximum(self.config.normal_spill_floor_blocks, keys.watermark)
        room = np.where(c.holds_high & (c.avail - demand >= floor), keys.normal_eligible, NOT_A_CANDIDATE)
        j = int(room.argmax())
        return j if room[j] > NOT_A_CANDIDATE else best

    def _keys_for(self, snapshot: ClusterSnapshot) -> _Keys:
        cfg = self.config
        headroom = (cfg.high_headroom_blocks, cfg.high_headroom_reserve_blocks, cfg.normal_headroom_blocks)
        keys = self._keys
        if keys is not None and keys.headroom == headroom:
            if keys.serial == snapshot.serial:
                return keys
            # A few changes are patched in place; a batch (the scheduler folds reports every 10 ms) is cheaper as one
            # vectorised pass than one Python step per changed instance.
            if keys.serial == snapshot.parent_serial and len(snapshot.changed) * 8 <= len(snapshot):
                _patch(keys, snapshot)
                return keys
        self._keys = keys = _full(snapshot, headroom)
        return keys


def _room_with_normal_blocks(snapshot: ClusterSnapshot) -> FloatArray:
    """``avail`` plus the blocks of each instance's running normal requests (what preempting them would free). A loop
    over the views: only a high-priority request that fits nowhere as things stand needs it."""
    normal = np.fromiter(
        (v.running_blocks - v.running_high_blocks for v in snapshot.instances), dtype=np.float64, count=len(snapshot)
    )
    out: FloatArray = snapshot.columns.avail + normal
    return out


def _high_headroom(cap: float, reserve: float, total: FloatArray) -> FloatArray:
    """``PolicyConfig.high_headroom`` over a column of instance sizes."""
    out: FloatArray = np.minimum(cap, np.maximum(0.0, total - reserve))
    return out


def _full(snapshot: ClusterSnapshot, headroom: tuple[int, int, int]) -> _Keys:
    c = snapshot.columns
    cap, reserve, normal = headroom
    high = _high_headroom(cap, reserve, c.total)
    normal_eligible = np.where(
        c.eligible, freeness_of(c.avail - (high * c.holds_high + normal * c.holds_normal), c.load), NOT_A_CANDIDATE
    )
    high_num = c.avail - (high * ~c.holds_high + normal * c.holds_normal)
    return _Keys(
        serial=snapshot.serial,
        headroom=headroom,
        normal_eligible=normal_eligible,
        high_num=high_num,
        high_eligible=np.where(c.eligible, freeness_of(high_num, c.load), NOT_A_CANDIDATE),
        block_size=c.block_size.copy(),
        watermark=np.fromiter((v.watermark_blocks for v in snapshot.instances), dtype=np.float64, count=len(snapshot)),
    )


def _patch(keys: _Keys, snapshot: ClusterSnapshot) -> None:
    """Moves ``keys`` (computed for the parent of ``snapshot``) to ``snapshot`` by recomputing the changed positions,
    in place: the keys are this policy's own state for the latest snapshot it saw, and ``serial`` says which."""
    cap, reserve, normal = keys.headroom
    for i in snapshot.changed:
        (avail, load, total), block_size, (eligible, _, holds_high, holds_normal) = snapshot.row_at(i)
        high = min(float(cap), max(0.0, total - reserve))
        keys.block_size[i] = block_size
        keys.watermark[i] = snapshot.view_at(i).watermark_blocks
        num = avail - (high * holds_high + normal * holds_normal)
        f = num / load if load > 0 else math.inf
        keys.normal_eligible[i] = f if eligible else NOT_A_CANDIDATE
        num = avail - (high * (not holds_high) + normal * holds_normal)
        keys.high_num[i] = num
        keys.high_eligible[i] = (num / load if load > 0 else math.inf) if eligible else NOT_A_CANDIDATE
    keys.serial = snapshot.serial


def freeness_of(num: FloatArray, load: FloatArray) -> FloatArray:
    """num / load with +inf where the instance is empty."""
    out: FloatArray = np.full(num.shape, np.inf)
    np.divide(num, load, out=out, where=load > 0)
    return out
