"""The paged KV block pool: free list, reservations for incoming migrations, and a hook to drop payload on free."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable


class BlockPool:
    """Physical block ids 0..total-1. Allocation takes from the front of a FIFO free list and frees append to its back
    (as vLLM's free queue does), so block ids are deterministic for a given call sequence."""

    def __init__(self, total: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        self.total = total
        self._free: deque[int] = deque(range(total))
        self._reserved: set[int] = set()
        # Blocks out of the free list (owned or reserved); a set so other threads can test membership safely.
        self._in_use: set[int] = set()
        self._on_free = on_free

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def is_in_use(self, block_id: int) -> bool:
        return block_id in self._in_use

    def is_reserved(self, block_id: int) -> bool:
        return block_id in self._reserved

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with {len(self._free)} free: the scheduler must check first")
        ids = [self._free.popleft() for _ in range(n)]
        self._in_use.update(ids)
        return ids

    def free(self, block_ids: Iterable[int]) -> None:
        ids = list(block_ids)
        self._in_use.difference_update(ids)
        if self._on_free is not None and ids:
            self._on_free(ids)
        self._free.extend(ids)

    def reserve(self, n: int) -> list[int]:
        ids = self.allocate(n)
        self._reserved.update(ids)
        return ids

    def unreserve(self, block_ids: Iterable[int]) -> None:
        """Returns reserved blocks to the free list."""
        ids = list(block_ids)
        self._reserved.difference_update(ids)
        self.free(ids)

    def claim(self, block_ids: Iterable[int]) -> None:
        """Turns reserved blocks into blocks owned by a request (they stay out of the free list)."""
        self._reserved.difference_update(block_ids)
