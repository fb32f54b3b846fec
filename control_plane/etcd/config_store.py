"""One etcd key holding a serialized protobuf (the cluster config), with compare-and-swap on its revision."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Generic, TypeVar

from google.protobuf.message import Message

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.errors import ConfigConflictError
from pyllumnix.control_plane.etcd.watch import EventType, Watch

M = TypeVar("M", bound=Message)


class ConfigStore(Generic[M]):
    """``get``/``put``/``watch`` of one message of type ``message_type`` at ``key``; revision 0 means absent."""

    def __init__(self, client: EtcdClient, key: str, message_type: type[M]) -> None:
        self.client = client
        self.key = key
        self.message_type = message_type

    def _parse(self, data: bytes) -> M:
        msg = self.message_type()
        msg.ParseFromString(data)
        return msg

    async def get(self) -> tuple[M | None, int]:
        """The stored message and its mod revision, or ``(None, 0)``."""
        kv = await self.client.get(self.key)
        return (self._parse(kv.value), kv.mod_revision) if kv is not None else (None, 0)

    async def put(self, message: M, *, expected_revision: int | None = None) -> int:
        """Stores ``message``; with ``expected_revision`` only if the key is still at it (0: must not exist yet).

        Returns the new mod revision; raises ConfigConflictError when the key is not at ``expected_revision`` (also
        when an earlier attempt of this very call was applied but its answer lost: re-read and compare).
        """
        data = message.SerializeToString(deterministic=True)
        if expected_revision is None:
            return await self.client.put(self.key, data)
        cas = await self.client.put_if(self.key, data, mod_revision=expected_revision)
        if cas.succeeded:
            return cas.revision
        current = cas.current
        raise ConfigConflictError(self.key, expected_revision, current.mod_revision if current is not None else 0)

    async def watch(self) -> AsyncGenerator[tuple[M | None, int], None]:
        """The current value first, then every change (``None`` after a delete), each with its revision."""
        async with Watch(self.client, self.key, initial_snapshot=True) as w:
            async for ev in w:
                if ev.type is EventType.RESYNC:
                    kv = ev.snapshot[0] if ev.snapshot else None
                    yield (self._parse(kv.value), kv.mod_revision) if kv is not None else (None, 0)
                elif ev.type is EventType.PUT and ev.kv is not None:
                    yield self._parse(ev.kv.value), ev.kv.mod_revision
                else:
                    yield None, ev.revision
