"""Request selection on a source instance."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.selection import select_request
from pyllumnix.control_plane.policy.views import RequestView
from pyllumnix.infra.vocabulary import Priority, RequestPhase

R, W = RequestPhase.RUNNING, RequestPhase.WAITING
REQS = [
    RequestView("short", R, Priority.NORMAL, num_blocks=3, arrival_time=5.0),
    RequestView("long", R, Priority.NORMAL, num_blocks=90, arrival_time=1.0),
    RequestView("late", R, Priority.NORMAL, num_blocks=40, arrival_time=9.0),
    RequestView("vip-short", R, Priority.HIGH, num_blocks=1, arrival_time=10.0),  # never picked
    RequestView("moving", RequestPhase.MIGRATING, Priority.NORMAL, num_blocks=2, arrival_time=11.0),
    RequestView("q2", W, Priority.NORMAL, demand_blocks=8, arrival_time=7.0),
    RequestView("q1", W, Priority.NORMAL, demand_blocks=8, arrival_time=6.0),
    RequestView("vip-q", W, Priority.HIGH, demand_blocks=8, arrival_time=0.0),
]


@pytest.mark.parametrize(
    ("selection", "expected"),
    [(Selection.SR, "short"), (Selection.LR, "long"), (Selection.LCR, "late"), (Selection.FCW, "q1")],
)
def test_selection(selection: Selection, expected: str) -> None:
    assert select_request(REQS, selection) == expected


def test_ties_break_by_arrival_then_id() -> None:
    reqs = [RequestView("b", R, num_blocks=4, arrival_time=1.0), RequestView("a", R, num_blocks=4, arrival_time=1.0)]
    assert select_request(reqs, Selection.SR) == "a"
    reqs.append(RequestView("c", R, num_blocks=4, arrival_time=0.5))
    assert select_request(reqs, Selection.SR) == "c"


def test_fallback_and_high_priority_only() -> None:
    waiting_only = [r for r in REQS if r.phase == W]
    assert select_request(waiting_only, Selection.SR) == "q1"
    assert select_request(waiting_only, Selection.SR, fallback=False) is None
    running_only = [r for r in REQS if r.phase == R]
    assert select_request(running_only, Selection.FCW) == "short"
    assert select_request([r for r in REQS if r.priority == Priority.HIGH], Selection.SR) is None
    assert select_request([], Selection.LCR) is None
