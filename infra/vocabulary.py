"""The one vocabulary every layer speaks: request phase, finish reason, instance state, priority and migration outcome.

Pure (no proto import, no I/O) so that the policy core, the engines, the llumlet, the frontend and the clients can all
use it without depending on one another. Every enum here carries the same ints as its ``llumnix.v1`` proto enum, so a
value crosses the wire by ``int()`` and comes back by the enum's ``of`` (unknown ints become UNSPECIFIED instead of
raising); the proto mapping module and ``tests/test_enum_vocabulary.py`` check that the two stay equal.
"""

from __future__ import annotations

import enum
from typing import Self


class _WireEnum(enum.IntEnum):
    """An enum mirrored from a proto enum: ``of`` reads a wire int leniently (a newer peer may send a member this
    version does not know; it reads as UNSPECIFIED rather than failing the whole message)."""

    @classmethod
    def of(cls, value: int) -> Self:
        try:
            return cls(value)
        except ValueError:
            return cls(0)


class InstanceState(_WireEnum):
    """Mirrors ``llumnix.v1.InstanceState``."""

    UNSPECIFIED = 0
    ACTIVE = 1
    CORDONED = 2
    DRAINING = 3
    STARTING = 4


class Priority(_WireEnum):
    """Mirrors ``llumnix.v1.Priority``; UNSPECIFIED is treated as NORMAL (see ``normalize_priority``)."""

    UNSPECIFIED = 0
    NORMAL = 1
    HIGH = 2


class RequestPhase(_WireEnum):
    """Mirrors ``llumnix.v1.RequestPhase``. The engines call MIGRATING "suspended" (a request taken out of the batch
    for its last migration stage), hence the SUSPENDED alias: the same member, the same int."""

    UNSPECIFIED = 0
    WAITING = 1
    RUNNING = 2
    MIGRATING = 3
    FINISHED = 4
    SUSPENDED = 3  # alias of MIGRATING

    @property
    def label(self) -> str:
        """The engines' lowercase name: "waiting", "running", "suspended", "finished" ("unspecified")."""
        return "suspended" if self is RequestPhase.MIGRATING else self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> RequestPhase:
        """The inverse of ``label`` (also accepts "migrating"); an unknown label is a ValueError."""
        member = cls.__members__.get(label.upper())
        if member is None:
            raise ValueError(f"unknown request phase {label!r}")
        return member


class FinishReason(_WireEnum):
    """Mirrors ``llumnix.v1.FinishReason``. ``label`` is the OpenAI-style name ("stop", "length", "abort", "error")."""

    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4

    @property
    def label(self) -> str | None:
        """The lowercase name a client sees; None for UNSPECIFIED (not finished, or finished for no stated reason)."""
        return None if self is FinishReason.UNSPECIFIED else self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> FinishReason:
        """The inverse of ``label``; an unknown label is a ValueError."""
        member = cls.__members__.get(label.upper())
        if member is None or member is FinishReason.UNSPECIFIED:
            raise ValueError(f"unknown finish reason {label!r}")
        return member


class MigrationOutcome(_WireEnum):
    """Mirrors ``llumnix.v1.MigrationOutcome``: how a migration ended. The migration machines
    (``data_plane/llumlet/migration``) call a migration that has not ended RUNNING: the alias of UNSPECIFIED, which is
    what a result not filled in yet carries on the wire."""

    UNSPECIFIED = 0
    COMMITTED = 1
    ABORTED_BY_SOURCE = 2
    ABORTED_BY_DESTINATION = 3
    RUNNING = 0  # alias of UNSPECIFIED

    @property
    def label(self) -> str:
        """The lowercase name metrics, transcripts and the simulator's summary use: "committed", "aborted_by_source",
        "aborted_by_destination"; "running" for a migration that has not ended."""
        return "running" if self is MigrationOutcome.UNSPECIFIED else self.name.lower()

    @property
    def counted_as(self) -> MigrationOutcome:
        """The outcome a finished migration's result is counted under: one without an outcome this version knows
        (UNSPECIFIED, or a newer peer's value read leniently) counts as the source giving up, since the request
        stayed where it was."""
        return MigrationOutcome.ABORTED_BY_SOURCE if self is MigrationOutcome.UNSPECIFIED else self


# The outcomes of a migration that has ended, in the proto's order (metric families list each from the start).
ENDED_OUTCOMES: tuple[MigrationOutcome, ...] = tuple(o for o in MigrationOutcome if o is not MigrationOutcome.RUNNING)


def normalize_priority(value: int) -> Priority:
    """The one reading of a priority int, wherever it comes from (wire, engine, trace): UNSPECIFIED and anything
    unknown below HIGH is NORMAL; anything at or above HIGH is HIGH. Never raises: a request is never refused for a
    priority it was already admitted with. Validating user input is ``parse_priority``'s job."""
    return Priority.HIGH if value >= Priority.HIGH else Priority.NORMAL


def parse_priority(value: int | str) -> Priority:
    """Strict parsing of a priority a user gave: "normal"/"high"/"unspecified" (any case, with or without the
    ``PRIORITY_`` prefix) or one of the enum's ints. Anything else is a ValueError naming the accepted values, which
    the caller turns into its own error (gRPC INVALID_ARGUMENT, HTTP 400, CLI exit 2). The result is as given
    (UNSPECIFIED stays UNSPECIFIED, as on the wire); ``normalize_priority`` reads it for scheduling."""
    if isinstance(value, bool):
        raise ValueError(f"bad priority {value!r}: expected one of {_PRIORITY_CHOICES}")
    if isinstance(value, int):
        if value not in Priority._value2member_map_:
            raise ValueError(f"bad priority {value!r}: expected one of {_PRIORITY_CHOICES}")
        return Priority(value)
    if isinstance(value, str):
        member = Priority.__members__.get(value.strip().upper().removeprefix("PRIORITY_"))
        if member is not None:
            return member
    raise ValueError(f"bad priority {value!r}: expected one of {_PRIORITY_CHOICES}")


_PRIORITY_CHOICES = ", ".join(m.name.lower() for m in Priority) + " or " + ", ".join(str(int(m)) for m in Priority)

__all__ = [
    "ENDED_OUTCOMES",
    "FinishReason",
    "InstanceState",
    "MigrationOutcome",
    "Priority",
    "RequestPhase",
    "normalize_priority",
    "parse_priority",
]
