"""Keeps a llumlet registered in etcd for as long as it runs, across lease loss.

A lease is lost when etcd was unreachable for longer than its TTL or when the process itself was stalled that long
(SIGSTOP, CPU starvation). The instance is still alive and still holds its requests, so it keeps serving and puts its
registry entry back under a new lease, with the same instance id and the same ``InstanceInfo``, retrying etcd with
exponential backoff until that succeeds. Meanwhile the scheduler may have seen the entry vanish; it tolerates the same
id coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.errors import EtcdError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.registry import InstanceRegistry

log = logging.getLogger(__name__)

# The lease is renewed every TTL/5 (not the default TTL/3): a stall of up to 4/5 of the TTL, less one round trip, never
# loses it (with the default TTL of 5 s: stalls up to ~3.5 s are ridden out whenever they start).
RENEW_FRACTION = 0.2


class InstanceRegistration:
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
        self.registry = InstanceRegistry(client, layout)
        self.client = client
        self.instance_id = instance_id
        self.value = value
        self.ttl = ttl
        self.max_backoff_s = max_backoff_s
        self.lease: Lease | None = None
        self.registrations = 0  # successful registrations (1 + re-registrations)
        self.lease_losses = 0
        # Set while the entry is bound to a live lease.
        self.registered = asyncio.Event()
        self._spare: Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Registers once (raises EtcdError if etcd cannot be reached at start), then keeps the entry registered."""
        await self._register_once()
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"registration-{self.instance_id}")

    async def close(self) -> None:
        """Stops re-registering and revokes the lease, so the entry vanishes at once (clean shutdown)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for lease in (self.lease, self._spare):
            if lease is not None:
                await lease.revoke(best_effort=True)
        self.registered.clear()

    async def _register_once(self) -> None:
        # A lease granted by a failed attempt is kept (and kept alive) for the next one instead of leaking.
        if self._spare is None or not self._spare.alive:
            self._spare = await Lease.grant(self.client, self.ttl, renew_every=self.ttl * RENEW_FRACTION)
        await self.registry.register(self.instance_id, self.value, self._spare)
        self.lease, self._spare = self._spare, None
        self.registrations += 1
        self.registered.set()

    async def _keep(self) -> None:
        while True:
            assert self.lease is not None
            await self.lease.lost.wait()
            if self._closing:
                return
            self.registered.clear()
            self.lease_losses += 1
            log.warning(
                "instance %s: lease %x lost (%s); still serving, re-registering under a new lease",
                self.instance_id,
                self.lease.id,
                self.lease.lost_reason,
            )
            started = time.monotonic()

            def note(state: RetryCallState) -> None:
                exc = state.outcome.exception() if state.outcome is not None else None
                log.warning(
                    "instance %s: re-registration attempt %d failed (%s); next in %.1f s",
                    self.instance_id,
                    state.attempt_number,
                    str(exc).split(" (last error")[0] if exc is not None else "?",
                    state.upcoming_sleep,
                )

            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(EtcdError),
                wait=wait_exponential(multiplier=0.2, max=self.max_backoff_s),
                before_sleep=note,
            ):
                with attempt:
                    await self._register_once()
            log.info(
                "instance %s registered again under lease %x after %.1f s",
                self.instance_id,
                self.lease.id,
                time.monotonic() - started,
            )
