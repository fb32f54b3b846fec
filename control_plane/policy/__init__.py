"""The pure policy core: virtual usage, freeness, dispatch, migration pairing and selection, auto-scaling.

Shared unchanged by the live scheduler (leader) and the discrete-event simulator.
"""

from pyllumnix.control_plane.policy.config import DISPATCH_POLICIES, PAIRING_POLICIES, PolicyConfig, Selection
from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.dispatch import DISPATCH_REGISTRY, DispatchPolicy, make_dispatch_policy
from pyllumnix.control_plane.policy.freeness import (
    cluster_freeness,
    dispatch_freeness,
    migration_freeness,
    paper_freeness,
)
from pyllumnix.control_plane.policy.pairing import MigrateOrder, pair_instances
from pyllumnix.control_plane.policy.scaling import ScalingDecision, decide_scaling
from pyllumnix.control_plane.policy.selection import select_request
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView, InstanceView, RequestView, from_instance_load
from pyllumnix.infra.vocabulary import InstanceState, Priority, RequestPhase

__all__ = [
    "DISPATCH_POLICIES",
    "DISPATCH_REGISTRY",
    "PAIRING_POLICIES",
    "ClusterSnapshot",
    "DispatchPolicy",
    "DispatchRequestView",
    "InstanceState",
    "InstanceView",
    "MigrateOrder",
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
    "from_instance_load",
    "make_dispatch_policy",
    "migration_freeness",
    "pair_instances",
    "paper_freeness",
    "select_request",
]
