"""The multi-stage pre-copy plan, pure: which blocks each stage copies and when to stop-and-copy or give up.

Stage 0 copies every block but the last (the one being written) while the request keeps decoding; each later stage
copies the blocks completed meanwhile. Once the blocks not yet copied are at most ``last_stage_max_blocks``, the last
stage suspends the request between two steps and copies the rest, including the partly filled last block. More than
``max_stages`` non-final stages without converging aborts the migration. Used by the live llumlet and by the
simulator, so both take the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LAST_STAGE_MAX_BLOCKS = 4
DEFAULT_MAX_STAGES = 3


@dataclass(frozen=True)
class MigrationLimits:
    last_stage_max_blocks: int = DEFAULT_LAST_STAGE_MAX_BLOCKS
    max_stages: int = DEFAULT_MAX_STAGES

    def __post_init__(self) -> None:
        if self.last_stage_max_blocks < 1:
            raise ValueError("last_stage_max_blocks must be >= 1")
        if self.max_stages < 0:
            raise ValueError("max_stages must be >= 0")


@dataclass(frozen=True)
class Stage:
    """Copy logical blocks [first, first + count) of the request; ``last`` means suspend before copying."""

    index: int
    first: int
    count: int
    last: bool


@dataclass(frozen=True)
class GiveUp:
    reason: str


def next_stage(limits: MigrationLimits, stage_index: int, copied: int, total_blocks: int) -> Stage | GiveUp:
    """The next stage, given how many leading blocks are already copied and how many the request holds now."""
    if copied > total_blocks:
        return GiveUp(f"request shrank below the copied prefix ({total_blocks} < {copied} blocks): preempted?")
    remaining = total_blocks - copied
    if remaining <= limits.last_stage_max_blocks:
        return Stage(stage_index, copied, remaining, last=True)
    if stage_index >= limits.max_stages:
        return GiveUp(f"no convergence after {stage_index} stages ({remaining} blocks still to copy)")
    # All but the block being written: it changes until the request stops.
    return Stage(stage_index, copied, remaining - 1, last=False)
