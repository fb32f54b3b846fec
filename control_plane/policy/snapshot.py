"""The cluster snapshot the policy core decides on: the instance views (``views.py``) in id order, plus a few numpy
columns next to them.

The columns make a dispatch decision over 1,024 instances a handful of vectorized operations instead of a Python
loop; updating one instance copies the columns (microseconds) rather than rebuilding them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from pyllumnix.control_plane.policy.views import InstanceView
from pyllumnix.infra.vocabulary import InstanceState, Priority

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

# Column order of SnapshotColumns / row_values().
_FLOAT_COLS = ("avail", "load", "total")
_BOOL_COLS = ("eligible", "draining", "holds_high", "holds_normal")


class SnapshotColumns(NamedTuple):
    """Per-instance numbers in snapshot order (sorted by instance id), read-only. ``avail`` = free - waiting demand -
    demand dispatched since the report; ``load`` = running + waiting + dispatched since the report.

    Held as three read-only arrays (floats rows: avail, load, total; bools rows: eligible, draining, holds_high,
    holds_normal) with the named columns as row views made on access: columns are rebuilt as snapshots are derived,
    and building eight views each time would cost more than the few accesses a decision makes."""

    floats: FloatArray
    block_size: IntArray
    bools: BoolArray

    @property
    def avail(self) -> FloatArray:
        row: FloatArray = self.floats[0]
        return row

    @property
    def load(self) -> FloatArray:
        row: FloatArray = self.floats[1]
        return row

    @property
    def total(self) -> FloatArray:
        row: FloatArray = self.floats[2]
        return row

    @property
    def eligible(self) -> BoolArray:
        row: BoolArray = self.bools[0]
        return row

    @property
    def draining(self) -> BoolArray:
        row: BoolArray = self.bools[1]
        return row

    @property
    def holds_high(self) -> BoolArray:
        row: BoolArray = self.bools[2]
        return row

    @property
    def holds_normal(self) -> BoolArray:
        row: BoolArray = self.bools[3]
        return row


Row = tuple[tuple[float, float, float], int, tuple[bool, bool, bool, bool]]


def row_values(v: InstanceView) -> Row:
    """One instance's column values: (avail, load, total), block size, (eligible, draining, holds_high,
    holds_normal). A policy keeping derived arrays patches them from these, exactly as the columns are written."""
    floats = (
        float(v.free_blocks - v.waiting_demand_blocks - v.dispatched_demand_blocks),
        float(v.num_requests),
        float(v.total_blocks),
    )
    bools = (v.accepts_requests, v.state == InstanceState.DRAINING, v.holds_high, v.holds_normal)
    return floats, v.block_size, bools


def _build_columns(views: tuple[InstanceView, ...]) -> SnapshotColumns:
    n = len(views)
    fl = np.empty((len(_FLOAT_COLS), n), dtype=np.float64)
    bs = np.empty(n, dtype=np.int64)
    bo = np.empty((len(_BOOL_COLS), n), dtype=np.bool_)
    for i, v in enumerate(views):
        f, b, flags = row_values(v)
        fl[:, i] = f
        bs[i] = b
        bo[:, i] = flags
    return _freeze(fl, bs, bo)


def _patched_columns(c: SnapshotColumns, entries: Iterable[tuple[int, tuple[InstanceView, Row]]]) -> SnapshotColumns:
    """A copy of ``c`` with the given rows rewritten, in one fancy-indexed assignment per array (this runs when a
    chain of derived snapshots is rebased, with up to ``_MAX_DELTA`` rows)."""
    positions: list[int] = []
    floats: list[tuple[float, float, float]] = []
    sizes: list[int] = []
    flags: list[tuple[bool, bool, bool, bool]] = []
    for i, (_, (f, b, flag)) in entries:
        positions.append(i)
        floats.append(f)
        sizes.append(b)
        flags.append(flag)
    fl, bs, bo = c.floats.copy(), c.block_size.copy(), c.bools.copy()
    if positions:
        fl[:, positions] = np.array(floats, dtype=np.float64).T
        bs[positions] = sizes
        bo[:, positions] = np.array(flags, dtype=np.bool_).T
    return _freeze(fl, bs, bo)


def _freeze(fl: FloatArray, bs: IntArray, bo: BoolArray) -> SnapshotColumns:
    fl.flags.writeable = False
    bs.flags.writeable = False
    bo.flags.writeable = False
    return SnapshotColumns(fl, bs, bo)


# A derived snapshot keeps what changed since an ancestor as a small delta over that ancestor's views (a shared tuple)
# and columns; past this many changed instances both are materialized and the chain starts over.
_MAX_DELTA = 64
_serials = itertools.count(1)


class ClusterSnapshot:
    """All instances, sorted by id (the deterministic tie-break order). Immutable: updates return a new snapshot.

    Deriving a snapshot from another (``updated``) costs O(changed instances), not O(instances): the views and the
    columns of an ancestor are shared and the changes since it kept in a delta; each is materialized on first use
    (and then serves as the base of the next derived snapshots). The dispatch path derives one snapshot per decision
    and, with the Llumnix policy, reads no column: its kept keys are patched from ``changed`` (positions changed since
    the parent, identified by ``parent_serial``) and ``view_at``. A pass over 1,024 view objects or a copy of the
    columns per decision would otherwise dominate a dispatch."""

    __slots__ = (
        "_base",
        "_col_base",
        "_col_delta",
        "_columns",
        "_delta",
        "_views",
        "changed",
        "ids",
        "parent_serial",
        "positions",
        "serial",
    )

    ids: tuple[str, ...]
    positions: Mapping[str, int]
    serial: int
    parent_serial: int
    changed: tuple[int, ...]

    def __init__(
        self,
        ids: tuple[str, ...],
        positions: Mapping[str, int],
        base: tuple[InstanceView, ...],
        columns: SnapshotColumns,
        delta: dict[int, tuple[InstanceView, Row]] | None = None,
        col_delta: dict[int, tuple[InstanceView, Row]] | None = None,
        *,
        parent_serial: int = 0,
        changed: tuple[int, ...] = (),
    ) -> None:
        """``base`` with ``delta`` applied are the views; ``columns`` with ``col_delta`` applied the columns. A delta
        maps a position to its new view and that view's ``row_values`` (computed once, when the view comes in). The
        delta dicts are never mutated once given here (derived snapshots copy them), so they may be shared."""
        self.ids = ids
        self.positions = positions
        self.serial = next(_serials)
        self.parent_serial = parent_serial
        self.changed = changed
        self._base = base
        self._delta = delta or {}
        self._views: tuple[InstanceView, ...] | None = None if self._delta else base
        self._col_base = columns
        self._col_delta = col_delta or {}
        self._columns: SnapshotColumns | None = None if self._col_delta else columns

    @classmethod
    def of(cls, views: Iterable[InstanceView]) -> ClusterSnapshot:
        ordered = tuple(sorted(views, key=lambda v: v.instance_id))
        ids = tuple(v.instance_id for v in ordered)
        positions = {iid: i for i, iid in enumerate(ids)}
        if len(positions) != len(ordered):
            raise ValueError("duplicate instance_id in snapshot")
        return cls(ids, positions, ordered, _build_columns(ordered))

    @property
    def instances(self) -> tuple[InstanceView, ...]:
        """Every view in id order (materialized on first use)."""
        if self._views is None:
            lst = list(self._base)
            for i, (v, _) in self._delta.items():
                lst[i] = v
            self._views = tuple(lst)
        return self._views

    @property
    def columns(self) -> SnapshotColumns:
        """The per-instance numbers as arrays (materialized on first use)."""
        if self._columns is None:
            self._columns = _patched_columns(self._col_base, self._col_delta.items())
        return self._columns

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[InstanceView]:
        return iter(self.instances)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self.positions

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterSnapshot):
            return NotImplemented
        return self.ids == other.ids and self.instances == other.instances

    __hash__ = None  # type: ignore[assignment]  # equality by content, and caches inside

    def __reduce__(self) -> tuple[Any, tuple[tuple[InstanceView, ...]]]:
        """Pickles as its views: the unpickled copy is rebuilt with a serial of its own process, so no policy there
        can take it for the snapshot its kept keys were computed for."""
        return (ClusterSnapshot.of, (self.instances,))

    def __repr__(self) -> str:
        return f"ClusterSnapshot({len(self)} instances, serial={self.serial})"

    def view_at(self, position: int) -> InstanceView:
        if self._views is not None:
            return self._views[position]
        entry = self._delta.get(position)
        return self._base[position] if entry is None else entry[0]

    def row_at(self, position: int) -> Row:
        """``row_values`` of the view at ``position`` (kept from when it came in, for the changed positions)."""
        entry = self._delta.get(position) or self._col_delta.get(position)
        return row_values(self.view_at(position)) if entry is None else entry[1]

    def get(self, instance_id: str) -> InstanceView | None:
        i = self.positions.get(instance_id)
        return None if i is None else self.view_at(i)

    def updated(self, views: Iterable[InstanceView]) -> ClusterSnapshot:
        """Replaces (or adds) views. O(changed instances) unless a new instance forces a rebuild."""
        if isinstance(views, InstanceView):  # a tuple itself: iterating it would walk its fields
            raise TypeError("updated() takes an iterable of InstanceView, not one view")
        batch = views if isinstance(views, (list, tuple)) else list(views)
        positions = self.positions
        views_fresh, columns_fresh = self._views is not None, self._columns is not None
        base, delta = (self.instances, {}) if views_fresh else (self._base, self._delta.copy())
        # Where the views and the columns start from the same snapshot, one delta serves both.
        if columns_fresh:
            col_base, col_delta = self.columns, (delta if views_fresh else {})
        elif not views_fresh and self._col_delta is self._delta:
            col_base, col_delta = self._col_base, delta
        else:
            col_base, col_delta = self._col_base, self._col_delta.copy()
        changed = []
        for v in batch:
            i = positions.get(v.instance_id)
            if i is None:  # a new instance: rebuild
                merged = {v.instance_id: v for v in self.instances}
                merged.update((v.instance_id, v) for v in batch)
                return ClusterSnapshot.of(merged.values())
            delta[i] = col_delta[i] = (v, row_values(v))
            changed.append(i)
        snap = ClusterSnapshot(
            self.ids, positions, base, col_base, delta, col_delta, parent_serial=self.serial, changed=tuple(changed)
        )
        if len(delta) > _MAX_DELTA:
            snap._base, snap._delta = snap.instances, {}
        if len(col_delta) > _MAX_DELTA:
            snap._col_base, snap._col_delta = snap.columns, {}
        return snap

    def without(self, instance_ids: Iterable[str]) -> ClusterSnapshot:
        gone = set(instance_ids)
        return ClusterSnapshot.of(v for v in self.instances if v.instance_id not in gone)

    def record_dispatch(self, instance_id: str, demand_blocks: int, priority: int = Priority.NORMAL) -> ClusterSnapshot:
        """The snapshot after a request was sent to ``instance_id`` (counts until that instance's next report)."""
        view = self.get(instance_id)
        if view is None:
            raise KeyError(instance_id)
        return self.updated((view.with_dispatch(demand_blocks, priority),))
