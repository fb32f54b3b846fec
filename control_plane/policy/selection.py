"""Which request a source instance migrates out (run by the llumlet on its own request list).

SR: shortest running (fewest blocks: cheapest to move; the current default); LR: longest running; LCR: last-come
running (the paper era's default); FCW: the head-of-line waiting request (moves without KV). High-priority requests
are never picked: migration exists to protect them, not to disturb them. Ties break by arrival, then id.

``max_blocks`` (the destination's room, ``pairing.order_room``) keeps only the candidates the destination can take:
a source that picked a request too large for it had its migration refused at pre-allocation, and the pairing loop
sent the same order every round (~10 futile migrations a second, holding both instances' migration slots). The limit
never changes which kind of request moves: the fallback to the other kind applies only when the selection's own kind
has no candidate at all, as without a limit. A fallback taken because no running request fit moved waiting requests
from overloaded sources onto nearly full destinations (never done before the limit: a source that runs requests
sent a running one or nothing), and cost the simulated Llumnix its prefill latency (docs/sim/REPORT.md, session 8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.views import RequestView
from pyllumnix.infra.vocabulary import Priority, RequestPhase

_KEYS: dict[Selection, Callable[[RequestView], tuple[float, float, str]]] = {
    Selection.SR: lambda r: (r.num_blocks, r.arrival_time, r.request_id),
    Selection.LR: lambda r: (-r.num_blocks, r.arrival_time, r.request_id),
    Selection.LCR: lambda r: (-r.arrival_time, 0.0, r.request_id),
    Selection.FCW: lambda r: (r.arrival_time, 0.0, r.request_id),
}


def select_request(
    requests: Sequence[RequestView], selection: Selection, *, fallback: bool = True, max_blocks: int = 0
) -> str | None:
    """The id of the request to migrate, or None. With ``fallback`` a running-request selection that finds no running
    candidate takes the head waiting request, and FCW with an empty queue takes the shortest running one, so a
    draining instance can always empty itself. ``max_blocks`` > 0 considers only the requests that fit in that many
    blocks (0: no limit): a running one needs its blocks plus one block of growth (it keeps decoding while its
    blocks are copied), a waiting one its prefill demand. The order applies among those; the fallback only where the
    selection's own kind has no candidate at all, fitting or not (see the module docstring)."""
    movable = [r for r in requests if r.priority < Priority.HIGH]
    running = [r for r in movable if r.phase == RequestPhase.RUNNING]
    waiting = [r for r in movable if r.phase == RequestPhase.WAITING]
    primary, other, other_sel = (
        (waiting, running, Selection.SR) if selection == Selection.FCW else (running, waiting, Selection.FCW)
    )
    if primary:
        candidates, order = primary, selection
    elif fallback and other:
        candidates, order = other, other_sel
    else:
        return None
    fitting = [r for r in candidates if max_blocks <= 0 or blocks_needed(r) <= max_blocks]
    return min(fitting, key=_KEYS[order]).request_id if fitting else None


# The block of growth a running request needs at the destination beyond its own: it keeps decoding while its blocks
# are copied. One constant for the source's fit rule here and the pairing's estimate of it
# (``pairing._picked_blocks_bound``), so the pairing never orders a pick the source then refuses.
RUNNING_GROWTH_BLOCKS = 1


def blocks_needed(r: RequestView) -> int:
    """The destination blocks migrating ``r`` takes: a running request's blocks plus ``RUNNING_GROWTH_BLOCKS`` (it
    keeps decoding while its blocks are copied), a waiting one's prefill demand (it moves without KV)."""
    return r.num_blocks + RUNNING_GROWTH_BLOCKS if r.phase == RequestPhase.RUNNING else r.demand_blocks
