"""Leader election on plain KV + Txn + leases, with the lease kept alive (etcd3aio's election never renewed it).

Each candidate creates ``<prefix><lease id hex>`` bound to its own lease; the key with the lowest create_revision is
the leader. A candidate waits for the deletion of the key created just before its own (no thundering herd), then
checks again. A leader steps down (``lost`` set, ``is_leader`` False) when its key disappears or its lease is lost;
the lease counts as lost a full TTL after the last renewal was sent, which is no later than etcd's own expiry, so an
old leader stops acting as leader before a successor can win (the successor wins within about 2 x TTL).
``Election.depose`` revokes a leader's lease for a caller that knows the leader's process is gone (the scheduler's
followers: its port refuses connections), so a dead leader is replaced without waiting for its TTL. A failed campaign
attempt backs off exponentially (with jitter) instead of retrying in a tight loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from pyllumnix.infra.etcd.client import (
    EtcdClient,
    KeyValue,
    cmp_create_revision,
    op_get,
    op_put,
    to_bytes,
)
from pyllumnix.infra.etcd.errors import EtcdError, EtcdLeaseNotFoundError
from pyllumnix.infra.etcd.keys import prefix_range_end
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.watch import EventType, Watch, watch_prefix
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads: its election key, the value it proclaimed (e.g. its gRPC address) and its key's revision."""

    key: bytes
    value: bytes
    create_revision: int
    lease: int

    @classmethod
    def from_kv(cls, kv: KeyValue) -> LeaderInfo:
        return cls(kv.key, kv.value, kv.create_revision, kv.lease)


class Leadership:
    """Held by the campaign winner until ``resign()``, key deletion or lease loss (then ``lost`` is set)."""

    def __init__(self, client: EtcdClient, key: bytes, value: bytes, revision: int, lease: Lease) -> None:
        self.client = client
        self.key = key
        self.value = value
        self.revision = revision
        self.lease = lease
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._hold_watch = Watch(client, key, start_revision=revision + 1)
        self._monitor = asyncio.create_task(self._watch_hold(), name=f"leadership-{key.decode(errors='replace')}")

    @property
    def is_leader(self) -> bool:
        return not self.lost.is_set() and self.lease.alive

    async def proclaim(self, value: bytes) -> None:
        """Changes the leader's advertised value, only while this key is still ours."""
        result = await self.client.txn(
            [cmp_create_revision(self.key, self.revision)], [op_put(self.key, value, lease=self.lease.id)]
        )
        if not result.succeeded:
            self._step_down("election key replaced or deleted")
            raise EtcdError("proclaim failed: leadership lost")
        self.value = value

    async def resign(self) -> None:
        """Gives up leadership at once: deletes the key (revoking the lease) so a successor takes over now."""
        self._step_down("resigned")
        await self._stop_monitor()
        await self.lease.revoke(best_effort=True)

    def _step_down(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            if reason != "resigned":
                log.warning("leadership %s lost: %s", self.key.decode(errors="replace"), reason)

    async def _stop_monitor(self) -> None:
        self._hold_watch.abort()
        if self._monitor is not asyncio.current_task():
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor

    async def _watch_hold(self) -> None:
        """Steps down on lease loss or deletion of our key, then releases the lease so a successor need not wait."""
        key_gone = asyncio.create_task(_until_deleted(self._hold_watch, self.key))
        lease_lost = asyncio.create_task(self.lease.lost.wait())
        try:
            done, _ = await asyncio.wait({key_gone, lease_lost}, return_when=asyncio.FIRST_COMPLETED)
            if lease_lost in done:
                self._step_down(f"lease lost ({self.lease.lost_reason})")
            elif key_gone.cancelled() or key_gone.exception() is not None:
                failure = "cancelled" if key_gone.cancelled() else repr(key_gone.exception())
                self._step_down(f"cannot watch the election key: {failure}")
            else:
                self._step_down("election key deleted")
        finally:
            await _stop(self._hold_watch, key_gone, lease_lost)
        await self.lease.revoke(best_effort=True)


async def _until_deleted(watch: Watch, key: bytes) -> None:
    """Returns once ``key`` is deleted (or gone from a resync snapshot), or when the watch is aborted."""
    async for ev in watch:
        if ev.type is EventType.DELETE:
            return
        if ev.type is EventType.RESYNC and not any(kv.key == key for kv in ev.snapshot):
            return


async def _back_off(delay: float, limit: float) -> float:
    """Sleeps ``delay`` with +-25 % jitter (candidates that failed together retry apart); returns the next delay."""
    await asyncio.sleep(delay * random.uniform(0.75, 1.25))
    return min(delay * 2, limit)


async def _stop(watch: Watch, *tasks: asyncio.Task[object]) -> None:
    """Aborts the watch (grpc may not honour a task cancellation alone) and cancels and reaps the tasks."""
    watch.abort()
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, EtcdError):
            await t


class Election:
    """Candidates for one role under ``prefix`` (see ``KeyLayout.election_prefix``)."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        *,
        ttl: int = 2,
        renew_every: float | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 2.0,
    ) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"election prefix must end with '/': {prefix!r}")
        if not 0 < retry_initial <= retry_max:
            raise ValueError(f"need 0 < retry_initial <= retry_max, got {retry_initial}, {retry_max}")
        self.client = client
        self.prefix = to_bytes(prefix)
        self.ttl = ttl
        # Keep-alive period of a candidate's lease (None: TTL/3); a stall up to TTL - renew_every is survived.
        self.renew_every = renew_every
        self.retry_initial = retry_initial
        self.retry_max = retry_max

    async def _candidates(self) -> tuple[list[KeyValue], int]:
        resp = await self.client.range(
            rpc_pb2.RangeRequest(
                key=self.prefix,
                range_end=prefix_range_end(self.prefix),
                sort_order=rpc_pb2.RangeRequest.ASCEND,
                sort_target=rpc_pb2.RangeRequest.CREATE,
            )
        )
        return [KeyValue.from_pb(kv) for kv in resp.kvs], int(resp.header.revision)

    async def leader(self) -> LeaderInfo | None:
        """The current leader, or None while there is none."""
        resp = await self.client.range(
            rpc_pb2.RangeRequest(
                key=self.prefix,
                range_end=prefix_range_end(self.prefix),
                sort_order=rpc_pb2.RangeRequest.ASCEND,
                sort_target=rpc_pb2.RangeRequest.CREATE,
                limit=1,
            )
        )
        return LeaderInfo.from_kv(KeyValue.from_pb(resp.kvs[0])) if resp.kvs else None

    async def campaign(self, value: bytes) -> Leadership:
        """Blocks until this candidate leads; retries through etcd outages and lease loss (cancel to give up).

        Failed attempts back off exponentially with jitter (``retry_initial`` doubling up to ``retry_max``), so an
        etcd outage or a lease lost again and again costs a few calls per second, not a tight loop of grants.
        """
        backoff = self.retry_initial
        while True:
            try:
                lease = await Lease.grant(self.client, self.ttl, renew_every=self.renew_every)
            except EtcdError as exc:
                log.warning("campaign on %r: lease grant failed, retrying in %.2fs: %s", self.prefix, backoff, exc)
                backoff = await _back_off(backoff, self.retry_max)
                continue
            try:
                leadership = await self._campaign_with(lease, value)
            except asyncio.CancelledError:
                await asyncio.shield(lease.revoke(best_effort=True))
                raise
            except EtcdError as exc:
                log.warning("campaign on %r failed, retrying in %.2fs: %s", self.prefix, backoff, exc)
                await lease.revoke(best_effort=True)
                backoff = await _back_off(backoff, self.retry_max)
                continue
            if leadership is not None:
                return leadership
            log.info("campaign on %r: lease %x lost while waiting; retrying in %.2fs", self.prefix, lease.id, backoff)
            await lease.revoke(best_effort=True)
            backoff = await _back_off(backoff, self.retry_max)

    async def depose(self, leader: LeaderInfo) -> bool:
        """Revokes a leader's lease (its key vanishes, the next candidate wins at once); False if already gone.

        Only for a leader known to be dead (its process no longer accepts connections): a live leader that is merely
        slow must be left to its lease, which it steps down on by itself. A leader that is in fact alive sees its key
        deleted (and its next keep-alive refused) and steps down, so even a wrong call leaves at most one leader.
        """
        try:
            await self.client.lease_revoke(leader.lease)
        except EtcdLeaseNotFoundError:
            return False
        log.warning("deposed the leader holding %s (lease %x)", leader.key.decode(errors="replace"), leader.lease)
        return True

    async def _campaign_with(self, lease: Lease, value: bytes) -> Leadership | None:
        """Leadership, or None if the lease was lost while waiting (the caller starts over with a new lease)."""
        key = self.prefix + f"{lease.id:016x}".encode()
        # Create-if-absent; the failure branch reads the key, so a retried attempt finds its own earlier write.
        result = await self.client.txn(
            [cmp_create_revision(key, 0)], [op_put(key, value, lease=lease.id)], [op_get(key)]
        )
        if result.succeeded:
            my_revision = result.revision
        else:
            kvs = result.responses[0].response_range.kvs
            if not kvs or kvs[0].lease != lease.id:
                return None
            my_revision = int(kvs[0].create_revision)
        while lease.alive:
            candidates, revision = await self._candidates()
            mine = [i for i, kv in enumerate(candidates) if kv.key == key]
            if not mine:
                return None
            if mine[0] == 0:
                return Leadership(self.client, key, value, my_revision, lease)
            predecessor = candidates[mine[0] - 1].key
            watch = Watch(self.client, predecessor, start_revision=revision + 1)
            gone = asyncio.create_task(_until_deleted(watch, predecessor))
            lost = asyncio.create_task(lease.lost.wait())
            try:
                await asyncio.wait({gone, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await _stop(watch, gone, lost)
        return None

    async def observe(self) -> AsyncGenerator[LeaderInfo | None, None]:
        """The current leader (None: none), then each change of leader or of its value."""
        candidates: dict[bytes, KeyValue] = {}
        last: LeaderInfo | None = None
        first = True
        async with watch_prefix(self.client, self.prefix, initial_snapshot=True) as w:
            async for ev in w:
                if ev.type is EventType.RESYNC:
                    candidates = {kv.key: kv for kv in ev.snapshot}
                elif ev.kv is not None and ev.type is EventType.PUT:
                    candidates[ev.kv.key] = ev.kv
                elif ev.kv is not None:
                    candidates.pop(ev.kv.key, None)
                best = min(candidates.values(), key=lambda kv: kv.create_revision, default=None)
                current = LeaderInfo.from_kv(best) if best is not None else None
                if first or current != last:
                    first = False
                    last = current
                    yield current
