"""Keeps one key registered in etcd, bound to a lease, for as long as its process runs, across lease loss.

A lease is lost when etcd was unreachable for longer than its TTL or when the process itself was stalled that long
(SIGSTOP, CPU starvation). The process is still alive, so it keeps serving and puts its key back under a new lease,
retrying etcd with exponential backoff until that succeeds; watchers may have seen the key vanish meanwhile and
tolerate it coming back. Llumlets keep their registry entry this way (``InstanceRegistration``), frontends theirs
(so the scheduler leader can tell every frontend about a lost instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.errors import EtcdError
from pyllumnix.infra.etcd.lease import Lease

log = logging.getLogger(__name__)

# The lease is renewed every TTL/3: a stall of up to 2/3 of the TTL, less one round trip, never loses it (with the
# default TTL of 6 s: stalls up to ~3.5 s are ridden out whenever they start). Not more often: a renewal costs ~1 ms of
# CPU in the holder and about as much in etcd, and at one a second per process they were ~15 % of a cluster's CPU per
# request in ``llumnix bench peers`` (docs/bench-peers/README.md, session 18); TTL 5 s renewed every 1 s rode out the
# same stalls.
RENEW_FRACTION = 1 / 3


class LeasedRegistration:
    """``key`` -> ``value`` in etcd, bound to a lease that is replaced whenever it is lost; ``name`` names the holder
    in log lines."""

    def __init__(
        self,
        client: EtcdClient,
        key: str,
        value: bytes,
        ttl: int,
        *,
        name: str,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.client = client
        self.key = key
        self.value = value
        self.ttl = ttl
        self.name = name
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
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"registration-{self.name}")

    def start_soon(self) -> None:
        """Registers in the background, retrying until etcd answers, then keeps the entry registered: for a process
        that serves without its key (a frontend), which must not fail to start because etcd is slow."""

        async def run() -> None:
            await self._register_retrying("registration attempt")
            log.info("%s registered under lease %x", self.name, self.lease.id if self.lease else 0)
            await self._keep()

        self._task = asyncio.get_running_loop().create_task(run(), name=f"registration-{self.name}")

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

    async def _put(self, lease: Lease) -> None:
        await self.client.put(self.key, self.value, lease=lease.id)

    async def _register_once(self) -> None:
        # A lease granted by a failed attempt is kept (and kept alive) for the next one instead of leaking.
        if self._spare is None or not self._spare.alive:
            self._spare = await Lease.grant(self.client, self.ttl, renew_every=self.ttl * RENEW_FRACTION)
        await self._put(self._spare)
        self.lease, self._spare = self._spare, None
        self.registrations += 1
        self.registered.set()

    async def _register_retrying(self, what: str) -> None:
        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.warning(
                "%s: %s %d failed (%s); next in %.1f s",
                self.name,
                what,
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

    async def _keep(self) -> None:
        while True:
            assert self.lease is not None
            await self.lease.lost.wait()
            if self._closing:
                return
            self.registered.clear()
            self.lease_losses += 1
            log.warning(
                "%s: lease %x lost (%s); still serving, re-registering under a new lease",
                self.name,
                self.lease.id,
                self.lease.lost_reason,
            )
            started = time.monotonic()
            await self._register_retrying("re-registration attempt")
            log.info(
                "%s registered again under lease %x after %.1f s", self.name, self.lease.id, time.monotonic() - started
            )
