"""Argument checks every engine's migration hooks share, so each engine raises the same errors for the same misuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pyllumnix.data_plane.engine.base import BlockBuffer, InvalidRequestError, InvalidStateError, OutOfBlocksError


def check_reservation(n: int, free: int, watermark: int) -> None:
    """A reservation of ``n`` blocks must leave at least ``watermark`` free."""
    if n < 0:
        raise InvalidRequestError(f"cannot reserve {n} blocks")
    if free - n < watermark:
        raise OutOfBlocksError(f"reserve {n}: {free} free, watermark {watermark}")


def check_waiting_admission(request_id: str, demand: int, demand_ahead: int, free: int, watermark: int) -> None:
    """A migrated-in request without KV must be admissible on arrival: its prefill demand, plus that of the waiting
    requests it would queue behind, fits in ``free`` above the watermark (the artifact's destination pre-allocates a
    waiting request's blocks and refuses it behind an earlier waiting head). Raises OutOfBlocksError otherwise."""
    if free - demand_ahead - demand < watermark:
        raise OutOfBlocksError(
            f"{request_id}: a waiting request needs {demand} blocks behind {demand_ahead} queued; {free} free, "
            f"watermark {watermark}"
        )


def check_reserved(block_ids: Sequence[int], is_reserved: Callable[[int], bool]) -> None:
    """Every id reserved, none repeated."""
    not_reserved = [b for b in block_ids if not is_reserved(b)]
    if not_reserved or len(set(block_ids)) != len(block_ids):
        raise InvalidStateError(f"blocks not reserved (or repeated): {not_reserved or list(block_ids)}")


def check_block_data(block_ids: Sequence[int], data: BlockBuffer, block_bytes: int) -> None:
    if data.shape != (len(block_ids), block_bytes) or data.dtype != np.uint8:
        raise InvalidRequestError(
            f"block data {data.dtype}{data.shape} does not match ({len(block_ids)}, {block_bytes}) uint8"
        )
