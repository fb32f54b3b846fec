"""The vocabulary of the migration state machines (``source.py``, ``destination.py``): the events a driver feeds in
and the actions it must perform, as plain data.

The machines decide; the drivers (the live coordinator over gRPC and a transport, the simulator on a virtual clock)
only perform actions and report what happened, so both run one protocol. Actions are performed in list order; every
action that has a result (observe, suspend, reserve, copy, flush, commit) is answered by exactly one event before the
machine asks for anything else, so a machine never has two such actions outstanding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pyllumnix.data_plane.engine.base import Phase
from pyllumnix.data_plane.llumlet.migration.plan import Stage
from pyllumnix.infra.vocabulary import MigrationOutcome

# How a migration ended: the one vocabulary's ``MigrationOutcome`` (``llumnix.v1.MigrationOutcome``'s ints, mapped in
# ``infra/wire.py``); RUNNING, the machines' name for a migration not ended yet, is its UNSPECIFIED.
Outcome = MigrationOutcome


# ---------------------------------------------------------------- source events
@dataclass(frozen=True)
class Start:
    """Begin: the machine takes an outgoing slot and asks for a first observation."""


@dataclass(frozen=True)
class Observed:
    """The request on the source between two steps: ``phase`` None when the engine no longer knows it."""

    phase: Phase | None
    blocks: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class Suspended:
    """The request is out of scheduling; ``blocks`` it holds now (it may have grown since the last observation)."""

    blocks: int


@dataclass(frozen=True)
class SourceFailed:
    """The source gives up under an outstanding action: it lost the request (suspend refused, blocks freed during a
    copy), the frontend refused the hand-over, the source shuts down, or its driver failed; accepted at any time."""

    reason: str


@dataclass(frozen=True)
class Reserved:
    """The destination reserved ``count`` blocks for ``stage``."""

    stage: int
    count: int


@dataclass(frozen=True)
class Refused:
    """The destination refused the reservation (no blocks, no slot, not accepting, unreachable, timed out)."""

    reason: str


@dataclass(frozen=True)
class Copied:
    """The stage's blocks arrived and the destination acknowledged them."""

    stage: int


@dataclass(frozen=True)
class CopyFailed:
    """The data plane or the destination failed the stage (transport error, mismatch, timeout)."""

    reason: str


@dataclass(frozen=True)
class Flushed:
    """Every output the source produced reached the frontend (before the destination's first one can)."""


@dataclass(frozen=True)
class ClientAborted:
    """The client aborted the request while the source held it suspended; may arrive at any time, also after the end."""


@dataclass(frozen=True)
class Committed:
    """The destination installed the request (``note``: how that is known when its answer was lost; the outcome's
    reason)."""

    note: str = ""


@dataclass(frozen=True)
class CommitFailed:
    reason: str


SourceEvent = (
    Start
    | Observed
    | Suspended
    | SourceFailed
    | Reserved
    | Refused
    | Copied
    | CopyFailed
    | Flushed
    | ClientAborted
    | Committed
    | CommitFailed
)


# ---------------------------------------------------------------- source actions
@dataclass(frozen=True)
class Observe:
    """Read phase, block count and preemption count of the request (under the engine lock); answer ``Observed``."""


@dataclass(frozen=True)
class Suspend:
    """Take the request out of scheduling; answer ``Suspended`` or ``SourceFailed``."""


@dataclass(frozen=True)
class Reserve:
    """Ask the destination to reserve the stage's blocks (stage 0 carries the request); answer ``Reserved`` or
    ``Refused``."""

    stage: Stage


@dataclass(frozen=True)
class Copy:
    """Send the stage's blocks (logical ``[first, first + count)``); answer ``Copied``, ``CopyFailed`` or
    ``SourceFailed``."""

    stage: Stage


@dataclass(frozen=True)
class Flush:
    """Push the source's outputs to the frontend; answer ``Flushed``."""


@dataclass(frozen=True)
class Commit:
    """Ask the destination to install the request with every reserved block; answer ``Committed`` or
    ``CommitFailed``."""


@dataclass(frozen=True)
class TellAbort:
    """Tell the destination the migration is off: it frees what it reserved. No answer."""

    reason: str


@dataclass(frozen=True)
class Resume:
    """Put the suspended request back into the source's running queue (if it is still suspended). No answer."""


@dataclass(frozen=True)
class Release:
    """Free the suspended request and its blocks on the source: it lives on the destination now. No answer."""


@dataclass(frozen=True)
class AbortHere:
    """Abort the request on the source (the client's abort, deferred while it was suspended). No answer."""


@dataclass(frozen=True)
class ForwardAbort:
    """Abort the request on the destination (the client aborted while the commit was in flight). No answer."""


@dataclass(frozen=True)
class Done:
    """The migration ended; no action follows except a late client abort's."""

    outcome: Outcome
    reason: str = ""


SourceAction = (
    Observe | Suspend | Reserve | Copy | Flush | Commit | TellAbort | Resume | Release | AbortHere | ForwardAbort | Done
)


# ---------------------------------------------------------------- destination events
@dataclass(frozen=True)
class Offered:
    """The source asks to reserve ``num_blocks`` for ``stage``. For a first stage the driver also says whether the
    instance takes requests, what is wrong with the request it carries (``invalid``: none when it is fine), and how
    the source's KV layout differs from this engine's (``layout_mismatch``: empty when the blocks are
    byte-compatible; refused before anything else, since no other answer could make the migration safe)."""

    stage: int
    num_blocks: int
    accepting: bool = True
    invalid: Refuse | None = None
    layout_mismatch: str = ""


@dataclass(frozen=True)
class BlocksReserved:
    """The engine reserved the stage's blocks."""

    stage: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReserveFailed:
    reason: str


@dataclass(frozen=True)
class StageLanded:
    """The source says the stage is sent: ``error`` empty when the bytes arrived and match what it says it sent,
    ``timed_out`` when they did not arrive in time."""

    stage: int
    block_ids: tuple[int, ...]
    error: str = ""
    timed_out: bool = False


@dataclass(frozen=True)
class CommitAsked:
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Installed:
    """The engine installed the request."""


@dataclass(frozen=True)
class InstallFailed:
    reason: str


@dataclass(frozen=True)
class AbortAsked:
    reason: str


@dataclass(frozen=True)
class SourceSilent:
    """No call of the source touched this migration for the pending timeout: the source is presumed dead."""

    reason: str


DestinationEvent = (
    Offered
    | BlocksReserved
    | ReserveFailed
    | StageLanded
    | CommitAsked
    | Installed
    | InstallFailed
    | AbortAsked
    | SourceSilent
)


# ---------------------------------------------------------------- destination actions
class Refusal(enum.Enum):
    """Why the destination answers a call with an error (the live driver maps these to gRPC status codes)."""

    INVALID = "invalid"  # a malformed call or a request the destination cannot hold
    DUPLICATE = "duplicate"  # the request is already here
    UNKNOWN = "unknown"  # no such migration (never started, timed out or freed)
    NOT_ACCEPTING = "not_accepting"
    NO_SLOT = "no_slot"
    NO_BLOCKS = "no_blocks"
    DATA_LOST = "data_lost"
    TIMED_OUT = "timed_out"
    NOT_READY = "not_ready"  # commit before every stage landed, or the install failed
    INCOMPATIBLE = "incompatible"  # the two engines' KV layouts differ: their blocks cannot migrate


@dataclass(frozen=True)
class ReserveBlocks:
    """Reserve ``count`` engine blocks for ``stage``; answer ``BlocksReserved`` or ``ReserveFailed``."""

    stage: int
    count: int


@dataclass(frozen=True)
class Receive:
    """Start receiving the stage's bytes into its reserved blocks (the answer comes with ``StageLanded``)."""

    stage: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Accept:
    """Answer the source's call successfully (for a reservation: with its block ids)."""

    block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Refuse:
    """Answer the source's call with an error."""

    kind: Refusal
    reason: str


@dataclass(frozen=True)
class Install:
    """Install the request with its reserved blocks; answer ``Installed`` or ``InstallFailed``."""

    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Free:
    """Stop every receive and return the reserved blocks to the free pool."""

    block_ids: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Closed:
    """The migration is over on this side (installed or freed); its slot is free again."""

    installed: bool
    reason: str = ""


DestinationAction = ReserveBlocks | Receive | Accept | Refuse | Install | Free | Closed


# ---------------------------------------------------------------- concurrency
@dataclass
class Slots:
    """Migrations one instance runs at once in one direction (``max_out`` or ``max_in``): the machines take a slot
    when they start and give it back when they end, so each limit is enforced in one place."""

    limit: int
    held: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("a migration slot limit must be >= 1")

    @property
    def full(self) -> bool:
        return len(self.held) >= self.limit

    def take(self, key: str) -> bool:
        if key in self.held:
            return True
        if self.full:
            return False
        self.held.add(key)
        return True

    def give(self, key: str) -> None:
        self.held.discard(key)
