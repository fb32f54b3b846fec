"""The sim engine's one-token KV write (every decode step, every request) is the bulk write's bytes exactly: a
migration verifies those bytes against ``expected_block_bytes``."""

from __future__ import annotations

import random

import numpy as np

from pyllumnix.data_plane.engine.payload import (
    PayloadStore,
    expected_block_bytes,
    request_key,
    token_value,
    token_values,
)


def test_the_integer_token_value_is_numpys() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        key, position = rng.getrandbits(64), rng.randrange(1 << 40)
        assert token_value(key, position) == int(token_values(key, position, position + 1)[0])


def test_token_by_token_fills_write_the_bulk_fills_bytes() -> None:
    bulk, decoded = PayloadStore(16, 64), PayloadStore(16, 64)
    key, blocks = request_key("r1"), [3, 7, 9]
    bulk.fill(blocks, key, 0, 41)
    decoded.fill(blocks, key, 0, 10)  # the prefill, then one token per step (into fresh blocks too)
    for position in range(10, 41):
        decoded.fill(blocks, key, position, position + 1)
    for index, block in enumerate(blocks):
        expected = expected_block_bytes("r1", index, 41, block_size=16, bytes_per_token=64)
        assert np.array_equal(bulk.read([block])[0], expected)
        assert np.array_equal(decoded.read([block])[0], expected)


def test_in_order_fills_are_kept_as_records_until_read() -> None:
    """A prefill and its decodes make no array: the bytes exist only when read (a migration's source)."""
    store = PayloadStore(16, 64)
    key, blocks = request_key("r2"), [5, 1, 8]
    store.fill(blocks, key, 0, 20)
    for position in range(20, 40):
        store.fill(blocks, key, position, position + 1)
    assert (store.num_materialized, store.num_arrays) == (3, 0)
    data = store.read(blocks)
    for index in range(3):
        assert np.array_equal(data[index], expected_block_bytes("r2", index, 40, block_size=16, bytes_per_token=64))
    store.drop(blocks)
    assert (store.num_materialized, store.num_arrays) == (0, 0)


class _EagerModel:
    """The store's contract written plainly: a block is zeros until touched, a fill writes its slots, a write
    replaces the whole block, a drop forgets it."""

    def __init__(self, block_size: int, bytes_per_token: int) -> None:
        self.bs, self.words = block_size, bytes_per_token // 8
        self.blocks: dict[int, np.ndarray] = {}

    def block(self, b: int) -> np.ndarray:
        return self.blocks.setdefault(b, np.zeros((self.bs, self.words), dtype=np.uint64))

    def fill(self, block_ids: list[int], key: int, start: int, end: int) -> None:
        for position in range(start, end):
            index, slot = divmod(position, self.bs)
            self.block(block_ids[index])[slot] = token_value(key, position)

    def read(self, b: int) -> np.ndarray:
        return self.blocks.get(b, np.zeros((self.bs, self.words), dtype=np.uint64)).view(np.uint8).reshape(-1)


def test_records_and_arrays_read_as_eager_writes_would() -> None:
    """Random fills (in order, out of order, over another request's block), outside writes and drops: every read
    gives the bytes the plain model holds, however the store keeps each block."""
    bs, bpt = 4, 32
    rng = random.Random(11)
    for _ in range(40):
        store, model = PayloadStore(bs, bpt), _EagerModel(bs, bpt)
        keys = [rng.getrandbits(64) for _ in range(3)]
        for _ in range(60):
            op = rng.random()
            block_ids = rng.sample(range(12), 3)
            if op < 0.7:
                key = rng.choice(keys)
                start = rng.randrange(3 * bs)
                end = min(3 * bs, start + rng.choice([1, 1, 2, 5, 9]))
                store.fill(block_ids, key, start, end)
                model.fill(block_ids, key, start, end)
            elif op < 0.85:
                data = np.frombuffer(rng.randbytes(2 * bs * bpt), dtype=np.uint8).reshape(2, bs * bpt)
                store.write(block_ids[:2], data)
                for b, row in zip(block_ids[:2], data, strict=True):
                    model.blocks[b] = row.copy().view(np.uint64).reshape(bs, bpt // 8)
            else:
                store.drop(block_ids[:1])
                model.blocks.pop(block_ids[0], None)
            every = list(range(12))
            got = store.read(every)
            for b in every:
                assert np.array_equal(got[every.index(b)], model.read(b)), b
