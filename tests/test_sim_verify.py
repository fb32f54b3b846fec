"""SimEngine(verify_incoming=True) refuses a migrated request whose KV bytes were corrupted in transit, and the
refusal leaks nothing: the destination's reserved blocks return to its free pool and the source's request resumes
with its own blocks and tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import InvalidStateError, Phase, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine

SPEC = RequestSpec("r", tuple(range(1, 41)), Sampling(30, seed=3))


@dataclass
class Copy:
    src: SimEngine
    dst: SimEngine
    reserved: list[int]
    src_blocks: list[int]
    tokens_before: list[int]
    data: np.ndarray


def copy_blocks(corrupt: bool) -> Copy:
    src, dst = SimEngine("tiny"), SimEngine("tiny", verify_incoming=True)
    src.add_request(SPEC, 0.0)
    tokens: list[int] = []
    for _ in range(5):
        for out in src.step(0.0).outputs:
            tokens += out.token_ids
    ids = src.block_ids("r")
    data = src.read_blocks(ids)
    if corrupt:
        data[1, 17] ^= 0xFF
    reserved = dst.reserve_blocks(len(ids))
    dst.write_blocks(reserved, data)
    return Copy(src, dst, reserved, ids, tokens, np.array(data, copy=True))


def test_intact_bytes_commit() -> None:
    c = copy_blocks(corrupt=False)
    state = c.src.suspend("r")
    c.dst.commit_incoming(state, c.reserved, 0.0)
    c.src.release_suspended("r")
    assert c.dst.request_ids() == ["r"] and c.dst.block_ids("r") == c.reserved
    assert np.array_equal(c.dst.read_blocks(c.reserved), c.data)
    assert c.src.request_ids() == [] and c.src.load().free_blocks == c.src.total_blocks
    assert c.dst.load().reserved_blocks == 0


def test_corrupted_byte_is_refused_and_nothing_leaks() -> None:
    c = copy_blocks(corrupt=True)
    dst_free_before_reserve = c.dst.total_blocks
    assert c.dst.load().free_blocks == dst_free_before_reserve - len(c.reserved)
    assert c.dst.load().reserved_blocks == len(c.reserved)
    state = c.src.suspend("r")
    with pytest.raises(InvalidStateError, match="block 1"):
        c.dst.commit_incoming(state, c.reserved, 0.0)
    # the refused commit installed nothing; what the destination still holds is the reservation, freed by its owner
    assert c.dst.request_ids() == []
    assert c.dst.load().reserved_blocks == len(c.reserved)
    c.dst.free_reserved(c.reserved)
    dst_load = c.dst.load()
    assert (dst_load.free_blocks, dst_load.reserved_blocks) == (dst_free_before_reserve, 0)
    assert c.dst.payload.num_materialized == 0
    # the source resumes the request with the same blocks and finishes it token-exact
    c.src.resume("r")
    assert c.src.phase("r") is Phase.RUNNING and c.src.block_ids("r") == c.src_blocks
    tokens = list(c.tokens_before)
    while c.src.has_work():
        for out in c.src.step(0.0).outputs:
            tokens += out.token_ids
    alone = SimEngine("tiny")
    alone.add_request(SPEC, 0.0)
    expected: list[int] = []
    while alone.has_work():
        for out in alone.step(0.0).outputs:
            expected += out.token_ids
    assert tokens == expected
    src_load = c.src.load()
    assert (src_load.free_blocks, src_load.reserved_blocks, c.src.payload.num_materialized) == (
        c.src.total_blocks,
        0,
        0,
    )
