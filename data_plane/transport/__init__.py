"""Data plane: moves KV blocks between llumlets (UCX, TCP, in-process) with block fusion and pipelining."""

from pyllumnix.data_plane.transport.base import (
    DEFAULT_TIMEOUT_S,
    Transport,
    TransportClosed,
    TransportError,
    TransportStalled,
    TransportTimeout,
    chunk_key,
)
from pyllumnix.data_plane.transport.factory import make_transport, ucx_available
from pyllumnix.data_plane.transport.fusion import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    TransferResult,
    plan_chunks,
    receive_blocks,
    send_blocks,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_STALL_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "TransferResult",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportStalled",
    "TransportTimeout",
    "chunk_key",
    "make_transport",
    "plan_chunks",
    "receive_blocks",
    "send_blocks",
    "ucx_available",
]
