"""The cluster's migration knobs as a leader's order carries them (config.proto ``MigrationConfig``).

The leader puts ``last_stage_max_blocks``, ``max_stages``, ``transfer_timeout_ms`` and ``pending_timeout_ms`` of the
stored cluster config on every MigrateOut, so ``llmctl config set migration.*`` changes what live migrations use. A
field at 0 (the cluster config's default, an older leader, or a direct order such as a benchmark's) keeps the
llumlet's own value, from its flags. Every order's settings are derived from the llumlet's FLAG values, never from
an earlier order's (REVIEW10 M1: a cluster value set once and then put back to 0 stuck until restart).

The pending timeout is the destination's: the source passes the one its order carried in the first PreAllocate of
each migration, and the destination applies it to THAT migration's reservation only, clamped around its own flag
(REVIEW10 M2: one peer set it for every incoming migration, from any source, for good).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.protos.llumnix.v1 import llumlet_pb2

if TYPE_CHECKING:
    from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings

# config.proto's ranges for the two timeouts, checked again here: an order or a peer is not trusted to send them.
TIMEOUT_MIN_MS = 100
TIMEOUT_MAX_MS = 600_000
# How far a peer's pending timeout may stray from the destination's own --pending-timeout: a factor of 10 either
# way. The destination's operator picked the flag for its engine (large vLLM caches take longer); the ceiling bounds
# how long a peer that went silent keeps KV blocks reserved there (at most 10 x what the operator accepts, not the
# range's 10 minutes), the floor keeps a peer from having its own reservation reaped between two normal stages.
# Relative to the flag rather than fixed (e.g. [1 s, 60 s]), so a cluster tuned with small or large flags keeps them.
PEER_PENDING_FACTOR = 10.0


def _timeout_s(name: str, ms: int, flag_s: float) -> float:
    """``ms`` in seconds, or ``flag_s`` for 0 (the sender left it); a ValueError names an out-of-range value."""
    if ms == 0:
        return flag_s
    if not TIMEOUT_MIN_MS <= ms <= TIMEOUT_MAX_MS:
        raise ValueError(f"{name} must be 0 (keep the llumlet's) or in [{TIMEOUT_MIN_MS}, {TIMEOUT_MAX_MS}], got {ms}")
    return ms / 1000


def order_settings(
    request: llumlet_pb2.MigrateOutRequest, flags: MigrationSettings
) -> tuple[MigrationLimits, MigrationSettings]:
    """The settings and stage bounds of this order's migrations, from the llumlet's ``flags`` (the settings it was
    started with, never an earlier order's) and the order's fields (a ValueError names a bad field). The pending
    timeout is only passed on (``cluster_pending_timeout_ms``): it is the destination's."""
    if request.max_stages < 0:
        raise ValueError("max_stages must be >= 0 (0: keep the llumlet's)")
    if request.last_stage_max_blocks < 0:
        raise ValueError("last_stage_max_blocks must be >= 0 (0: keep the llumlet's)")
    own = flags.limits
    limits = MigrationLimits(
        request.last_stage_max_blocks or own.last_stage_max_blocks, request.max_stages or own.max_stages
    )
    transfer_s = _timeout_s("transfer_timeout_ms", request.transfer_timeout_ms, flags.transfer_timeout_s)
    _timeout_s("pending_timeout_ms", request.pending_timeout_ms, flags.pending_timeout_s)  # checked, passed on
    if request.transfer_timeout_ms == 0 and request.pending_timeout_ms == 0:
        return limits, flags
    return limits, replace(flags, transfer_timeout_s=transfer_s, cluster_pending_timeout_ms=request.pending_timeout_ms)


def incoming_pending_timeout_s(request: llumlet_pb2.PreAllocateRequest, flag_s: float) -> float:
    """The pending timeout of the one migration this first PreAllocate opens: the source's (the cluster's, as its
    order carried it) clamped to [flag / PEER_PENDING_FACTOR, flag x PEER_PENDING_FACTOR], or the destination's own
    flag ``flag_s`` where the source passed none (0). A ValueError names a value outside config.proto's range."""
    peer_s = _timeout_s("pending_timeout_ms", request.pending_timeout_ms, flag_s)
    return min(max(peer_s, flag_s / PEER_PENDING_FACTOR), flag_s * PEER_PENDING_FACTOR)


__all__ = ["PEER_PENDING_FACTOR", "TIMEOUT_MAX_MS", "TIMEOUT_MIN_MS", "incoming_pending_timeout_s", "order_settings"]
