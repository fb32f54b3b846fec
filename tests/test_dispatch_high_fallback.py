"""A high-priority request goes where its prompt fits when its headroom fits nowhere, never behind a full instance.

The headroom (all but 100 blocks) is charged on instances without high-priority work, so their high-request freeness
is deeply negative; an instance already holding high-priority work is not charged it, and so kept ranking first
even when it had no room left: every high-priority request queued there. In the simulator (S-S 36 req/s, Gamma CV 4,
10 % high priority, seed 2) high-priority prefill averaged 56 s against 0.20 s with priorities ignored."""

from __future__ import annotations

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch.llumnix import LlumnixDispatch
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.infra.vocabulary import Priority
from tests.test_policy_helpers import view

HIGH = DispatchRequestView("h", Priority.HIGH, num_prompt_tokens=16 * 40)  # 40 blocks
NORMAL = DispatchRequestView("n", Priority.NORMAL, num_prompt_tokens=16 * 40)


def cluster(high_free: int) -> ClusterSnapshot:
    # 1,000-block instances, 16-token blocks (the helper's defaults): the high headroom is 900.
    return ClusterSnapshot.of(
        [
            # Holds high-priority work: not charged the headroom; freeness high_free / 4.
            view(
                "a-high", free_blocks=high_free, num_running=4, num_running_high=4, running_high_blocks=1000 - high_free
            ),
            # Normal work only: 500 free, charged 900 for a high request: (500 - 900) / 10 = -40.
            view("b-normal", free_blocks=500, num_running=10),
        ]
    )


def test_a_high_request_goes_to_the_high_instance_while_it_fits_there() -> None:
    assert LlumnixDispatch(PolicyConfig()).choose(cluster(high_free=200), HIGH) == "a-high"


def test_a_high_request_that_fits_no_high_instance_goes_where_its_prompt_fits() -> None:
    # a-high has 20 free blocks (freeness 5, still far above b's -40) but the 40-block prompt would wait there.
    assert LlumnixDispatch(PolicyConfig()).choose(cluster(high_free=20), HIGH) == "b-normal"


def test_where_the_prompt_fits_nowhere_the_freest_instance_still_takes_it() -> None:
    # Nowhere even by preempting normal requests (the engine does that for a high-priority head; see
    # test_dispatch_normal_spill.py): b holds only high-priority work too.
    snap = ClusterSnapshot.of(
        [
            view("a-high", free_blocks=20, num_running=4, num_running_high=4, running_high_blocks=980),
            view("b-high", free_blocks=10, num_running=10, num_running_high=10, running_high_blocks=990),
        ]
    )
    assert LlumnixDispatch(PolicyConfig()).choose(snap, HIGH) == "a-high"


def test_normal_requests_are_unchanged() -> None:
    assert LlumnixDispatch(PolicyConfig()).choose(cluster(high_free=20), NORMAL) == "b-normal"
