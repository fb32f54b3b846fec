"""Policy knobs with the paper's defaults, their ranges and their ``llumnix.v1.ClusterConfig`` paths.

No proto here (the policy core imports none): the ``ClusterConfig`` round trip is the scheduler's,
``control_plane/scheduler/config_wire.py``. ``validate()`` raises ``ValueError`` with a message naming the field;
the admin API maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from pyllumnix.infra.vocabulary import Priority


class Selection(enum.IntEnum):
    """Mirrors ``llumnix.v1.MigrationSelection`` (same ints)."""

    SR = 1
    LR = 2
    LCR = 3
    FCW = 4


# The policy names (dispatch, pairing, drain victim) are those of the registries, ``dispatch.DISPATCH_REGISTRY``,
# ``pairing.PAIRING_REGISTRY`` and ``scaling.DRAIN_VICTIM_REGISTRY``; so are the facts about each policy (whether a
# dispatch policy allows migration: ``DispatchPolicy.allows_migration``). Their ClusterConfig values are
# ``infra/wire.py``'s name tables.

# The artifact's high-priority headroom is relative to the instance: total blocks - 100 (~1,600 tokens left for the
# high-priority batch itself). ``high_headroom_blocks`` caps it (the ClusterConfig field; its maximum = no cap).
DEFAULT_HIGH_HEADROOM_RESERVE_BLOCKS = 100
DEFAULT_HIGH_HEADROOM_BLOCKS = 1_000_000
# A normal request that would queue on the instance the freeness ranking picks goes instead to an instance holding
# high-priority work where it runs at once and leaves at least this many blocks free (see dispatch/llumnix.py). 0: all
# of its free memory (the engines preempt such requests for high-priority ones); measured against 100 in
# docs/sim/REPORT.md (Fig. 13, session 6).
DEFAULT_NORMAL_SPILL_FLOOR_BLOCKS = 0


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Everything the policy core reads from the cluster config. Defaults are the paper's."""

    dispatch_policy: str = "llumnix"
    enable_migration: bool = True
    pairing_policy: str = "defrag"
    migrate_out_threshold: float = 3.0
    selection: Selection = Selection.SR
    enable_defrag: bool = True
    pairing_interval_ms: int = 100
    # 0: each llumlet keeps its own --last-stage-max-blocks / --max-stages / --pending-timeout / --transfer-timeout
    # (an operator who tuned those flags, e.g. for large vLLM caches, is not silently overridden; the flags default to
    # the paper's 4 blocks / 3 stages / 10 s); a value in RANGES is the cluster's, carried on every order.
    last_stage_max_blocks: int = 0
    max_stages: int = 0
    pending_timeout_ms: int = 0
    transfer_timeout_ms: int = 0
    enable_scaling: bool = False
    scale_up_threshold: float = 10.0
    scale_down_threshold: float = 60.0
    min_instances: int = 1
    max_instances: int = 16
    scaling_interval_ms: int = 10_000
    normal_headroom_blocks: int = 0
    high_headroom_blocks: int = DEFAULT_HIGH_HEADROOM_BLOCKS
    load_report_interval_ms: int = 50
    # The high headroom of an instance is min(high_headroom_blocks, total - high_headroom_reserve_blocks)
    # (ClusterConfig priority.high_headroom_reserve_blocks).
    high_headroom_reserve_blocks: int = DEFAULT_HIGH_HEADROOM_RESERVE_BLOCKS
    # Blocks a normal request spilled onto an instance holding high-priority work must leave free there
    # (ClusterConfig priority.normal_spill_floor_blocks); more than any instance holds: no spill (the artifact's rule).
    normal_spill_floor_blocks: int = DEFAULT_NORMAL_SPILL_FLOOR_BLOCKS
    # No scaling decision before this long after the scaling loop started (the artifact waits 100 s for load to
    # settle); the simulator counts from t = 0, the live scheduler from the start of the leader's scaling loop.
    scaling_warmup_ms: int = 100_000
    # The instance a scale-down drains: "fewest-requests" (cheapest to empty) or "last" (highest id, the artifact's).
    drain_victim: str = "fewest-requests"

    def headroom(self, priority: int, total_blocks: int) -> int:
        """Blocks reserved on an instance of ``total_blocks`` holding requests of this priority."""
        if priority >= Priority.HIGH:
            return self.high_headroom(total_blocks)
        return self.normal_headroom_blocks

    def high_headroom(self, total_blocks: int) -> int:
        """The high-priority headroom of an instance: all but ``high_headroom_reserve_blocks``, capped."""
        return min(self.high_headroom_blocks, max(0, total_blocks - self.high_headroom_reserve_blocks))

    def validate(self) -> PolicyConfig:
        """Returns self, or raises ValueError naming the first bad field, its range and its value.

        Every number has an upper bound too: a huge interval silences a loop (a report interval of 2^31 ms would
        never mark a silent instance unhealthy), a huge instance count would have a provider spawn that many
        processes, a threshold of 1e308 overflows the freeness arithmetic.
        """
        # Imported here: the registries' modules import this one. Checked against the registries themselves, so a
        # policy registered there is valid everywhere.
        from pyllumnix.control_plane.policy.dispatch import DISPATCH_REGISTRY
        from pyllumnix.control_plane.policy.pairing import PAIRING_REGISTRY
        from pyllumnix.control_plane.policy.scaling import DRAIN_VICTIM_REGISTRY

        for field, value, kind, registry in (
            ("dispatch_policy", self.dispatch_policy, "policy", DISPATCH_REGISTRY),
            ("pairing_policy", self.pairing_policy, "policy", PAIRING_REGISTRY),
            ("drain_victim", self.drain_victim, "choice", DRAIN_VICTIM_REGISTRY),
        ):
            if value not in registry:
                raise ValueError(f"{field}: unknown {kind} {value!r}; known: {tuple(registry)}")
        if not isinstance(self.selection, Selection):
            raise ValueError(f"selection: unknown selection {self.selection!r}")
        for name, (lo, hi) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{_label(name)}: must be finite, got {value}")
            if value == 0 and name in ZERO_KEEPS_LLUMLETS:
                continue
            if not lo <= value <= hi:
                zero = " (or 0: each llumlet's own flag)" if name in ZERO_KEEPS_LLUMLETS else ""
                raise ValueError(f"{_label(name)}: {value} is outside the range [{lo}, {hi}]{zero}")
        if self.scale_down_threshold <= self.scale_up_threshold:
            raise ValueError(
                f"scale_down_threshold ({self.scale_down_threshold}) must be greater than scale_up_threshold "
                f"({self.scale_up_threshold})"
            )
        if self.max_instances < self.min_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) must not exceed max_instances ({self.max_instances})"
            )
        return self


# Inclusive [low, high] of every numeric knob (also documented per field in config.proto).
MAX_THRESHOLD = 1_000_000.0
MAX_INSTANCES = 4096
RANGES: dict[str, tuple[float, float]] = {
    "migrate_out_threshold": (0.0, MAX_THRESHOLD),
    "scale_up_threshold": (0.0, MAX_THRESHOLD),
    "scale_down_threshold": (0.0, MAX_THRESHOLD),
    "pairing_interval_ms": (10, 60_000),
    "last_stage_max_blocks": (1, 4096),
    "max_stages": (1, 64),
    "pending_timeout_ms": (100, 600_000),
    "transfer_timeout_ms": (100, 600_000),
    "min_instances": (1, MAX_INSTANCES),
    "max_instances": (1, MAX_INSTANCES),
    "scaling_interval_ms": (100, 3_600_000),
    "normal_headroom_blocks": (0, 1_000_000),
    "high_headroom_blocks": (0, 1_000_000),
    "high_headroom_reserve_blocks": (0, 1_000_000),
    "normal_spill_floor_blocks": (0, 1_000_000),
    "scaling_warmup_ms": (0, 3_600_000),
    "load_report_interval_ms": (10, 1000),
}

# Knobs whose 0 (the default) leaves each llumlet's own value in force instead of a cluster-wide one.
ZERO_KEEPS_LLUMLETS = frozenset({"last_stage_max_blocks", "max_stages", "pending_timeout_ms", "transfer_timeout_ms"})

# The ClusterConfig path of each knob, so an error names what `llmctl config set` takes.
PATHS: dict[str, str] = {
    "migrate_out_threshold": "migration.migrate_out_threshold",
    "pairing_interval_ms": "migration.pairing_interval_ms",
    "last_stage_max_blocks": "migration.last_stage_max_blocks",
    "max_stages": "migration.max_stages",
    "pending_timeout_ms": "migration.pending_timeout_ms",
    "transfer_timeout_ms": "migration.transfer_timeout_ms",
    "scale_up_threshold": "scaling.scale_up_threshold",
    "scale_down_threshold": "scaling.scale_down_threshold",
    "min_instances": "scaling.min_instances",
    "max_instances": "scaling.max_instances",
    "scaling_interval_ms": "scaling.scaling_interval_ms",
    "scaling_warmup_ms": "scaling.warmup_ms",
    "normal_headroom_blocks": "priority.headroom[PRIORITY_NORMAL].headroom_blocks",
    "high_headroom_blocks": "priority.headroom[PRIORITY_HIGH].headroom_blocks",
    "high_headroom_reserve_blocks": "priority.high_headroom_reserve_blocks",
    "normal_spill_floor_blocks": "priority.normal_spill_floor_blocks",
    "load_report_interval_ms": "load_report_interval_ms",
}


def _label(name: str) -> str:
    path = PATHS.get(name, name)
    return path if path.endswith(name) else f"{path} ({name})"


def check_scale_target(target: int, config: PolicyConfig, provider_cap: int | None = None) -> None:
    """Raises ValueError unless ``target`` instances lie in [min_instances, min(max_instances, provider_cap)].

    The one check of `Scale` (the scheduler and the test fakes share it, so their messages cannot drift).
    """
    high = config.max_instances if provider_cap is None else min(config.max_instances, provider_cap)
    if not config.min_instances <= target <= high:
        cap = "" if provider_cap is None else f", provider cap {provider_cap}"
        raise ValueError(
            f"target_instances: {target} is outside the range [{config.min_instances}, {high}] "
            f"(scaling.min_instances {config.min_instances}, scaling.max_instances {config.max_instances}{cap})"
        )
