"""Knobs of one simulated run, and the modelled cost of moving KV blocks between instances.

Defaults follow /work/shared/PAPER.md. The transfer model is fitted to the paper's Fig. 10 (LLaMA-7B, A10): the
blocking copy grows by 1,614 ms from 256 to 8,192 tokens, i.e. 7,936 tokens x 512 KiB = 3,968 MiB in 1.61 s, about
2.6 GB/s (~20 Gbit/s); the last stage copies at most 4 blocks (32 MiB, ~13 ms at that rate), which matches the
plotted 13-26 ms downtime. The per-stage latency (2 ms) stands for the pre-allocate / transfer / commit handshakes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.dispatch import DISPATCH_POLICIES
from pyllumnix.control_plane.policy.scaling import DRAIN_VICTIMS
from pyllumnix.data_plane.engine.profile import Profile, get_profile

DEFAULT_BANDWIDTH_GBPS = 20.0
DEFAULT_STAGE_LATENCY_MS = 2.0


@dataclass(frozen=True)
class TransferModel:
    """Seconds to copy n blocks between two instances: a fixed per-stage latency plus bytes over bandwidth."""

    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    stage_latency_ms: float = DEFAULT_STAGE_LATENCY_MS

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0.0 or self.stage_latency_ms < 0.0:
            raise ValueError("bandwidth_gbps must be > 0 and stage_latency_ms >= 0")

    def stage_seconds(self, num_blocks: int, block_bytes: int) -> float:
        return self.stage_latency_ms / 1000.0 + num_blocks * block_bytes * 8 / (self.bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class SimConfig:
    """One run: cluster size and engine profile, the policy and its intervals, auto-scaling, migration cost."""

    instances: int = 16
    profile: str = "llama-7b-a10"
    policy: str = "llumnix"
    # False: every request is dispatched and scheduled as normal priority (the "priorities ignored" baseline);
    # the records keep the true priority so the metrics can still be split by it.
    priorities: bool = True
    autoscale: bool = False
    min_instances: int = 1
    max_instances: int = 16
    scale_up_threshold: float = 10.0
    scale_down_threshold: float = 60.0
    scaling_interval_s: float = 10.0
    # First scaling decision at max(interval, warm-up): the artifact lets the load settle for 100 s.
    scaling_warmup_s: float = 100.0
    # The instance a scale-down drains: "last" (the artifact's) or "fewest-requests".
    drain_victim: str = "last"
    startup_s: float = 5.0
    # Engine steps are prefill-only or decode-only (vLLM 0.1.x, the paper's engine) instead of mixed (V1).
    split_steps: bool = False
    migrate_out_threshold: float = 3.0
    # Which request a source migrates out (the artifact's: LCR, the last-come running one, i.e. the next preemption
    # victim of a vLLM batch).
    selection: Selection = Selection.SR
    enable_migration: bool = True
    pairing_interval_ms: int = 100
    # How often an instance's load reaches the policy's snapshot (the live llumlet streams every 50 ms; each
    # report costs an engine load(), the simulator's main overhead, so the simulated default is the pairing interval).
    report_interval_ms: int = 100
    sample_interval_s: float = 1.0
    # Cap on the blocks a high-priority request's instance keeps free (None: the policy default, no cap); the
    # headroom itself is total - high_headroom_reserve_blocks (None: the policy default, 100).
    high_headroom_blocks: int | None = None
    high_headroom_reserve_blocks: int | None = None
    transfer: TransferModel = TransferModel()
    seed: int = 0
    # Stop the clock here even if requests are left (a guard against a wedged engine); None = run to completion.
    max_virtual_s: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in DISPATCH_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(DISPATCH_POLICIES)}")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        if self.autoscale and not self.min_instances <= self.instances <= self.max_instances:
            raise ValueError("with autoscale the initial instances must lie in [min_instances, max_instances]")
        if self.report_interval_ms <= 0 or self.sample_interval_s <= 0.0 or self.startup_s < 0.0:
            raise ValueError("report_interval_ms and sample_interval_s must be > 0, startup_s >= 0")
        if self.scaling_warmup_s < 0.0 or self.drain_victim not in DRAIN_VICTIMS:
            raise ValueError(f"scaling_warmup_s must be >= 0 and drain_victim one of {', '.join(DRAIN_VICTIMS)}")

    def engine_profile(self) -> Profile:
        """The named profile with this run's step mode."""
        return dataclasses.replace(get_profile(self.profile), split_steps=self.split_steps)

    def policy_config(self) -> PolicyConfig:
        """The PolicyConfig the core runs with (paper defaults for everything not set here)."""
        d = PolicyConfig()
        headroom = d.high_headroom_blocks if self.high_headroom_blocks is None else self.high_headroom_blocks
        reserve = (
            d.high_headroom_reserve_blocks
            if self.high_headroom_reserve_blocks is None
            else self.high_headroom_reserve_blocks
        )
        return PolicyConfig(
            high_headroom_blocks=headroom,
            high_headroom_reserve_blocks=reserve,
            migrate_out_threshold=self.migrate_out_threshold,
            selection=self.selection,
            scaling_warmup_ms=round(self.scaling_warmup_s * 1000),
            drain_victim=self.drain_victim,
            dispatch_policy=self.policy,
            enable_migration=self.enable_migration,
            pairing_interval_ms=self.pairing_interval_ms,
            enable_scaling=self.autoscale,
            scale_up_threshold=self.scale_up_threshold,
            scale_down_threshold=self.scale_down_threshold,
            min_instances=self.min_instances if self.autoscale else 1,
            max_instances=self.max_instances if self.autoscale else max(self.instances, self.max_instances),
            scaling_interval_ms=max(1, round(self.scaling_interval_s * 1000)),
            load_report_interval_ms=self.report_interval_ms,
        ).validate()
