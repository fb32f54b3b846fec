"""What the policy core reads about instances and requests: one immutable view per instance and per request.

The core imports neither engine types nor protos: the adapters live with their callers and share ``priority_split``
+ ``view_of`` — the live scheduler's from ``llumnix.v1`` messages (``control_plane/scheduler/views.py``), the
engine side's from an engine snapshot (``data_plane/llumlet/views.py``: the simulator, a llumlet selecting a request
to migrate). The column store over these views is ``snapshot.ClusterSnapshot``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pyllumnix.infra.vocabulary import InstanceState, Priority, RequestPhase, normalize_priority


class LoadFigures(Protocol):
    """The engine figures a load report and an engine snapshot share (``view_of`` reads them)."""

    @property
    def total_blocks(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def watermark_blocks(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_preempted(self) -> int: ...
    @property
    def head_of_line_demand_blocks(self) -> int: ...
    @property
    def waiting_demand_blocks(self) -> int: ...
    @property
    def reserved_blocks(self) -> int: ...


class InstanceView(NamedTuple):
    """One instance as the policies see it. ``dispatched_*`` count requests sent since the last load report, so
    consecutive decisions between two reports do not all herd onto the same instance.

    A named tuple rather than a frozen dataclass: one is built per load report and per dispatch, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs ~7x as much for its 23 fields."""

    instance_id: str
    state: InstanceState = InstanceState.ACTIVE
    healthy: bool = True
    total_blocks: int = 0
    free_blocks: int = 0
    block_size: int = 16
    watermark_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0
    head_of_line_demand_blocks: int = 0
    waiting_demand_blocks: int = 0
    # Per-priority split (NORMAL is the remainder): enough to compute the priority headroom.
    num_running_high: int = 0
    running_high_blocks: int = 0
    num_waiting_high: int = 0
    # Physical blocks held by running requests (total - free - reserved when no request list was reported).
    running_blocks: int = 0
    reserved_blocks: int = 0
    migrating_in: bool = False
    migrating_out: bool = False
    dispatched_since_report: int = 0
    dispatched_demand_blocks: int = 0
    dispatched_high: int = 0
    seq: int = 0

    @property
    def num_running_normal(self) -> int:
        return self.num_running - self.num_running_high

    @property
    def num_requests(self) -> int:
        """Running + waiting + dispatched since the last report."""
        return self.num_running + self.num_waiting + self.dispatched_since_report

    @property
    def holds_high(self) -> bool:
        """Holds (or was just sent) a high-priority request."""
        return self.num_running_high + self.num_waiting_high + self.dispatched_high > 0

    @property
    def holds_normal(self) -> bool:
        return self.num_requests - (self.num_running_high + self.num_waiting_high + self.dispatched_high) > 0

    @property
    def accepts_requests(self) -> bool:
        """Eligible for dispatch and migration in: ACTIVE and healthy."""
        return self.state == InstanceState.ACTIVE and self.healthy

    def with_dispatch(self, demand_blocks: int, priority: int = Priority.NORMAL) -> InstanceView:
        """The view after one more request was sent here (until the next load report replaces it)."""
        values: list[Any] = list(self)
        values[_DISPATCHED] += 1
        values[_DISPATCHED + 1] += demand_blocks
        values[_DISPATCHED + 2] += 1 if normalize_priority(priority) == Priority.HIGH else 0
        return InstanceView._make(values)


_VIEW_FIELDS: tuple[str, ...] = InstanceView._fields
# dispatched_since_report, dispatched_demand_blocks, dispatched_high are consecutive fields.
_DISPATCHED = _VIEW_FIELDS.index("dispatched_since_report")
assert _VIEW_FIELDS[_DISPATCHED : _DISPATCHED + 3] == (
    "dispatched_since_report",
    "dispatched_demand_blocks",
    "dispatched_high",
)


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request on an instance, as request selection sees it."""

    request_id: str
    phase: RequestPhase
    priority: Priority = Priority.NORMAL
    num_blocks: int = 0
    demand_blocks: int = 0
    arrival_time: float = 0.0


@dataclass(frozen=True, slots=True)
class DispatchRequestView:
    """What dispatch knows about a new request."""

    request_id: str = ""
    priority: Priority = Priority.NORMAL
    num_prompt_tokens: int = 0
    max_tokens: int = 0

    def demand_blocks(self, block_size: int) -> int:
        """Blocks needed to prefill the prompt."""
        return -(-self.num_prompt_tokens // block_size) if block_size > 0 else 0


def priority_split(requests: Iterable[tuple[int, int, int]]) -> tuple[int, int, int, int, bool]:
    """(phase, priority, blocks) triples → running_high, running_high_blocks, waiting_high, running_blocks, any.
    ``phase`` is a ``RequestPhase`` int: the caller maps its own phase names onto it."""
    run_high = run_high_blocks = wait_high = run_blocks = 0
    seen = False
    for phase, priority, blocks in requests:
        seen = True
        high = priority >= Priority.HIGH
        if phase in (RequestPhase.RUNNING, RequestPhase.MIGRATING):
            run_blocks += blocks
            if high:
                run_high += 1
                run_high_blocks += blocks
        elif phase == RequestPhase.WAITING and high:
            wait_high += 1
    return run_high, run_high_blocks, wait_high, run_blocks, seen


def view_of(
    load: LoadFigures,
    instance_id: str,
    split: tuple[int, int, int, int, bool],
    **extra: Any,
) -> InstanceView:
    """The view of a proto report or an engine snapshot (both name their engine figures alike; ``split`` comes from
    ``priority_split`` over their requests). Without a request list, the blocks in use count as running blocks."""
    rh, rhb, wh, rb, seen = split
    if not seen:
        rb = max(0, load.total_blocks - load.free_blocks - load.reserved_blocks)
    return InstanceView(
        instance_id=instance_id,
        total_blocks=load.total_blocks,
        free_blocks=load.free_blocks,
        block_size=load.block_size,
        watermark_blocks=load.watermark_blocks,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_preempted=load.num_preempted,
        head_of_line_demand_blocks=load.head_of_line_demand_blocks,
        waiting_demand_blocks=load.waiting_demand_blocks,
        num_running_high=rh,
        running_high_blocks=rhb,
        num_waiting_high=wh,
        running_blocks=rb,
        reserved_blocks=load.reserved_blocks,
        **extra,
    )
