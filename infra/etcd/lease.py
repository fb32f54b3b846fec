"""A lease with a keep-alive task that fails over between etcd members and reports loss conservatively.

The lease counts as lost (``lost`` is set) when etcd says so (keep-alive answers TTL <= 0, i.e. expired or revoked) or
when no renewal succeeded for a full TTL measured from the moment the last successful renewal was *sent*. That local
deadline never passes later than etcd's own expiry, so a holder (a leader, a registered instance) stops acting on the
lease before etcd can hand its keys to someone else. A lost lease is never renewed again; take a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from pyllumnix.infra.etcd.client import REQUIRE_LEADER, EtcdClient, describe, raise_if_cancelling
from pyllumnix.infra.etcd.errors import EtcdClosedError, EtcdError
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2

log = logging.getLogger(__name__)


class _StreamEnded(Exception):
    pass


class Lease:
    """A granted lease; renewed every ``renew_every`` seconds (default TTL/3) by a background task until revoked,
    lost or ``stop_keepalive``.

    A stall of this process (or an etcd outage) loses the lease once it outlasts TTL minus the time since the last
    renewal, so the renewal period bounds the stall that is always survived: TTL - renew_every.
    """

    def __init__(
        self,
        client: EtcdClient,
        lease_id: int,
        ttl: int,
        *,
        keepalive: bool = True,
        renew_every: float | None = None,
    ) -> None:
        self.client = client
        self.id = lease_id
        self.ttl = ttl
        self.renew_every = max(renew_every if renew_every is not None else ttl / 3.0, 0.1)
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._deadline = time.monotonic() + ttl
        self._keepalive: asyncio.Task[None] | None = None
        self._watchdog = asyncio.create_task(self._watch_deadline(), name=f"lease-{lease_id:x}-watchdog")
        if keepalive:
            self._keepalive = asyncio.create_task(self._keep_alive(), name=f"lease-{lease_id:x}-keepalive")

    @classmethod
    async def grant(
        cls, client: EtcdClient, ttl: int, *, keepalive: bool = True, renew_every: float | None = None
    ) -> Lease:
        """Grants a lease of ``ttl`` seconds (>= 1) and starts keeping it alive (every ``renew_every`` s, TTL/3)."""
        sent = time.monotonic()
        lease_id, granted = await client.lease_grant(ttl)
        lease = cls(client, lease_id, granted, keepalive=keepalive, renew_every=renew_every)
        lease._deadline = sent + granted
        return lease

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()

    def remaining(self) -> float:
        """Seconds until the local (conservative) expiry estimate; 0 once lost."""
        return 0.0 if self.lost.is_set() else max(0.0, self._deadline - time.monotonic())

    def stop_keepalive(self) -> None:
        """Stops renewing without revoking: the lease then expires in etcd within its TTL (and ``lost`` fires)."""
        task, self._keepalive = self._keepalive, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def revoke(self, *, best_effort: bool = False) -> None:
        """Revokes the lease (its keys vanish at once) and stops the tasks; ``best_effort`` swallows etcd errors."""
        self._mark_lost("revoked")
        await self._stop_tasks()
        try:
            await self.client.lease_revoke(self.id)
        except EtcdError as exc:
            if not best_effort and "lease not found" not in str(exc):
                raise
            log.debug("revoke of lease %x: %s", self.id, exc)

    async def close(self) -> None:
        """Best-effort revoke, for shutdown paths."""
        await self.revoke(best_effort=True)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            if reason != "revoked":
                log.warning("etcd lease %x lost: %s", self.id, reason)
            self.stop_keepalive()

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._keepalive, self._watchdog) if t is not None and t is not asyncio.current_task()]
        self._keepalive = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _watch_deadline(self) -> None:
        while not self.lost.is_set():
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._mark_lost(f"no successful keep-alive for {self.ttl}s")
                return
            await asyncio.sleep(left)

    def _renewing(self) -> bool:
        """Whether the keep-alive loop should go on: also checked so a stop is never lost to a swallowed cancel."""
        return not self.lost.is_set() and self._keepalive is asyncio.current_task()

    async def _keep_alive(self) -> None:
        interval = self.renew_every
        request = rpc_pb2.LeaseKeepAliveRequest(ID=self.id)
        backoff = 0.05
        while self._renewing():
            try:
                index, stubs = self.client.pick()
            except EtcdClosedError:
                return  # the client was closed: the watchdog reports the loss once the TTL has run out
            timeout = self.client.call_timeout
            call = stubs.lease.LeaseKeepAlive(metadata=REQUIRE_LEADER)
            try:
                while self._renewing():
                    sent = time.monotonic()
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that lands
                    # just as the answer arrives, and a cancelled keep-alive would then go on renewing.
                    async with asyncio.timeout(timeout):
                        await call.write(request)
                    async with asyncio.timeout(timeout):
                        resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise _StreamEnded("keep-alive stream closed by the server")
                    if resp.TTL <= 0:
                        self._mark_lost("expired or revoked in etcd (keep-alive returned TTL <= 0)")
                        return
                    self._deadline = max(self._deadline, sent + resp.TTL)
                    backoff = 0.05
                    await asyncio.sleep(interval)
            except Exception as exc:  # any failure of this stream: never let the keep-alive task die
                raise_if_cancelling(exc)
                # A write on a stream the server already ended raises InvalidStateError, not AioRpcError.
                expected = isinstance(
                    exc, grpc.aio.AioRpcError | TimeoutError | _StreamEnded | asyncio.InvalidStateError
                )
                (log.debug if expected else log.warning)(
                    "lease %x keep-alive on %s failed: %s", self.id, stubs.address, describe(exc)
                )
                self.client.failover(index)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.25)
            finally:
                call.cancel()
