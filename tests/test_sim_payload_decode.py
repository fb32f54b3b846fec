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
