"""Normal requests use the spare memory of instances holding high-priority work when the freeness ranking would
queue them (``PolicyConfig.normal_spill_floor_blocks``), and a high-priority request that fits nowhere goes where
preempting normal requests makes it fit.

Why: charged the headroom (all but 100 blocks), an instance with a few high-priority requests and hundreds of free
blocks has a negative numerator over a small batch, while a normal instance with a long queue has one over many
requests, so the queue looked freer: in a Gamma CV 4 burst (Fig. 13, S-S 33 req/s, seed 1) 3 instances kept
1,000-1,700 blocks free while ~880 normal requests queued. Each ``CASES`` row marked "old:" chose differently before.
"""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, InstanceView
from pyllumnix.infra.vocabulary import Priority
from tests.test_policy_helpers import view

NORMAL = DispatchRequestView("n", Priority.NORMAL, num_prompt_tokens=16 * 8)  # 8 blocks
BIG_HIGH = DispatchRequestView("h", Priority.HIGH, num_prompt_tokens=16 * 384)  # 384 blocks
FLOOR100 = PolicyConfig(normal_spill_floor_blocks=100)


def high_instance(iid: str, free: int, n_high: int = 2, watermark: int = 0) -> InstanceView:
    """1,000 blocks, ``n_high`` high-priority requests running: normal freeness (free - 900) / n_high."""
    return view(
        iid,
        free_blocks=free,
        num_running=n_high,
        num_running_high=n_high,
        running_high_blocks=1000 - free,
        watermark_blocks=watermark,
    )


def queueing_instance(iid: str, free: int = 4, waiting_demand: int = 300, running: int = 10) -> InstanceView:
    return view(
        iid,
        free_blocks=free,
        num_running=running,
        num_waiting=30,
        head_of_line_demand_blocks=10,
        waiting_demand_blocks=waiting_demand,
    )


# (case, instances, config, where a normal request goes)
CASES = [
    # 400/10 = 40 beats (1000 - 300 - 900)/2: the ranking's choice fits, no spill.
    ("best fits", [high_instance("h", 700), view("n", free_blocks=400, num_running=10)], PolicyConfig(), "n"),
    # n: (4 - 300)/40 = -7.4 beats h's (700 - 900)/2 = -100, but queues there; h has 700 - 8 >= 100 free. Old: n.
    ("best queues, spill", [high_instance("h", 700), queueing_instance("n")], PolicyConfig(), "h"),
    # With a floor of 100, h would keep 105 - 8 = 97 < 100 free: the request stays with the ranking's choice.
    ("room under the floor", [high_instance("h", 105), queueing_instance("n")], FLOOR100, "n"),
    # The default floor, 0: all of h's free memory (the engine preempts the request when high-priority work needs it).
    ("default floor 0", [high_instance("h", 105), queueing_instance("n")], PolicyConfig(), "h"),
    ("no room at all", [high_instance("h", 7), queueing_instance("n")], PolicyConfig(), "n"),
    (
        "floor 92 lets it in",
        [high_instance("h", 105), queueing_instance("n")],
        PolicyConfig(normal_spill_floor_blocks=92),
        "h",
    ),
    # The artifact's rule: a floor above any instance's size turns the spill off.
    (
        "spill off",
        [high_instance("h", 700), queueing_instance("n")],
        PolicyConfig(normal_spill_floor_blocks=1_000_000),
        "n",
    ),
    # Among instances with room, the best ranked: h2's (800 - 900)/2 = -50 beats h1's (700 - 900)/2 = -100. Old: n.
    (
        "best ranked of two",
        [high_instance("h1", 700), high_instance("h2", 800), queueing_instance("n")],
        PolicyConfig(),
        "h2",
    ),
    # No instance holds high-priority work: nothing changes (runs without priorities keep their dispatch).
    ("no high instance", [queueing_instance("a", waiting_demand=400), queueing_instance("b")], PolicyConfig(), "b"),
    # R2 (review 6): "runs at once" keeps the engine's watermark free. n's 20 free blocks take the 8-block prompt but
    # leave 12 < its watermark 15, so the engine queues it: spill. Old: n.
    (
        "best within its watermark, spill",
        [high_instance("h", 700), view("n", free_blocks=20, num_running=10, watermark_blocks=15)],
        PolicyConfig(),
        "h",
    ),
    # The same instance with a watermark of 12 admits it (20 - 8 = 12): no spill.
    (
        "best at its watermark",
        [high_instance("h", 700), view("n", free_blocks=20, num_running=10, watermark_blocks=12)],
        PolicyConfig(),
        "n",
    ),
    # h's 105 free blocks less the 8-block prompt leave 97 < its watermark 100 (floor 0): h would queue it too, so it
    # stays with the ranking's choice. Old: h.
    (
        "room within the watermark",
        [high_instance("h", 105, watermark=100), queueing_instance("n")],
        PolicyConfig(),
        "n",
    ),
    ("room at the watermark", [high_instance("h", 105, watermark=97), queueing_instance("n")], PolicyConfig(), "h"),
    # A floor above the watermark still decides: 97 < 98.
    (
        "floor above the watermark",
        [high_instance("h", 105, watermark=10), queueing_instance("n")],
        PolicyConfig(normal_spill_floor_blocks=98),
        "n",
    ),
]


@pytest.mark.parametrize(("case", "instances", "config", "expected"), CASES, ids=[c[0] for c in CASES])
def test_normal_request_spills_when_the_ranking_would_queue_it(
    case: str, instances: list[InstanceView], config: PolicyConfig, expected: str
) -> None:
    assert LlumnixDispatch(config).choose(ClusterSnapshot.of(instances), NORMAL) == expected, case


def test_spilled_requests_are_counted_until_the_next_report() -> None:
    """Dispatches between two reports take the room they were given: h (120 free) takes two 8-block requests, then
    120 - 16 - 8 = 96 < 100 (floor 100) and the third goes to the ranking's choice."""
    snap = ClusterSnapshot.of([high_instance("h", 120), queueing_instance("n")])
    policy = LlumnixDispatch(FLOOR100)
    placed = []
    for _ in range(3):
        chosen = policy.choose(snap, NORMAL)
        assert chosen is not None
        placed.append(chosen)
        snap = snap.record_dispatch(chosen, NORMAL.demand_blocks(16), NORMAL.priority)
    assert placed == ["h", "h", "n"]


def test_a_high_request_that_fits_nowhere_goes_where_preempting_normal_requests_makes_it_fit() -> None:
    """384 blocks fit no instance's free memory. Old: the high instance (not charged: 300/5 = 60), where it waited
    for its long-lived high-priority batch; now the normal instance, whose 800 blocks of normal requests the engine
    preempts for it."""
    snap = ClusterSnapshot.of(
        [
            high_instance("h", 300, n_high=5),
            view("n", free_blocks=100, num_running=10, running_blocks=800),
        ]
    )
    assert LlumnixDispatch(PolicyConfig()).choose(snap, BIG_HIGH) == "n"


def test_a_high_request_that_fits_nowhere_even_by_preemption_keeps_the_freeness_choice() -> None:
    snap = ClusterSnapshot.of(
        [
            high_instance("h", 300, n_high=5),
            view(
                "n", free_blocks=100, num_running=10, num_running_high=10, running_blocks=800, running_high_blocks=800
            ),
        ]
    )
    assert LlumnixDispatch(PolicyConfig()).choose(snap, BIG_HIGH) == "h"


def test_a_reported_watermark_reaches_the_kept_keys() -> None:
    """The policy patches its keys from the changed instances of a derived snapshot: a report that only raises h's
    watermark must move the spill (h: 105 - 8 = 97 free after the prompt) exactly as a fresh computation does. Eight
    more queueing instances (ranked after n) make one changed instance few enough to be patched, not recomputed."""
    policy = LlumnixDispatch(PolicyConfig())
    more = [queueing_instance(f"z{i}", waiting_demand=900) for i in range(8)]
    snap = ClusterSnapshot.of([high_instance("h", 105), queueing_instance("n"), *more])
    assert policy.choose(snap, NORMAL) == "h"
    for watermark, expected in ((100, "n"), (97, "h"), (98, "n")):
        snap = snap.updated([high_instance("h", 105, watermark=watermark)])
        assert policy.choose(snap, NORMAL) == expected == LlumnixDispatch(PolicyConfig()).choose(snap, NORMAL)
