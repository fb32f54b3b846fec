"""Real KV payload bytes for the simulated engine, so migration moves (and tests can check) actual data.

Each token's slot (``bytes_per_token`` bytes) in its block holds one 64-bit value repeated, a hash of (request id,
token position): checkable after any copy. A block the engine fills in order (every prefill and decode) is kept as a
record, (request key, first position, slots filled), and its bytes are made only when read (a migration's source) or
when a fill breaks the order; a block written from outside (a migration's destination) holds an array. Why: a real
engine writes its KV on the accelerator, at no host CPU, but writing these bytes eagerly cost each llumlet ~20 % of its
CPU in ``llumnix bench peers`` (~8 ms per request at 8 KiB per token: memory bandwidth, not arithmetic), work no real
deployment's host does; a migration still reads, sends and checks every byte. Freed arrays are kept as spares (up to
``spare_bytes``) and reused: a fresh 8 MiB array costs page faults on first touch; ``prewarm`` fills the spares up
front, as vLLM allocates its KV cache at start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pyllumnix.data_plane.engine.base import BlockBuffer
from pyllumnix.data_plane.host_memory import host_buffer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def request_key(request_id: str) -> int:
    """Stable 64-bit hash of a request id (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def token_values(key: int, start: int, end: int) -> npt.NDArray[np.uint64]:
    """splitmix64 of (key, position) for positions [start, end)."""
    x = np.arange(start, end, dtype=np.uint64) * _GOLDEN ^ np.uint64(key)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


_MASK64 = (1 << 64) - 1


def token_value(key: int, position: int) -> int:
    """``token_values(key, position, position + 1)[0]`` in plain integers: a decode step writes one token per
    request, for which numpy's per-call overhead costs ~10x the arithmetic."""
    x = ((position * 0x9E3779B97F4A7C15) & _MASK64) ^ key
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _fill_block(block: npt.NDArray[np.uint8], values: npt.NDArray[np.uint64], first_slot: int, bpt: int) -> None:
    words = block.view(np.uint64).reshape(-1, bpt // 8)
    words[first_slot : first_slot + len(values)] = values[:, None]


def expected_block_bytes(
    request_id: str, block_index: int, num_tokens: int, *, block_size: int, bytes_per_token: int
) -> npt.NDArray[np.uint8]:
    """The bytes logical block ``block_index`` of a request holds once its first ``num_tokens`` tokens have KV
    (slots past ``num_tokens`` are zero)."""
    block = np.empty(block_size * bytes_per_token, dtype=np.uint8)
    start = block_index * block_size
    _render(block, request_key(request_id), start, max(0, min(num_tokens, start + block_size) - start), bytes_per_token)
    return block


def _render(out: npt.NDArray[np.uint8], key: int, first: int, filled: int, bpt: int) -> None:
    """One block's bytes into ``out``: the values of positions [first, first + filled), zeros after."""
    out[filled * bpt :] = 0
    if filled:
        _fill_block(out, token_values(key, first, first + filled), 0, bpt)


class PayloadStore:
    """Block id -> bytes, as an array or as a record of in-order fills (see the module docstring). ``enabled=False``
    keeps nothing (large-scale simulation) and reads back zeros.

    ``read`` may run in another thread while the owner fills: it looks at the records before the arrays, and a record
    becomes an array by storing the array first, so a block is never missed in between."""

    def __init__(
        self, block_size: int, bytes_per_token: int, *, enabled: bool = True, spare_bytes: int = 1 << 30
    ) -> None:
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.block_bytes = block_size * bytes_per_token
        self.enabled = enabled
        self.max_spares = spare_bytes // self.block_bytes
        self._blocks: dict[int, npt.NDArray[np.uint8]] = {}
        # block id -> (request key, position of its first slot, slots filled): slots [0, filled) hold the request's
        # values, the rest zeros.
        self._records: dict[int, tuple[int, int, int]] = {}
        self._spares: list[npt.NDArray[np.uint8]] = []

    @property
    def num_materialized(self) -> int:
        """Blocks holding data, as arrays or records."""
        return len(self._blocks) + len(self._records)

    @property
    def num_arrays(self) -> int:
        """Blocks whose bytes exist as an array (written from outside, or filled out of order)."""
        return len(self._blocks)

    @property
    def num_spares(self) -> int:
        return len(self._spares)

    def prewarm(self, n: int) -> None:
        """Creates up to ``n`` spare arrays (within the spare cap), touching every page now rather than mid-step."""
        while self.enabled and len(self._spares) < min(n, self.max_spares):
            block = host_buffer(self.block_bytes)
            block.fill(0)
            self._spares.append(block)

    def _new_array(self) -> npt.NDArray[np.uint8]:
        """An array with unspecified content: callers overwrite or zero all of it."""
        try:
            return self._spares.pop()  # may race with another thread's pop (write_blocks runs off the step thread)
        except IndexError:
            return host_buffer(self.block_bytes)

    def _block(self, block_id: int, first_slot: int, end_slot: int) -> npt.NDArray[np.uint8]:
        """The block's array, made from its record if it has one; a new one gets zeros outside slots
        [first_slot, end_slot), which the caller fills."""
        block = self._blocks.get(block_id)
        if block is None:
            block = self._new_array()
            record = self._records.get(block_id)
            if record is not None:
                _render(block, *record, self.bytes_per_token)
            else:
                bpt = self.bytes_per_token
                block[: first_slot * bpt] = 0
                block[end_slot * bpt :] = 0
            self._blocks[block_id] = block  # before the record goes: a concurrent read sees one or the other
            self._records.pop(block_id, None)
        return block

    def _record(self, block_id: int, key: int, first: int, lo: int, hi: int) -> bool:
        """Records slots [lo, hi) of ``key``'s block starting at position ``first`` when that extends what the block
        holds in order (a fresh block from slot 0, or the next slots of the same request's block); False otherwise."""
        if block_id in self._blocks:
            return False
        record = self._records.get(block_id)
        if lo != (0 if record is None else record[2]) or (record is not None and record[:2] != (key, first)):
            return False
        self._records[block_id] = (key, first, hi)
        return True

    def drop(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            self._records.pop(b, None)
            block = self._blocks.pop(b, None)
            if block is not None and len(self._spares) < self.max_spares:
                self._spares.append(block)

    def fill(self, block_ids: Sequence[int], key: int, start: int, end: int) -> None:
        """Writes the KV of token positions [start, end) of the request whose logical blocks are ``block_ids``."""
        if not self.enabled or end <= start:
            return
        bs = self.block_size
        if end == start + 1:  # a decode step's one token
            index, slot = divmod(start, bs)
            block_id = block_ids[index]
            if self._record(block_id, key, index * bs, slot, slot + 1):
                return
            words = self.bytes_per_token // 8
            block = self._block(block_id, slot, slot + 1)
            block.view(np.uint64)[slot * words : (slot + 1) * words] = token_value(key, start)
            return
        values: npt.NDArray[np.uint64] | None = None
        for index in range(start // bs, (end - 1) // bs + 1):
            first = index * bs
            lo, hi = max(start, first), min(end, first + bs)
            if self._record(block_ids[index], key, first, lo - first, hi - first):
                continue
            if values is None:
                values = token_values(key, start, end)
            block = self._block(block_ids[index], lo - first, hi - first)
            _fill_block(block, values[lo - start : hi - start], lo - first, self.bytes_per_token)

    def read(self, block_ids: Sequence[int], out: BlockBuffer | None = None) -> BlockBuffer:
        """Copies the blocks into ``out`` (a reused, already touched buffer avoids page faults) or a new buffer."""
        shape = (len(block_ids), self.block_bytes)
        if out is None:
            out = np.zeros(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, need {shape} uint8")
        for i, b in enumerate(block_ids):
            record = self._records.get(b) if self.enabled else None  # records first: see the class docstring
            if record is not None:
                _render(out[i], *record, self.bytes_per_token)
                continue
            block = self._blocks.get(b) if self.enabled else None
            if block is not None:
                np.copyto(out[i], block)
            else:
                out[i].fill(0)
        return out

    def write(self, block_ids: Sequence[int], data: BlockBuffer) -> None:
        if not self.enabled:
            return
        for i, b in enumerate(block_ids):
            block = self._blocks.get(b)
            if block is None:
                block = self._new_array()
            np.copyto(block, data[i])
            self._blocks[b] = block
            self._records.pop(b, None)
