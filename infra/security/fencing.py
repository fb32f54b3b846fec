"""Leader-term fencing: every order a scheduler leader sends carries its term; receivers refuse older terms.

The term is the etcd revision at which the leader won the election (``create_revision`` of its election key), which
only grows across successive leaders. A deposed leader that has not noticed yet (a GC pause, a partition) still
sends orders with its old term; a llumlet that has already seen a newer term refuses them (FAILED_PRECONDITION), so
two leaders never act on the same instance at once. The check is pure; :class:`TermFence` keeps the highest term.
"""

from __future__ import annotations

from collections.abc import Iterable

TERM_METADATA_KEY = "llumnix-term"


class StaleTermError(Exception):
    """An order from a leader older than one already seen (or one that carries no term)."""


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
    """The highest leader term one receiver has seen; :meth:`admit` is :func:`check_term` plus remembering."""

    def __init__(self, highest_seen: int = 0) -> None:
        self.highest_seen = highest_seen

    def admit(self, term: int | None) -> int:
        self.highest_seen = check_term(term, self.highest_seen)
        return self.highest_seen
