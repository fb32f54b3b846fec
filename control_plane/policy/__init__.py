"""The pure policy core: virtual usage, freeness, dispatch, migration pairing and selection, auto-scaling.

Shared unchanged by the live scheduler (leader) and the discrete-event simulator.
"""

from pyllumnix.control_plane.policy.config import PolicyConfig, Selection
from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.dispatch import (
    DISPATCH_POLICIES,
    DISPATCH_REGISTRY,
    DispatchPolicy,
    make_dispatch_policy,
)
from pyllumnix.control_plane.policy.freeness import (
    cluster_freeness,
    dispatch_freeness,
    migration_freeness,
    paper_freeness,
)
from pyllumnix.control_plane.policy.pairing import (
    PAIRING_POLICIES,
    PAIRING_REGISTRY,
    MigrateOrder,
    PairingPolicy,
    migration_active,
    pair_instances,
)
from pyllumnix.control_plane.policy.scaling import (
    DRAIN_VICTIM_REGISTRY,
    DRAIN_VICTIMS,
    ManualScalePlan,
    ScalingDecision,
    decide_scaling,
    plan_manual_scale,
)
from pyllumnix.control_plane.policy.selection import select_request
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, InstanceView, RequestView
from pyllumnix.infra.vocabulary import InstanceState, Priority, RequestPhase

__all__ = [
    "DISPATCH_POLICIES",
    "DISPATCH_REGISTRY",
    "DRAIN_VICTIMS",
    "DRAIN_VICTIM_REGISTRY",
    "PAIRING_POLICIES",
    "PAIRING_REGISTRY",
    "ClusterSnapshot",
    "DispatchPolicy",
    "DispatchRequestView",
    "InstanceState",
    "InstanceView",
    "ManualScalePlan",
    "MigrateOrder",
    "PairingPolicy",
    "PolicyConfig",
    "PolicyCore",
    "Priority",
    "RequestPhase",
    "RequestView",
    "ScalingDecision",
    "Selection",
    "cluster_freeness",
    "decide_scaling",
    "dispatch_freeness",
    "make_dispatch_policy",
    "migration_active",
    "migration_freeness",
    "pair_instances",
    "paper_freeness",
    "plan_manual_scale",
    "select_request",
]
