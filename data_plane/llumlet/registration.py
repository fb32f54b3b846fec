"""Keeps a llumlet registered in etcd for as long as it runs, across lease loss (``infra.etcd.registration``).

The instance is still alive when its lease is lost (etcd unreachable, or the process stalled, for longer than the TTL)
and still holds its requests, so it keeps serving and puts its registry entry back under a new lease, with the same
instance id and the same ``InstanceInfo``. Meanwhile the scheduler may have seen the entry vanish; it tolerates the
same id coming back.
"""

from __future__ import annotations

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.registration import RENEW_FRACTION, LeasedRegistration
from pyllumnix.infra.etcd.registry import InstanceRegistry

__all__ = ["RENEW_FRACTION", "InstanceRegistration"]


class InstanceRegistration(LeasedRegistration):
    """One instance's registry entry, bound to a lease that is replaced whenever it is lost."""

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        instance_id: str,
        value: bytes,
        ttl: int,
        *,
        max_backoff_s: float = 5.0,
    ) -> None:
        super().__init__(
            client,
            layout.instance_key(instance_id),
            value,
            ttl,
            name=f"instance {instance_id}",
            max_backoff_s=max_backoff_s,
        )
        self.registry = InstanceRegistry(client, layout)
        self.instance_id = instance_id

    async def _put(self, lease: Lease) -> None:
        await self.registry.register(self.instance_id, self.value, lease)
