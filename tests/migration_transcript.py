"""A tiny transcript format for the migration state machines (after etcd-io/raft's datadriven tests): events in,
the actions the machine answers with out, one per line, so a whole protocol path reads top to bottom.

    # comment
    source mid=m1 rid=r last_stage_max_blocks=4 max_stages=3 max_out=1 busy=
    > start
    observe
    > observed phase=running blocks=10 preemptions=0
    observe

    destination mid=m1 max_in=1 busy=other
    > offered stage=0 num_blocks=3
    reserve_blocks stage=0 count=3

A ``source``/``destination`` line starts a new machine (``busy`` lists slot keys already held by other
migrations). ``> event key=value ...`` feeds one event; the lines up to the next ``>`` or machine line are the
actions expected, formatted by ``format_action``. ``reason=`` (and ``error=``) take the rest of the line. Values:
integers, ``true``/``false``, phase names, comma-separated block ids (``block_ids=`` for none).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyllumnix.data_plane.engine.base import Phase
from pyllumnix.data_plane.llumlet.migration import events as ev
from pyllumnix.data_plane.llumlet.migration.destination import DestinationMigration
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits, Stage
from pyllumnix.data_plane.llumlet.migration.source import SourceMigration

_REST_KEYS = ("reason", "error", "layout_mismatch")
_SOURCE_EVENTS: dict[str, type] = {
    "start": ev.Start,
    "observed": ev.Observed,
    "suspended": ev.Suspended,
    "source_failed": ev.SourceFailed,
    "reserved": ev.Reserved,
    "refused": ev.Refused,
    "copied": ev.Copied,
    "copy_failed": ev.CopyFailed,
    "flushed": ev.Flushed,
    "client_aborted": ev.ClientAborted,
    "committed": ev.Committed,
    "commit_failed": ev.CommitFailed,
}
_DESTINATION_EVENTS: dict[str, type] = {
    "offered": ev.Offered,
    "blocks_reserved": ev.BlocksReserved,
    "reserve_failed": ev.ReserveFailed,
    "stage_landed": ev.StageLanded,
    "commit_asked": ev.CommitAsked,
    "installed": ev.Installed,
    "install_failed": ev.InstallFailed,
    "abort_asked": ev.AbortAsked,
    "source_silent": ev.SourceSilent,
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ev.Outcome):
        return value.label
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def format_action(action: Any) -> str:
    """``reserve stage=1 first=9 count=2 last=true``: the action's fields in order, a ``Stage`` flattened."""
    parts = [snake(type(action).__name__)]
    rest = ""
    for f in dataclasses.fields(action):
        value = getattr(action, f.name)
        if isinstance(value, Stage):
            parts.append(
                f"stage={value.index} first={value.first} count={value.count} last={_format_value(value.last)}"
            )
        elif f.name in _REST_KEYS:
            rest = f"{f.name}={value}"
        else:
            parts.append(f"{f.name}={_format_value(value)}")
    return " ".join([*parts, rest] if rest else parts)


def _parse_value(key: str, text: str) -> Any:
    if key == "phase":
        return None if text == "none" else Phase.from_label(text)
    if key == "block_ids":
        return tuple(int(v) for v in text.split(",") if v)
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def parse_args(text: str) -> dict[str, Any]:
    """``a=1 b=x reason=the rest`` -> {"a": 1, "b": "x", "reason": "the rest"}."""
    args: dict[str, Any] = {}
    while text:
        key, _, text = text.partition("=")
        key = key.strip()
        if key in _REST_KEYS:
            args[key] = text
            break
        value, _, text = text.partition(" ")
        args[key] = _parse_value(key, value)
        text = text.strip()
    return args


def parse_event(line: str, kinds: dict[str, type]) -> Any:
    name, _, rest = line.strip().partition(" ")
    if name not in kinds:
        raise ValueError(f"unknown event {name!r}")
    args = parse_args(rest.strip())
    if "invalid" in args:  # offered ... invalid=duplicate reason=...: the admission refusal
        args["invalid"] = ev.Refuse(ev.Refusal(args.pop("invalid")), args.pop("reason", ""))
    return kinds[name](**args)


@dataclass
class Case:
    """One machine and the lines fed to it."""

    header: str
    line_no: int
    steps: list[tuple[int, str, list[str]]] = field(default_factory=list)

    def machine(self) -> tuple[SourceMigration | DestinationMigration, dict[str, type]]:
        kind, _, rest = self.header.partition(" ")
        args = parse_args(rest)
        busy = [k for k in str(args.get("busy", "")).split(",") if k]
        if kind == "source":
            slots = ev.Slots(int(args.get("max_out", 1)), set(busy))
            limits = MigrationLimits(int(args.get("last_stage_max_blocks", 4)), int(args.get("max_stages", 3)))
            return SourceMigration(str(args["mid"]), str(args["rid"]), limits, slots), _SOURCE_EVENTS
        if kind == "destination":
            slots = ev.Slots(int(args.get("max_in", 1)), set(busy))
            return DestinationMigration(str(args["mid"]), slots, str(args.get("instance", "this instance"))), (
                _DESTINATION_EVENTS
            )
        raise ValueError(f"unknown machine {kind!r}")


def parse(path: Path) -> Iterator[Case]:
    case: Case | None = None
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith(("source ", "destination ")):
            if case is not None:
                yield case
            case = Case(line, no)
        elif line.startswith(">"):
            if case is None:
                raise ValueError(f"{path}:{no}: event before a machine line")
            case.steps.append((no, line[1:].strip(), []))
        else:
            if case is None or not case.steps:
                raise ValueError(f"{path}:{no}: action before any event")
            case.steps[-1][2].append(line.strip())
    if case is not None:
        yield case


def run(path: Path) -> tuple[list[str], list[str]]:
    """Feeds every case; returns (expected, got) as whole transcripts so a failure shows the first divergence."""
    expected: list[str] = []
    got: list[str] = []
    for case in parse(path):
        machine, kinds = case.machine()
        expected.append(case.header)
        got.append(case.header)
        for _no, event_line, actions in case.steps:
            expected += [f"> {event_line}", *actions]
            out = machine.step(parse_event(event_line, kinds))
            got += [f"> {event_line}", *(format_action(a) for a in out)]
    return expected, got


def rewrite(path: Path) -> None:
    """Writes the machine's actual actions into the transcript (comments and blank lines kept); for drafting a new
    path, whose output must then be read and judged line by line."""
    lines = path.read_text().splitlines()
    out: list[str] = []
    machine: Any = None
    kinds: dict[str, type] = {}
    for raw in lines:
        line = raw.rstrip()
        if line.startswith(("source ", "destination ")):
            machine, kinds = Case(line, 0).machine()
            out.append(line)
        elif line.startswith(">"):
            out.append(line)
            out += [format_action(a) for a in machine.step(parse_event(line[1:], kinds))]
        elif not line.strip() or line.lstrip().startswith("#"):
            out.append(line)
    path.write_text("\n".join(out) + "\n")
