"""One etcd key holding a serialized protobuf (the cluster config), with compare-and-swap on its revision.

A value that does not parse (written by a foreign tool, a truncated write, another schema) is never fatal: ``get``
raises :class:`UndecodableValueError`, ``watch`` logs it once per revision and skips it, so the watchers keep their
last good value and see the next valid write at once, instead of failing and restarting on the same bad value.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.errors import ConfigConflictError, UndecodableValueError
from pyllumnix.infra.etcd.watch import EventType, Watch

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class ConfigStore(Generic[M]):
    """``get``/``put``/``watch`` of one message of type ``message_type`` at ``key``; revision 0 means absent."""

    def __init__(self, client: EtcdClient, key: str, message_type: type[M]) -> None:
        self.client = client
        self.key = key
        self.message_type = message_type

    def _parse(self, data: bytes, revision: int) -> M:
        msg = self.message_type()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise UndecodableValueError(self.key, revision, self.message_type.DESCRIPTOR.full_name, str(exc)) from exc
        return msg

    async def get(self) -> tuple[M | None, int]:
        """The stored message and its mod revision, or ``(None, 0)``; UndecodableValueError if it does not parse."""
        kv = await self.client.get(self.key)
        return (self._parse(kv.value, kv.mod_revision), kv.mod_revision) if kv is not None else (None, 0)

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
        """The current value first, then every change (``None`` after a delete), each with its revision.

        An undecodable value is logged (once per revision) and skipped: nothing is yielded for it.
        """
        skipped: set[int] = set()
        async with Watch(self.client, self.key, initial_snapshot=True) as w:
            async for ev in w:
                kv = ev.snapshot[0] if ev.type is EventType.RESYNC and ev.snapshot else ev.kv
                if ev.type is EventType.DELETE or kv is None:
                    yield None, 0 if ev.type is EventType.RESYNC else ev.revision
                    continue
                try:
                    message = self._parse(kv.value, kv.mod_revision)
                except UndecodableValueError as exc:
                    if kv.mod_revision not in skipped:
                        skipped.add(kv.mod_revision)
                        log.error("%s; ignored (the last valid value stays in effect)", exc)
                    continue
                yield message, kv.mod_revision
