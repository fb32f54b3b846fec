"""Refusing an AddRequest whose caller has already given up on it (LEFT2 #2).

A frontend whose AddRequest to instance A times out (DEADLINE_EXCEEDED is ambiguous: A may still add it) sends A a
best-effort abort and places the request elsewhere. Two orders of events would leave a copy on A that nobody wants,
holding KV blocks and a queue slot until its idle timeout (and, without TLS, pushing tokens the frontend must drop):

- the AddRequest handler runs (or wakes from the engine lock) after its deadline has passed: grpc cancels a handler
  waiting on the lock only if the event loop gets to it first; one that a long step or a lock release wakes first
  would add. The check runs right before the add, after any wait (``check_deadline``).
- the abort overtakes the AddRequest (different calls, no order between them): it finds nothing (NOT_FOUND, which the
  frontend ignores), and the add comes after. An abort of an id this llumlet does not hold leaves a short-lived
  tombstone (``Tombstones``), and an AddRequest of that id is refused (ABORTED).

A tombstone is taken by the AddRequest it refuses: it guards the one add its abort overtook, and a client that later
reuses the id (ids may be client-chosen) is not refused beyond that. An abort also arrives here for requests that have
just left (finished, or migrated out, as the client's abort was on its way); the llumlet cannot tell that abort from
an overtaking one (AbortRequest names only the id), so a reuse of such an id within the TTL has its first add refused.
The frontend, which never aborts a request on an instance whose add it still awaits, takes an ABORTED answer for a
live request as an earlier request's tombstone and places it again: the client sees nothing of it.

Tombstones last ``TOMBSTONE_TTL_S`` (well past any AddRequest deadline: a late add is refused by its deadline anyway)
and at most ``TOMBSTONE_MAX`` are kept, the oldest dropped first, so aborts of unknown ids cannot fill memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

TOMBSTONE_TTL_S = 60.0
TOMBSTONE_MAX = 10_000


class CallerGaveUpError(Exception):
    """The AddRequest's deadline passed before the request could be added (gRPC DEADLINE_EXCEEDED)."""


class AbortedBeforeArrivalError(Exception):
    """An abort of this request id reached the llumlet before its AddRequest did (gRPC ABORTED)."""


class Tombstones:
    """Request ids aborted while unknown here, each for ``ttl_s``; at most ``max_entries`` (oldest dropped first).

    One TTL for all means insertion order is expiry order: expired entries are popped from the front, O(1) each.
    """

    def __init__(
        self,
        ttl_s: float = TOMBSTONE_TTL_S,
        max_entries: int = TOMBSTONE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0 or max_entries < 1:
            raise ValueError(f"tombstones need a positive TTL and room for one, got {ttl_s} s, {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._since: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._since)

    def __contains__(self, request_id: object) -> bool:
        self._expire(self._clock())
        return request_id in self._since

    def add(self, request_id: str) -> None:
        now = self._clock()
        self._expire(now)
        self._since.pop(request_id, None)  # a repeated abort restarts its TTL (and its place in the order)
        self._since[request_id] = now
        while len(self._since) > self.max_entries:
            self._since.popitem(last=False)

    def take(self, request_id: str) -> bool:
        """Whether ``request_id`` has a live tombstone; removes it (it guards one add)."""
        self._expire(self._clock())
        return self._since.pop(request_id, None) is not None

    def _expire(self, now: float) -> None:
        while self._since:
            oldest, since = next(iter(self._since.items()))
            if now - since < self.ttl_s:
                return
            del self._since[oldest]


def check_deadline(time_remaining: float | None, request_id: str, instance_id: str) -> None:
    """Raises CallerGaveUpError when the call's deadline (``context.time_remaining()``; None: no deadline) passed."""
    if time_remaining is not None and time_remaining <= 0:
        raise CallerGaveUpError(
            f"request {request_id} not added to {instance_id}: its caller's deadline passed before it could be"
        )


def check_tombstone(tombstones: Tombstones, request_id: str, instance_id: str) -> None:
    """Raises AbortedBeforeArrivalError when an abort of ``request_id`` came first (and takes its tombstone)."""
    if tombstones.take(request_id):
        raise AbortedBeforeArrivalError(f"request {request_id} was aborted before it arrived at {instance_id}")
