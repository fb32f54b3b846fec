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


def progress_enabled(console: Console) -> bool:
    """Whether to draw: ``LLUMNIX_PROGRESS`` when set, else whether ``console`` (stderr) is a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return console.is_terminal


def progress_bar(*, transient: bool = True) -> Progress:
    """A Progress on stderr (use as a context manager; ``add_task(description, total=N)``, ``advance``).

    Disabled (every call a no-op) unless :func:`progress_enabled`; ``transient`` clears the bar when done so the
    result block printed after it stays readable.
    """
    console = Console(file=sys.stderr, highlight=False)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not progress_enabled(console),
        transient=transient,
    )
