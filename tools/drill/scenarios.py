"""The drill's fault vocabulary and the parser of ``--scenario`` values (pure: no I/O).

A scenario is one fault with its parameter: ``leader-stall 5`` stops the scheduler leader for 5 s, ``burst 800`` sends
800 streams at once. ``--scenario`` takes one or more, separated by commas (``"leader-kill, llumlet-stall 4"``), the
parameter after a space, ``=`` or ``:``; ``all`` expands to every fault in a fixed order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class ScenarioError(ValueError):
    """A ``--scenario`` value the drill cannot run; the message says what is wrong and what is accepted."""


class AllowedErrors(Enum):
    """Which clear errors a fault may legitimately cause (anything else that ends in an error fails the drill)."""

    NONE = "none"
    # Requests on the killed llumlet, ending with an error that names it.
    KILLED_INSTANCE = "killed-instance"
    # New requests refused before their first token with UNAVAILABLE (HTTP 503) while etcd is stopped.
    UNAVAILABLE_REJECT = "unavailable-reject"
    # Requests refused before their first token with RESOURCE_EXHAUSTED (HTTP 429) by admission control.
    OVERLOAD_REJECT = "overload-reject"
    # Any clear error (a stalled frontend may end streams with an error instead of resuming them).
    ANY_CLEAR = "any-clear"


@dataclass(frozen=True)
class FaultKind:
    name: str
    # What the parameter means ("seconds", "requests") or None when the fault takes none.
    param: str | None
    default: float | None
    # True when the fault signals a process the drill started (impossible in attach mode).
    needs_processes: bool
    # etcd members the fault needs (3 for killing one while the cluster keeps a quorum).
    etcd_members: int
    # The fault replaces the scheduler leader: the drill checks a new one answers within LEADER_DEADLINE_S.
    replaces_leader: bool
    allowed_errors: AllowedErrors
    help: str


# Acceptance bounds the drill checks (issue #12).
LEADER_DEADLINE_S = 3.0
ETCD_RECOVERY_DEADLINE_S = 5.0
# A stalled llumlet must be registered and serving again this long after SIGCONT.
REJOIN_DEADLINE_S = 10.0

FAULTS: dict[str, FaultKind] = {
    f.name: f
    for f in (
        FaultKind(
            "leader-kill", None, None, True, 1, True, AllowedErrors.NONE, "SIGKILL the scheduler leader, restart it"
        ),
        FaultKind(
            "leader-stall",
            "seconds",
            5.0,
            True,
            1,
            True,
            AllowedErrors.NONE,
            "SIGSTOP the scheduler leader for S seconds, then SIGCONT",
        ),
        FaultKind(
            "leader-resign",
            None,
            None,
            False,
            1,
            True,
            AllowedErrors.NONE,
            "ask the leader to resign (AdminService.ResignLeader)",
        ),
        FaultKind(
            "llumlet-kill",
            None,
            None,
            True,
            1,
            False,
            AllowedErrors.KILLED_INSTANCE,
            "SIGKILL the busiest llumlet, restart it once it left the registry",
        ),
        FaultKind(
            "llumlet-stall",
            "seconds",
            5.0,
            True,
            1,
            False,
            AllowedErrors.NONE,
            "SIGSTOP the busiest llumlet for S seconds, then SIGCONT",
        ),
        FaultKind(
            "etcd-pause",
            "seconds",
            10.0,
            True,
            1,
            False,
            AllowedErrors.UNAVAILABLE_REJECT,
            "SIGSTOP every etcd member for S seconds, then SIGCONT",
        ),
        FaultKind(
            "etcd-member-kill",
            None,
            None,
            True,
            3,
            False,
            AllowedErrors.NONE,
            "SIGKILL the raft leader of a 3-member etcd, restart it",
        ),
        FaultKind(
            "frontend-stall",
            "seconds",
            15.0,
            True,
            1,
            False,
            AllowedErrors.ANY_CLEAR,
            "SIGSTOP the frontend for S seconds, then SIGCONT",
        ),
        FaultKind("burst", "requests", 800.0, False, 1, False, AllowedErrors.OVERLOAD_REJECT, "send N streams at once"),
    )
}

# ``all``, in the order they run: cheap control-plane faults first, the heavy burst last.
ALL: tuple[str, ...] = (
    "leader-kill",
    "leader-stall 5",
    "leader-resign",
    "llumlet-kill",
    "llumlet-stall 5",
    "etcd-pause 10",
    "etcd-member-kill",
    "frontend-stall 15",
    "burst 800",
)


@dataclass(frozen=True)
class Scenario:
    fault: str
    # The parameter (seconds or request count); None for faults without one.
    value: float | None = None

    @property
    def kind(self) -> FaultKind:
        return FAULTS[self.fault]

    @property
    def label(self) -> str:
        if self.value is None:
            return self.fault
        shown = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.fault} {shown}"

    @property
    def seconds(self) -> float:
        """The stall/pause length (0 for faults without one)."""
        return float(self.value) if self.value is not None and self.kind.param == "seconds" else 0.0

    @property
    def requests(self) -> int:
        return int(self.value) if self.value is not None and self.kind.param == "requests" else 0


_ITEM = re.compile(r"^\s*([a-z][a-z-]*)\s*(?:[\s=:]\s*(\S+))?\s*$")


def parse_one(text: str) -> list[Scenario]:
    """One item (``name`` or ``name N``); ``all`` gives every fault."""
    match = _ITEM.match(text.lower())
    if match is None:
        raise ScenarioError(f"cannot read scenario {text!r}: expected NAME or NAME VALUE, e.g. 'leader-stall 5'")
    name, raw = match.group(1), match.group(2)
    if name == "all":
        if raw is not None:
            raise ScenarioError("'all' takes no value")
        return [s for item in ALL for s in parse_one(item)]
    kind = FAULTS.get(name)
    if kind is None:
        raise ScenarioError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}, all")
    if kind.param is None:
        if raw is not None:
            raise ScenarioError(f"{name} takes no value (got {raw!r})")
        return [Scenario(name)]
    if raw is None:
        return [Scenario(name, kind.default)]
    try:
        value = float(raw)
    except ValueError:
        raise ScenarioError(f"{name}: {kind.param} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ScenarioError(f"{name}: {kind.param} must be positive, got {raw!r}")
    if kind.param == "requests" and not value.is_integer():
        raise ScenarioError(f"{name}: requests must be a whole number, got {raw!r}")
    return [Scenario(name, value)]


def parse_scenarios(values: Iterable[str]) -> list[Scenario]:
    """Every ``--scenario`` value, each possibly a comma-separated list, in order."""
    scenarios: list[Scenario] = []
    for value in values:
        items = [item for item in value.split(",") if item.strip()]
        if not items:
            raise ScenarioError(f"empty scenario {value!r}")
        for item in items:
            scenarios.extend(parse_one(item))
    if not scenarios:
        raise ScenarioError("no scenario given")
    return scenarios


def check_attach_mode(scenarios: Iterable[Scenario]) -> None:
    """Attached to a cluster it did not start, the drill can only run faults that signal no process."""
    refused = sorted({s.fault for s in scenarios if s.kind.needs_processes})
    if refused:
        possible = ", ".join(n for n, k in FAULTS.items() if not k.needs_processes)
        raise ScenarioError(
            f"{', '.join(refused)} signal processes the drill started and cannot run against an attached cluster"
            f" (--frontend/--scheduler); possible there: {possible}"
        )


def etcd_members_needed(scenarios: Iterable[Scenario]) -> int:
    return max((s.kind.etcd_members for s in scenarios), default=1)
