"""Summarises py-spy ``--format raw`` profiles (folded stacks, e.g. from ``tokpath-s8-profile.py``): for each file,
the share of samples per thread and the top frames by self and by inclusive samples (a frame is function + file, its
line dropped, counted once per stack). Session 10's token-path profile (``tokpath-s10-profile.json``) was made so.

    python docs/bench-peers/tokpath-s10-summarise.py --top 30 prof/llumlet-123.txt prof/frontend-456.txt > summary.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"(.*) \((.*?)(?::\d+)?\)$")
_THREAD_ID = re.compile(r" \(\d+\)")
# Frames every sample of an asyncio CLI process shares (the entry point down to the event loop): left out of the
# inclusive list, which would otherwise start with a dozen 80-100 % rows that say nothing.
_SHARED = ("click/", "runpy", "tools/cli.py", "asyncio/runners.py", "_command (", "run_until_complete", "run_forever")


def _frame(text: str) -> str:
    match = _FRAME.match(text)
    return f"{match.group(1)} ({match.group(2)})" if match else text


def summarise(path: Path, top: int) -> dict[str, Any]:
    """Shares (percent of all samples) per thread, and the ``top`` frames by self and by inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        total += n
        threads[_THREAD_ID.sub("", thread).removeprefix("thread: ").strip()] += n
        names = [_frame(f) for f in frames]
        own[names[-1] if names else "<no Python frame>"] += n
        for name in set(names):
            if not any(s in name for s in _SHARED):
                inclusive[name] += n

    def pct(c: Counter[str], k: int) -> dict[str, float]:
        return {name: round(100 * n / total, 1) for name, n in c.most_common(k)}

    return {
        "samples": total,
        "threads_pct": pct(threads, len(threads)),
        "self_pct": pct(own, top),
        "inclusive_pct": pct(inclusive, top),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps({p.name: summarise(p, args.top) for p in args.profiles}, indent=1))


if __name__ == "__main__":
    main()
