"""The simulator's plots draw what the run held (checked on the figure's data, not its pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyllumnix.tools.sim import plots


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[float, float]]]:
    """The (x, y) points of every line of the last saved figure."""
    lines: list[list[tuple[float, float]]] = []
    save = plots._save

    def spy(fig: Any, path: Path) -> Path:
        lines[:] = [list(zip(ln.get_xdata(), ln.get_ydata(), strict=True)) for ax in fig.axes for ln in ax.lines]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return lines


def test_a_run_that_never_scaled_is_a_line_to_its_end(tmp_path: Path, drawn: list[list[tuple[float, float]]]) -> None:
    plots.instances_over_time({"llumnix": [(0.0, 16)]}, tmp_path / "a.png", end_s=613.0)
    assert drawn == [[(0.0, 16), (613.0, 16)]]
    assert (tmp_path / "a.png").stat().st_size > 0


def test_the_end_closes_a_scaled_series(tmp_path: Path, drawn: list[list[tuple[float, float]]]) -> None:
    series = [(0.0, 8), (100.0, 7), (150.0, 9)]
    plots.instances_over_time({"a": series}, tmp_path / "b.png", end_s=300.0)
    assert drawn == [[*series, (300.0, 9)]]
    plots.instances_over_time({"a": series}, tmp_path / "c.png", end_s=150.0)  # ends on its last change: nothing added
    assert drawn == [series]
    plots.instances_over_time({"a": series}, tmp_path / "d.png")  # no end given: the changes as they are
    assert drawn == [series]
