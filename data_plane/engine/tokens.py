"""Deterministic token generation for the simulated engine.

A token is a hash of (request seed, position, previous token), so a request's stream is the same whatever batch it
ran in, however often it was preempted and recomputed, and on whichever engine it continued after a migration: the
property the migration and preemption tests check. Sampling knobs (temperature, top-p, penalties) do not change it.
"""

from __future__ import annotations

import struct

from pyllumnix.data_plane.engine.payload import request_key

_MASK = (1 << 64) - 1
_STATE = struct.Struct("<4sQ")
_MAGIC = b"SIM1"


def request_seed(request_id: str, seed: int | None) -> int:
    return (seed & _MASK) if seed is not None else request_key(request_id)


def next_token(seed: int, position: int, previous: int, vocab_size: int) -> int:
    """The token at ``position`` (index in prompt + output) after token ``previous``."""
    x = (seed ^ (position * 0x9E3779B97F4A7C15) ^ (previous * 0xD6E8FEB86659FD93)) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) % vocab_size


def encode_state(seed: int) -> bytes:
    """The sampler state carried in MigrationState.engine_state."""
    return _STATE.pack(_MAGIC, seed)


def decode_state(data: bytes) -> int | None:
    """The seed in ``data``, or None when it is empty or not a sim engine's state."""
    if len(data) != _STATE.size:
        return None
    magic, seed = _STATE.unpack(data)
    return int(seed) if magic == _MAGIC else None
