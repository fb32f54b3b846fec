"""Leader-term fencing: every order a scheduler leader sends carries its term; receivers refuse older terms.

The term is the etcd revision at which the leader won the election (``create_revision`` of its election key), which
only grows across successive leaders. A deposed leader that has not noticed yet (a GC pause, a partition) still
sends orders with its old term; a llumlet that has already seen a newer term refuses them (FAILED_PRECONDITION), so
two leaders never act on the same instance at once. The check is pure; :class:`TermFence` keeps the highest term.

A term is a number the caller writes, so a receiver that can read etcd raises its fence only to a term etcd proves
(``TermFence(leader_of=...)``, attack 9 B3): the current leader's election key must have that create_revision and
name the caller (its certificate id) as its replica. Otherwise any scheduler certificate (a follower's) could send
one order with a made-up huge term and lock the real leader out for good. Each new term costs one etcd read (the
proven term and its replica are kept); while etcd cannot answer, a new term is refused (UNAVAILABLE, the leader
retries) and the terms already proven keep working. Proof reads run one at a time, and the orders that arrive during
one share the next (review9): a new leader's first orders, or a stream of made-up terms, cost at most one read in
flight per receiver, not one each; the shared read starts after every order it answers arrived, so it sees any
election key written before they were sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from pyllumnix.infra.etcd.errors import EtcdError

TERM_METADATA_KEY = "llumnix-term"


class StaleTermError(Exception):
    """An order from a leader older than one already seen (or one that carries no term)."""


class UnprovenTermError(Exception):
    """A term etcd does not name as the current leader's, or the caller is not the replica that leads in it."""


class TermUnverifiableError(Exception):
    """A term not proven yet, and etcd cannot be read to prove it now (the order may be retried)."""


LeaderOf = Callable[[], Awaitable[tuple[int, str] | None]]
"""The current leader as etcd names it: (its term, its replica id), None while there is none; raises ``EtcdError``
when etcd cannot answer (see ``data_plane.llumlet.service.election_leader``)."""


def check_term(term: int | None, highest_seen: int) -> int:
    """The new highest term after admitting an order of ``term``; StaleTermError if it must be refused.

    Equal terms pass (the same leader); a missing or non-positive term is refused, since a receiver that accepted
    unfenced orders would be unfenced.
    """
    if term is None or term <= 0:
        raise StaleTermError("the order carries no leader term (llumnix-term metadata); refused")
    if term < highest_seen:
        raise StaleTermError(f"order from a stale leader: term {term} < {highest_seen}, the newest leader term seen")
    return max(term, highest_seen)


def term_metadata(term: int) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``term`` (pass as ``metadata=`` on the order's RPC)."""
    if term <= 0:
        raise ValueError("a leader term is a positive etcd revision")
    return ((TERM_METADATA_KEY, str(term)),)


def term_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The term in call metadata (``context.invocation_metadata()``), None if absent or not a number."""
    for key, value in metadata or ():
        if key == TERM_METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                return int(text)
            except ValueError:
                return None
    return None


class TermFence:
    """The highest leader term one receiver has seen; :meth:`admit` is :func:`check_term` plus remembering.

    ``leader_of``: where :meth:`admit_proven` proves a new term (None: terms are taken as written, for a receiver
    without etcd)."""

    def __init__(self, highest_seen: int = 0, leader_of: LeaderOf | None = None) -> None:
        self.highest_seen = highest_seen
        self.leader_of = leader_of
        self._proven: dict[int, str] = {}  # term -> the replica etcd named as its leader
        self.reads = 0  # etcd reads made to prove terms (started)
        self._reading = asyncio.Lock()  # one proof read at a time (FIFO: waiters share the next one)
        self._read_done = 0  # the number of the last read that finished (answer or EtcdError)
        self._last_read: tuple[int, str] | EtcdError | None = None  # what that read gave

    def admit(self, term: int | None) -> int:
        self.highest_seen = check_term(term, self.highest_seen)
        return self.highest_seen

    async def admit_proven(self, term: int | None, caller_id: str | None) -> int:
        """:meth:`admit`, raising the fence only to a term etcd proves is ``caller_id``'s (None: a plaintext caller,
        only the term is proven). Stale or missing terms are refused before any read (StaleTermError)."""
        check_term(term, self.highest_seen)
        assert term is not None  # check_term refuses a missing one
        if self.leader_of is None:
            return self.admit(term)
        holder = self._proven.get(term)
        if holder is None:
            leader = await self._read_leader(self.leader_of, term)
            if isinstance(leader, EtcdError):
                raise TermUnverifiableError(f"leader term {term} cannot be checked now: {leader}") from leader
            if leader is None or leader[0] != term:
                named = f"term {leader[0]} of {leader[1] or '?'}" if leader is not None else "no leader"
                raise UnprovenTermError(f"leader term {term} is not the current leader's (etcd names {named})")
            holder = leader[1]
            # Terms below the fence are refused anyway: keep only the ones that can still be admitted.
            self._proven = {t: r for t, r in self._proven.items() if t >= self.highest_seen}
            self._proven[term] = holder
        if caller_id is not None and holder != caller_id:
            raise UnprovenTermError(f"leader term {term} is {holder}'s, not {caller_id}'s")
        return self.admit(term)

    async def _read_leader(self, leader_of: LeaderOf, term: int) -> tuple[int, str] | EtcdError | None:
        """The current leader from a read that started after this call did: the one a waiter ahead of it in the
        queue made, or its own (a read already in flight at arrival may predate the caller's election key); or
        ``term`` with its replica when a read made meanwhile proved it."""
        wanted = self.reads + 1  # the first read that starts from now on
        async with self._reading:
            if term in self._proven:
                return term, self._proven[term]
            if self._read_done >= wanted:
                return self._last_read
            self.reads += 1
            number = self.reads
            try:
                self._last_read = await leader_of()
            except EtcdError as exc:
                self._last_read = exc
            self._read_done = number
            return self._last_read
