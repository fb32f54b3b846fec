"""Progress bars for long benchmark and simulator runs: rich, on stderr, and only when stderr is a terminal.

stdout carries the JSON report, so a bar there would corrupt ``... | jq``; a bar on a non-terminal stderr (a log file,
a CI capture) would only add noise, so it is off there. ``LLUMNIX_PROGRESS=1`` forces it on, ``=0`` off.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

ENV = "LLUMNIX_PROGRESS"
# The console of the last enabled bar (its live stack says whether that bar is still running).
_drawing: dict[str, Console] = {}


def progress_enabled(console: Console) -> bool:
    """Whether to draw: ``LLUMNIX_PROGRESS`` when set, else whether ``console`` (stderr) is a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return console.is_terminal


def progress_bar(*, transient: bool = True, refresh_per_second: float = 10) -> Progress:
    """A Progress on stderr (use as a context manager; ``add_task(description, total=N)``, ``advance``).

    Disabled (every call a no-op) unless :func:`progress_enabled`; ``transient`` clears the bar when done so the
    result block printed after it stays readable.
    """
    drawing = _drawing.get("stderr")
    if drawing is not None and drawing._live_stack:
        # A bar inside a running one (a replay's requests within a benchmark's runs): the same console, so rich draws
        # both as one display instead of two consoles moving the cursor over each other (sys.stderr is rich's proxy
        # by now, so a new console would write through it anyway).
        console = drawing
        enabled = True
    else:
        console = Console(file=sys.stderr, highlight=False)
        enabled = progress_enabled(console)
        if enabled and not console.is_terminal:
            # forced on (LLUMNIX_PROGRESS=1) over a pipe: draw as on a terminal, or rich would keep the bar to itself
            console = Console(file=sys.stderr, highlight=False, force_terminal=True)
        if enabled:
            _drawing["stderr"] = console
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=transient,
        refresh_per_second=refresh_per_second,
    )


class Steps:
    """A counted task on a progress bar for code that runs in phases (rounds, shapes, cases); without a bar every call
    is a no-op, so library callers pass nothing."""

    def __init__(self, bar: Progress | None = None, description: str = "", total: int = 0) -> None:
        self.bar = bar
        self.description = description
        self.task = bar.add_task(description, total=total) if bar is not None else None

    def step(self, what: str = "", n: int = 1) -> None:
        """``n`` steps done; ``what`` (shown after the description) names the one now running."""
        if self.bar is not None and self.task is not None:
            label = f"{self.description}: {what}" if what else self.description
            self.bar.update(self.task, advance=n, description=label)

    def describe(self, what: str) -> None:
        """Names the step now running without counting one."""
        self.step(what, n=0)

    def extend(self, n: int) -> None:
        """``n`` more steps than announced (e.g. a profiling round decided on the way)."""
        if self.bar is not None and self.task is not None:
            total = self.bar.tasks[self.task].total if self.task in self.bar.task_ids else None
            self.bar.update(self.task, total=(total or 0) + n)
