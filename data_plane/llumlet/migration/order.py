"""The cluster's migration knobs as a leader's order carries them (config.proto ``MigrationConfig``).

The leader puts ``last_stage_max_blocks``, ``max_stages``, ``transfer_timeout_ms`` and ``pending_timeout_ms`` of the
stored cluster config on every MigrateOut, so ``llmctl config set migration.*`` changes what live migrations use. A
field left at 0 (an older leader, or a direct order such as a benchmark's) keeps the llumlet's own value, from its
flags. The stage bounds hold for that order only; the two timeouts are the cluster's and stay in force from the order
on. The destination needs the pending timeout (it frees a reservation whose source went silent), so the source passes
the one its orders carried in the first PreAllocate of each migration.
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


def _timeout_s(name: str, ms: int, current_s: float) -> float:
    """``ms`` in seconds, or ``current_s`` for 0 (the sender left it); a ValueError names an out-of-range value."""
    if ms == 0:
        return current_s
    if not TIMEOUT_MIN_MS <= ms <= TIMEOUT_MAX_MS:
        raise ValueError(f"{name} must be 0 (keep the llumlet's) or in [{TIMEOUT_MIN_MS}, {TIMEOUT_MAX_MS}], got {ms}")
    return ms / 1000


def order_settings(
    request: llumlet_pb2.MigrateOutRequest, settings: MigrationSettings
) -> tuple[MigrationLimits, MigrationSettings]:
    """The stage bounds for this order's migrations and the llumlet's settings from the order on (a ValueError names
    a bad field)."""
    if request.max_stages < 0:
        raise ValueError("max_stages must be >= 0 (0: keep the llumlet's)")
    if request.last_stage_max_blocks < 0:
        raise ValueError("last_stage_max_blocks must be >= 0 (0: keep the llumlet's)")
    own = settings.limits
    limits = MigrationLimits(
        request.last_stage_max_blocks or own.last_stage_max_blocks, request.max_stages or own.max_stages
    )
    transfer_s = _timeout_s("transfer_timeout_ms", request.transfer_timeout_ms, settings.transfer_timeout_s)
    pending_s = _timeout_s("pending_timeout_ms", request.pending_timeout_ms, settings.pending_timeout_s)
    if request.transfer_timeout_ms == 0 and request.pending_timeout_ms == 0:
        return limits, settings
    cluster_pending_ms = request.pending_timeout_ms or settings.cluster_pending_timeout_ms
    return limits, replace(
        settings,
        transfer_timeout_s=transfer_s,
        pending_timeout_s=pending_s,
        cluster_pending_timeout_ms=cluster_pending_ms,
    )


def handshake_settings(request: llumlet_pb2.PreAllocateRequest, settings: MigrationSettings) -> MigrationSettings:
    """The destination's settings once a source passed on the cluster's pending timeout (0: it had none to pass)."""
    if request.pending_timeout_ms in (0, settings.cluster_pending_timeout_ms):
        return settings
    pending_s = _timeout_s("pending_timeout_ms", request.pending_timeout_ms, settings.pending_timeout_s)
    return replace(settings, pending_timeout_s=pending_s, cluster_pending_timeout_ms=request.pending_timeout_ms)


__all__ = ["TIMEOUT_MAX_MS", "TIMEOUT_MIN_MS", "handshake_settings", "order_settings"]
