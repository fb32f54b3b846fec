"""Instance registry: one lease-bound key per instance, so a dead instance's entry vanishes when its lease expires.

Values are opaque bytes (the project stores a serialized ``llumnix.v1.InstanceInfo``); the registry never parses
them, so the schema can evolve without touching this layer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.watch import EventType, Watch, watch_prefix


class RegistryEventType(enum.Enum):
    ADD = "add"
    UPDATE = "update"
    REMOVE = "remove"
    RESYNC = "resync"


@dataclass(frozen=True)
class RegistryEvent:
    """ADD/UPDATE/REMOVE of one instance, or RESYNC: ``snapshot`` is the full registry at ``revision``.

    ``mod_revisions`` gives each snapshot entry's own mod revision (with ``revision`` for ADD/UPDATE, it lets a
    consumer name a bad value by key and revision).
    """

    type: RegistryEventType
    revision: int
    instance_id: str = ""
    value: bytes = b""
    snapshot: Mapping[str, bytes] = field(default_factory=dict)
    mod_revisions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrySnapshot:
    entries: dict[str, bytes]
    revision: int


class RegistryWatch:
    """Async iterator of registry events; starts with a RESYNC snapshot unless a start revision was given."""

    def __init__(self, layout: KeyLayout, watch: Watch) -> None:
        self._layout = layout
        self.watch = watch

    def __aiter__(self) -> RegistryWatch:
        return self

    async def __anext__(self) -> RegistryEvent:
        ev = await self.watch.__anext__()
        if ev.type is EventType.RESYNC:
            snap = {self._layout.instance_id(kv.key): kv.value for kv in ev.snapshot}
            revs = {self._layout.instance_id(kv.key): kv.mod_revision for kv in ev.snapshot}
            return RegistryEvent(RegistryEventType.RESYNC, ev.revision, snapshot=snap, mod_revisions=revs)
        assert ev.kv is not None
        instance_id = self._layout.instance_id(ev.kv.key)
        if ev.type is EventType.DELETE:
            return RegistryEvent(RegistryEventType.REMOVE, ev.revision, instance_id)
        # version 1 is the key's creation (also after a delete and re-create).
        kind = RegistryEventType.ADD if ev.kv.version == 1 else RegistryEventType.UPDATE
        return RegistryEvent(kind, ev.revision, instance_id, ev.kv.value)

    def abort(self) -> None:
        """Stops the watch from any task (call it before cancelling a task that iterates this watch)."""
        self.watch.abort()

    async def aclose(self) -> None:
        await self.watch.aclose()

    async def __aenter__(self) -> RegistryWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class InstanceRegistry:
    """``<root>/<cluster>/instances/<instance_id>`` -> value, each key bound to its instance's lease."""

    def __init__(self, client: EtcdClient, layout: KeyLayout) -> None:
        self.client = client
        self.layout = layout

    async def register(self, instance_id: str, value: bytes, lease: Lease | int) -> int:
        """Creates or updates the entry bound to ``lease``; returns the store revision of the write."""
        lease_id = lease.id if isinstance(lease, Lease) else lease
        return await self.client.put(self.layout.instance_key(instance_id), value, lease=lease_id)

    async def deregister(self, instance_id: str) -> bool:
        """Removes the entry now (instead of waiting for its lease); returns whether it existed."""
        return await self.client.delete(self.layout.instance_key(instance_id)) > 0

    async def get(self, instance_id: str) -> bytes | None:
        kv = await self.client.get(self.layout.instance_key(instance_id))
        return kv.value if kv is not None else None

    async def list(self) -> RegistrySnapshot:
        result = await self.client.get_prefix(self.layout.instances_prefix)
        return RegistrySnapshot({self.layout.instance_id(kv.key): kv.value for kv in result.kvs}, result.revision)

    def watch(self, *, start_revision: int = 0) -> RegistryWatch:
        """Events from ``start_revision`` (> 0), or a RESYNC snapshot of the registry and every change after it."""
        w = watch_prefix(
            self.client,
            self.layout.instances_prefix,
            start_revision=start_revision,
            initial_snapshot=start_revision <= 0,
        )
        return RegistryWatch(self.layout, w)
