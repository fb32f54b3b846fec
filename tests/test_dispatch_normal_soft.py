"""A normal request ranks every instance by its freeness with the headroom charged, as the artifact's dispatch load
does: an instance holding high-priority work is charged the high headroom (total - 100 blocks), so normal requests
keep away from it while any other instance is freer, and use its spare memory once every other instance is more
loaded. Before, such instances were excluded outright while any other instance could take the request: under load
(Fig. 13, S-S 36 req/s) 3 of 16 instances kept 1,550-2,100 blocks idle while over 1,000 normal requests queued."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, InstanceView
from pyllumnix.infra.vocabulary import Priority
from tests.test_policy_helpers import view

NORMAL = DispatchRequestView("n", Priority.NORMAL, num_prompt_tokens=16 * 8)  # 8 blocks
HIGH = DispatchRequestView("h", Priority.HIGH, num_prompt_tokens=16 * 8)


def high_instance(used: int, n_high: int = 2) -> InstanceView:
    """A 1,000-block instance holding only ``n_high`` high-priority requests using ``used`` blocks: charged the
    headroom of 900, its normal-request freeness is (1000 - used - 900) / n_high."""
    return view("h-inst", free_blocks=1000 - used, num_running=n_high, num_running_high=n_high)


def normal_instance(free: int, running: int, waiting_demand: int = 0) -> InstanceView:
    waiting = 1 if waiting_demand else 0
    return view(
        "n-inst",
        free_blocks=free,
        num_running=running,
        num_waiting=waiting,
        head_of_line_demand_blocks=waiting_demand,
        waiting_demand_blocks=waiting_demand,
    )


# (case, high-priority instance, normal instance, where a normal request goes)
CASES = [
    # The normal instance is freer: 400/10 = 40 against (1000 - 40 - 900)/2 = 30. Old and new agree.
    ("normal instance freer", high_instance(40), normal_instance(400, 10), "n-inst"),
    # The normal instance is full and queues (free 20 - waiting 300 over 11 requests: -25); the high instance's
    # charged freeness (1000 - 40 - 900)/2 = 30 is higher, so its spare memory takes the request. Old: n-inst.
    ("normal instance queues", high_instance(40), normal_instance(20, 10, waiting_demand=300), "h-inst"),
    # The high instance's own batch already uses more than the 100 unreserved blocks: charged freeness
    # (1000 - 300 - 900)/2 = -100, below the queueing normal instance's -25, so the ranking picks n-inst; but the
    # request would queue there while h-inst keeps 700 - 8 >= 100 blocks free: it spills (test_dispatch_normal_spill).
    ("high instance past its reserve", high_instance(300), normal_instance(20, 10, waiting_demand=300), "h-inst"),
    # The same where the normal instance still has room for it: the ranking's choice.
    ("high instance past its reserve, room", high_instance(300), normal_instance(60, 10, waiting_demand=40), "n-inst"),
]


@pytest.mark.parametrize(("case", "high", "normal", "expected"), CASES, ids=[c[0] for c in CASES])
def test_normal_request_ranks_high_instances_by_their_charged_freeness(
    case: str, high: InstanceView, normal: InstanceView, expected: str
) -> None:
    snap = ClusterSnapshot.of([high, normal])
    assert LlumnixDispatch(PolicyConfig()).choose(snap, NORMAL) == expected, case


def test_high_requests_still_concentrate_where_normal_requests_spill() -> None:
    """The spill does not move high-priority requests: they still go to the instance holding high-priority work
    (not charged there), not to the queueing normal instance (charged 900 there)."""
    snap = ClusterSnapshot.of([high_instance(40), normal_instance(20, 10, waiting_demand=300)])
    assert LlumnixDispatch(PolicyConfig()).choose(snap, HIGH) == "h-inst"


def test_spill_follows_the_charged_freeness_along_a_chain_of_dispatches() -> None:
    """Normal requests spill onto the high instance only while its charged freeness is the highest; then the two
    share further work by freeness. The normal instance: 100 free over 10 requests (10). The high instance:
    (1000 - 40 - 900)/2 = 30, then 52/3 = 17.3, 44/4 = 11, 36/5 = 7.2 after three 8-block requests."""
    snap = ClusterSnapshot.of([high_instance(40), normal_instance(100, 10)])
    policy = LlumnixDispatch(PolicyConfig())
    placed = []
    for _ in range(6):
        chosen = policy.choose(snap, NORMAL)
        assert chosen is not None
        placed.append(chosen)
        snap = snap.record_dispatch(chosen, NORMAL.demand_blocks(16), NORMAL.priority)
    # then n-inst (10) beats 7.2; n-inst 92/11 = 8.4 beats 7.2 again; then 84/12 = 7.0 < 7.2: h-inst.
    assert placed == ["h-inst"] * 3 + ["n-inst", "n-inst", "h-inst"]
