"""The frontend's routing: where a new request goes. Ask the scheduler leader, or, when no leader is reachable, pick
from the registry alone.

The bypass keeps the cluster serving through a scheduler outage at the cost of placement quality: it balances by the
requests this dispatcher itself has in flight (it sees no load reports) and never migrates anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import grpc

from pyllumnix.clients.channel import CallKind, EndpointPool, TlsConfig
from pyllumnix.clients.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    LlumnixError,
    UnavailableError,
    from_rpc_error,
)
from pyllumnix.control_plane.frontend.dispatch import (
    Dispatcher,
    Readiness,
    RegistrySource,
    Releasing,
    public_cause,
)
from pyllumnix.infra import wire
from pyllumnix.infra.framed_calls import RETRY_AFTER_S, CallRoute
from pyllumnix.infra.security.runtime import open_framed_calls
from pyllumnix.protos.llumnix.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


class StaticRegistrySource:
    """A registry held in memory: for tests and fixed deployments; ``set`` replaces the list."""

    def __init__(self, infos: Iterable[common_pb2.InstanceInfo] = ()) -> None:
        self._infos = list(infos)

    def set(self, infos: Iterable[common_pb2.InstanceInfo]) -> None:
        self._infos = list(infos)

    async def instances(self) -> Sequence[common_pb2.InstanceInfo]:
        return list(self._infos)


class _Snapshot(Protocol):
    @property
    def entries(self) -> Mapping[str, bytes]: ...


class RegistryLister(Protocol):
    """What :class:`EtcdRegistrySource` needs of ``infra.etcd.registry.InstanceRegistry``."""

    async def list(self) -> _Snapshot: ...


class EtcdRegistrySource:
    """Instances read from the etcd registry (serialized InstanceInfo values), cached for ``max_age`` seconds.

    When etcd cannot be read, the last good list is used for up to ``stale_for`` seconds so a short etcd hiccup does
    not stop bypass dispatch; after that the failure is raised as :class:`UnavailableError` (never the etcd client's
    own exception, so callers map it to "unavailable, retry later" like any other).
    """

    def __init__(self, registry: RegistryLister, *, max_age: float = 0.5, stale_for: float = 10.0) -> None:
        self._registry = registry
        self.max_age = max_age
        self.stale_for = stale_for
        self._cache: list[common_pb2.InstanceInfo] = []
        self._read_at = float("-inf")

    async def instances(self) -> Sequence[common_pb2.InstanceInfo]:
        now = time.monotonic()
        if now - self._read_at <= self.max_age:
            return list(self._cache)
        try:
            snapshot = await self._registry.list()
        except Exception as exc:
            if now - self._read_at <= self.stale_for:
                log.warning("registry read failed; using the list from %.1fs ago", now - self._read_at)
                return list(self._cache)
            if isinstance(exc, LlumnixError):
                raise
            raise UnavailableError(f"instance registry unreadable: {exc}", details=str(exc)) from exc
        infos: list[common_pb2.InstanceInfo] = []
        for instance_id, value in sorted(snapshot.entries.items()):
            info = common_pb2.InstanceInfo()
            try:
                info.ParseFromString(value)
            except Exception:
                log.warning("registry entry %s is not an InstanceInfo; skipped", instance_id)
                continue
            if not info.instance_id:
                info.instance_id = instance_id
            infos.append(info)
        self._cache, self._read_at = infos, now
        return list(infos)


def _check(request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
    if not request_id:
        raise InvalidArgumentError("request_id is empty")
    if num_prompt_tokens <= 0 or max_tokens <= 0:
        raise InvalidArgumentError("num_prompt_tokens and max_tokens must be positive")


DISPATCH_METHOD = "/llumnix.v1.SchedulerService/Dispatch"
# The answers of a framed Dispatch that are the leader's decision (any other failure is retried over gRPC).
_FRAMED_FINAL = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT})


class LeaderDispatcher:
    """SchedulerService.Dispatch at the leader (redirects followed, failover on UNAVAILABLE; see channel.py).

    Dispatch is retried like a read: it only chooses an instance, nothing is started by it. With ``framed``, once a
    gRPC reply names the leader's framed listener (``dispatch_address``), further dispatches go there as framed calls
    (``infra.framed_calls``: a frame each way on one connection instead of a grpc.aio unary call, ~1 ms less CPU per
    request across both sides). Any failure there but the leader's own refusal (full, invalid) drops the connection
    and that dispatch goes over gRPC in the time left, whose rules (redirects, failover) find the leader and name its
    listener again; a listener that cannot be reached keeps dispatches on gRPC for ``infra.framed_calls.RETRY_AFTER_S``.
    """

    def __init__(
        self,
        scheduler_endpoints: str | Sequence[str] | EndpointPool,
        *,
        tls: TlsConfig | None = None,
        timeout: float = 2.0,
        framed: bool = False,
    ) -> None:
        if isinstance(scheduler_endpoints, EndpointPool):
            self.pool, self._owns_pool = scheduler_endpoints, False
        else:
            self.pool = EndpointPool(scheduler_endpoints, tls=tls, timeout=timeout, role="scheduler")
            self._owns_pool = True
        self.timeout = timeout
        self.framed = framed
        # The leader's framed listener, as its last gRPC reply named it (``dispatch_address``).
        self.route = CallRoute(lambda address, left: open_framed_calls(address, peer="scheduler", timeout=left))
        self.framed_dispatches = 0  # Dispatch calls sent, by transport
        self.grpc_dispatches = 0

    async def dispatch(
        self,
        request_id: str,
        priority: int,
        num_prompt_tokens: int,
        max_tokens: int,
        *,
        timeout: float | None = None,
    ) -> tuple[str, str]:
        request = scheduler_pb2.DispatchRequest(
            request_id=request_id,
            priority=wire.priority_to_pb(priority),
            num_prompt_tokens=num_prompt_tokens,
            max_tokens=max_tokens,
        )

        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        if self.route.address:
            answer = await self._dispatch_framed(request, deadline)
            if answer is not None:
                return answer.instance_id, answer.grpc_address

        async def invoke(channel: Any, left: float) -> scheduler_pb2.DispatchResponse:
            reply: scheduler_pb2.DispatchResponse = await scheduler_pb2_grpc.SchedulerServiceStub(channel).Dispatch(
                request, timeout=left
            )
            return reply

        self.grpc_dispatches += 1
        left = max(deadline - loop.time(), 0.001)
        reply = await self.pool.call(invoke, what="Dispatch", kind=CallKind.READ, prefer_leader=True, timeout=left)
        if self.framed:
            self.route.learn(reply.dispatch_address)
        return reply.instance_id, reply.grpc_address

    async def _dispatch_framed(
        self, request: scheduler_pb2.DispatchRequest, deadline: float
    ) -> scheduler_pb2.DispatchResponse | None:
        """The leader's answer over its framed listener; None when that failed in a way gRPC's rules handle (the
        caller then dispatches over gRPC in the time left); the leader's refusal (full, invalid) is raised as gRPC's
        would be."""
        loop = asyncio.get_running_loop()
        address = self.route.address
        try:
            channel = await self.route.channel((deadline - loop.time()) / 2)
        except (OSError, TimeoutError) as exc:  # refused, unreachable, a TLS failure: gRPC for a while
            log.info("framed dispatch at %s: no connection (%r); over gRPC for %gs", address, exc, RETRY_AFTER_S)
            self.route.unreachable()
            return None
        self.framed_dispatches += 1
        try:
            return await channel.call(DISPATCH_METHOD, request, scheduler_pb2.DispatchResponse, deadline - loop.time())
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FRAMED_FINAL:
                raise from_rpc_error(exc, endpoint=address, may_have_started=False) from None
            # The listener answered (e.g. no longer the leader): gRPC's reply names the leader's listener again.
            log.debug("framed dispatch at %s refused (%s); dispatching over gRPC", address, exc.code().name)
            self.route.forget()
        except TimeoutError:
            log.debug("framed dispatch at %s: no answer in time", address)
        except OSError as exc:  # the connection broke
            log.debug("framed dispatch at %s: %r; dispatching over gRPC", address, exc)
            self.route.broken(channel)
        return None

    async def readiness(self, *, timeout: float | None = None) -> Readiness:
        """Ready when the leader answers GetMembership (only a leader does) and lists an ACTIVE instance."""

        async def invoke(channel: Any, left: float) -> scheduler_pb2.GetMembershipResponse:
            reply: scheduler_pb2.GetMembershipResponse = await scheduler_pb2_grpc.SchedulerServiceStub(
                channel
            ).GetMembership(scheduler_pb2.GetMembershipRequest(), timeout=left)
            return reply

        try:
            reply = await self.pool.call(
                invoke, what="GetMembership", kind=CallKind.READ, prefer_leader=True, timeout=timeout or self.timeout
            )
        except LlumnixError as exc:
            return Readiness(False, f"scheduler leader: not answering ({public_cause(exc)})", str(exc))
        active = sum(1 for s in reply.instances if s.state == common_pb2.INSTANCE_STATE_ACTIVE)
        if not active:
            return Readiness(False, f"scheduler leader: no ACTIVE instance ({len(reply.instances)} known)")
        return Readiness(True, f"scheduler leader: {active} ACTIVE instance(s)")

    def release(self, instance_id: str) -> None:
        """Nothing to do: the leader counts requests from the instances' load reports."""

    async def close(self) -> None:
        self.route.drop()
        if self._owns_pool:
            await self.pool.close()


class BypassDispatcher:
    """Picks the registry instance with the fewest requests in flight through this dispatcher (ties: lowest id).

    Instances missing from the registry, or without a gRPC address, are never chosen. No migration happens here.
    """

    def __init__(
        self,
        registry: RegistrySource,
        *,
        refusal_cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.refusal_cooldown = refusal_cooldown
        self._clock = clock
        self._in_flight: Counter[str] = Counter()
        # instance id -> until when it is avoided (it refused a request: draining, cordoned, full).
        self._avoid: dict[str, float] = {}

    @property
    def in_flight(self) -> dict[str, int]:
        return {k: v for k, v in self._in_flight.items() if v > 0}

    async def dispatch(
        self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int
    ) -> tuple[str, str]:
        _check(request_id, num_prompt_tokens, max_tokens)
        infos = [i for i in await self.registry.instances() if i.instance_id and i.grpc_address]
        if not infos:
            raise UnavailableError("bypass dispatch: the registry lists no instance")
        now = self._clock()
        self._avoid = {k: until for k, until in self._avoid.items() if until > now}
        # Instances that just refused a request come last; if every instance did, the least loaded one is tried.
        best = min(infos, key=lambda i: (i.instance_id in self._avoid, self._in_flight[i.instance_id], i.instance_id))
        self.acquire(best.instance_id)
        return best.instance_id, best.grpc_address

    async def readiness(self) -> Readiness:
        """Ready when the registry can be read and lists an instance with a gRPC address."""
        try:
            infos = [i for i in await self.registry.instances() if i.instance_id and i.grpc_address]
        except Exception as exc:
            return Readiness(False, f"bypass: the registry cannot be read ({public_cause(exc)})", str(exc))
        if not infos:
            return Readiness(False, "bypass: the registry lists no instance")
        return Readiness(True, f"bypass: {len(infos)} registered instance(s)")

    def acquire(self, instance_id: str) -> None:
        """Counts a request placed on ``instance_id`` by someone else (the leader), so a later bypass sees it."""
        self._in_flight[instance_id] += 1

    def refused(self, instance_id: str) -> None:
        """The instance refused AddRequest: avoid it for ``refusal_cooldown`` seconds (the frontend then retries)."""
        self._avoid[instance_id] = self._clock() + self.refusal_cooldown

    def release(self, instance_id: str) -> None:
        if self._in_flight[instance_id] > 1:
            self._in_flight[instance_id] -= 1
        else:
            self._in_flight.pop(instance_id, None)


class FallbackDispatcher:
    """The leader with a short deadline; the bypass when it is unreachable, times out, or there is no leader.

    After a failure the leader is skipped for ``retry_leader_after`` seconds, so an outage does not add the leader
    deadline to every request. Every placement (either path) is counted in the bypass, so its balance is right from
    the first request after a failover.
    """

    def __init__(
        self,
        leader: Dispatcher,
        bypass: BypassDispatcher,
        *,
        leader_timeout: float = 0.5,
        retry_leader_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leader = leader
        self.bypass = bypass
        self.leader_timeout = leader_timeout
        self.retry_leader_after = retry_leader_after
        self._clock = clock
        self._leader_down_until = float("-inf")
        self.bypassed = 0

    @property
    def mode(self) -> str:
        """ "leader" or "bypass": which path the next dispatch will try first."""
        return "bypass" if self._clock() < self._leader_down_until else "leader"

    async def dispatch(
        self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int
    ) -> tuple[str, str]:
        if self.mode == "leader":
            try:
                async with asyncio.timeout(self.leader_timeout):  # not wait_for: no extra task per request
                    instance_id, address = await self._ask_leader(request_id, priority, num_prompt_tokens, max_tokens)
            except (UnavailableError, DeadlineExceededError, TimeoutError) as exc:
                log.warning("leader dispatch failed (%s); bypassing the scheduler", str(exc) or type(exc).__name__)
                self._leader_down_until = self._clock() + self.retry_leader_after
            else:
                self.bypass.acquire(instance_id)
                return instance_id, address
        self.bypassed += 1
        return await self.bypass.dispatch(request_id, priority, num_prompt_tokens, max_tokens)

    async def readiness(self) -> Readiness:
        """Ready when the leader can dispatch, or else the bypass can; the reason names both when neither can."""
        check = getattr(self.leader, "readiness", None)
        leader: Readiness | None = None
        if check is not None:
            try:
                if isinstance(self.leader, LeaderDispatcher):
                    answer = await self.leader.readiness(timeout=self.leader_timeout)
                else:
                    answer = await asyncio.wait_for(check(), self.leader_timeout)
            except Exception as exc:
                answer = Readiness(
                    False, f"scheduler leader: not answering ({public_cause(exc)})", str(exc) or type(exc).__name__
                )
            if answer.ready:
                return answer
            leader = answer
        bypass = await self.bypass.readiness()
        if bypass.ready or leader is None:
            return bypass
        detail = "; ".join(d for d in (leader.detail, bypass.detail) if d)
        return Readiness(False, f"{leader.reason}; {bypass.reason}", detail)

    def _ask_leader(
        self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int
    ) -> Awaitable[tuple[str, str]]:
        if isinstance(self.leader, LeaderDispatcher):
            return self.leader.dispatch(
                request_id, priority, num_prompt_tokens, max_tokens, timeout=self.leader_timeout
            )
        return self.leader.dispatch(request_id, priority, num_prompt_tokens, max_tokens)

    def release(self, instance_id: str) -> None:
        self.bypass.release(instance_id)
        if isinstance(self.leader, Releasing):
            self.leader.release(instance_id)

    def refused(self, instance_id: str) -> None:
        """Remembered by the bypass (the leader learns refusals from the instance's state in its load reports)."""
        self.bypass.refused(instance_id)


__all__ = [
    "BypassDispatcher",
    "EtcdRegistrySource",
    "FallbackDispatcher",
    "LeaderDispatcher",
    "StaticRegistrySource",
]
