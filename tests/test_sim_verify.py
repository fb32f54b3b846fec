"""SimEngine(verify_incoming=True) refuses a migrated request whose KV bytes were corrupted in transit."""

from __future__ import annotations

import pytest

from pyllumnix.data_plane.engine.base import InvalidStateError, RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine


def _copy_and_commit(corrupt: bool) -> SimEngine:
    src, dst = SimEngine("tiny"), SimEngine("tiny", verify_incoming=True)
    src.add_request(RequestSpec("r", tuple(range(1, 41)), Sampling(30, seed=3)), 0.0)
    for _ in range(5):
        src.step(0.0)
    state = src.suspend("r")
    ids = src.block_ids("r")
    data = src.read_blocks(ids)
    if corrupt:
        data[1, 17] ^= 0xFF
    reserved = dst.reserve_blocks(len(ids))
    dst.write_blocks(reserved, data)
    try:
        dst.commit_incoming(state, reserved, 0.0)
    except InvalidStateError:
        dst.free_reserved(reserved)
        src.resume("r")
        raise
    src.release_suspended("r")
    return dst


def test_intact_bytes_commit() -> None:
    dst = _copy_and_commit(corrupt=False)
    assert dst.request_ids() == ["r"]


def test_corrupted_byte_is_refused_and_nothing_leaks() -> None:
    with pytest.raises(InvalidStateError, match="block 1"):
        _copy_and_commit(corrupt=True)
