"""Transcript tests of the migration state machines: every protocol path as events in, actions out
(``tests/migration_transcripts/*.txt``, format in ``tests/migration_transcript.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyllumnix.data_plane.llumlet.migration.events import Observe, Observed, Outcome, Slots, Start
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.data_plane.llumlet.migration.source import ProtocolError, SourceMigration
from tests.migration_transcript import parse, run

TRANSCRIPTS = sorted((Path(__file__).parent / "migration_transcripts").glob("*.txt"))


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path: Path) -> None:
    expected, got = run(path)
    assert got == expected


def test_transcripts_cover_every_path() -> None:
    """Each source ending and destination refusal appears in some transcript (a deleted case fails here)."""
    text = "\n".join(p.read_text() for p in TRANSCRIPTS)
    for needle in (
        "done outcome=committed",
        "done outcome=aborted_by_source",
        "done outcome=aborted_by_destination",
        "forward_abort",
        "abort_here",
        "closed installed=true",
        *(f"refuse kind={k}" for k in ("unknown", "not_accepting", "no_slot", "no_blocks", "data_lost", "timed_out")),
        "refuse kind=not_ready",
        "refuse kind=duplicate",
        "refuse kind=incompatible",
    ):
        assert needle in text, needle
    assert sum(1 for p in TRANSCRIPTS for _ in parse(p)) >= 40


def test_an_event_the_machine_cannot_wait_for_is_a_driver_bug() -> None:
    machine = SourceMigration("m", "r", MigrationLimits(), Slots(1))
    with pytest.raises(ProtocolError):
        machine.step(Observed(None))
    machine.step(Start())
    with pytest.raises(ProtocolError):
        machine.step(Start())


def test_the_outgoing_slot_is_held_until_the_end() -> None:
    slots = Slots(1)
    first = SourceMigration("m1", "r1", MigrationLimits(), slots)
    first.step(Start())
    second = SourceMigration("m2", "r2", MigrationLimits(), slots)
    assert second.step(Start())[-1].outcome is Outcome.ABORTED_BY_SOURCE  # type: ignore[union-attr]
    first.step(Observed(None))
    assert first.done and not slots.held
    third = SourceMigration("m3", "r3", MigrationLimits(), slots)
    assert third.step(Start()) == [Observe()]
