"""The facade the live scheduler and the simulator both drive: config plus the seeded state, nothing else.

Pure: decisions depend only on (config, seed, the sequence of calls); no I/O, no clock.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.dispatch import DispatchPolicy, make_dispatch_policy
from pyllumnix.control_plane.policy.pairing import MigrateOrder, migration_active, pair_instances
from pyllumnix.control_plane.policy.scaling import ScalingDecision, decide_scaling
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView


class PolicyCore:
    def __init__(self, config: PolicyConfig | None = None, *, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._config = (config or PolicyConfig()).validate()
        self._dispatch: DispatchPolicy = make_dispatch_policy(self._config.dispatch_policy, self._config, self._rng)

    @property
    def config(self) -> PolicyConfig:
        return self._config

    @property
    def dispatch_policy(self) -> DispatchPolicy:
        return self._dispatch

    def reconfigure(self, config: PolicyConfig) -> None:
        """Applies a new config (validated first, so a bad one leaves the core unchanged). The dispatch policy's state
        survives when its name is unchanged."""
        config.validate()
        if config.dispatch_policy == self._config.dispatch_policy:
            self._dispatch.config = config
        else:
            self._dispatch = make_dispatch_policy(config.dispatch_policy, config, self._rng)
        self._config = config

    def dispatch(self, snapshot: ClusterSnapshot, request: DispatchRequestView) -> str | None:
        """The instance for a new request, or None when no instance can take requests. The caller records the
        dispatch (``snapshot.record_dispatch``) until that instance's next load report."""
        return self._dispatch.choose(snapshot, request)

    @property
    def migration_active(self) -> bool:
        """Whether pairing orders migrations at all under the current config (see ``pairing.migration_active``)."""
        return migration_active(self._config)

    def pair(self, snapshot: ClusterSnapshot, avoid: Collection[str] = frozenset()) -> list[MigrateOrder]:
        """``avoid``: instances that are no destination this round (see ``pair_instances``)."""
        return pair_instances(snapshot, self._config, avoid)

    def scale(
        self, snapshot: ClusterSnapshot, starting_count: int = 0, cancellable: Collection[str] | None = None
    ) -> ScalingDecision:
        """``cancellable``: the drains this scaler may cancel (see ``decide_scaling``)."""
        return decide_scaling(snapshot, self._config, starting_count, cancellable)
