"""Leader-aware, failover-aware unary calls over a set of gRPC endpoints (grpc.aio, insecure or TLS).

Retry rules (the one place they are decided; see :class:`CallKind`):

* ``READ`` calls (ListInstances, ListClusterRequests, GetConfig, GetLeader, GetMembership, Dispatch, Abort) are
  idempotent: on UNAVAILABLE, or DEADLINE_EXCEEDED while time is left, they are retried, with tenacity, at the next
  endpoint until the call's deadline or attempt budget is spent. Each attempt may use all the time left, so a read
  that runs out of it raises DeadlineExceededError (an endpoint that answers too slowly is not an unreachable one).
* ``WRITE`` calls (MigrateRequest, DrainInstance, Cordon/Uncordon, Scale, SetConfig) move to another endpoint only
  when they certainly did not start: the channel never became READY, so nothing was sent, or a replica refused them as
  a follower (FAILED_PRECONDITION with the "llumnix-leader" trailer), which the protocol guarantees applies nothing.
  An UNAVAILABLE or DEADLINE_EXCEEDED after sending is raised with ``may_have_started=True`` and never re-sent.
* Generate streams (:meth:`EndpointPool.ready_endpoint`) fail over only while looking for a READY frontend; once the
  stream is opened it is never re-submitted (the request may already be running).

A follower's refusal that names the leader is followed once at that address, which is then remembered and tried first
by later leader calls.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from pyllumnix.clients.errors import NoLeaderError, UnavailableError, from_rpc_error
from pyllumnix.infra import tracing

log = logging.getLogger(__name__)

R = TypeVar("R")

LEADER_METADATA_KEY = "llumnix-leader"
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 1.0

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Notice a restarted replica quickly; grpc's default backoff grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # The retry rules above are ours; grpc's transparent retries must not re-send a write behind our back.
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    # Liveness of a call's connection: a peer that vanished without closing it (host gone, no FIN) would otherwise hang
    # a Generate stream for ever (generate_timeout defaults to None). Pings go out only while a call is open; the
    # servers (infra/grpc_server.py) accept a client's pings during calls at most every MIN_RECV_PING_INTERVAL_MS
    # (10 s, past 2 strikes they close the connection), so one every 20 s stays within their policy. An unanswered
    # ping fails the calls after 10 s: grpc times keepalive pings by keepalive_timeout_ms but other pings (the flow
    # control's, which a keepalive ping then waits behind) by ping_timeout_ms, 60 s unless set.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)

# A READ that fails with less time than this left is not retried (no attempt could finish in it).
_DEADLINE_SLACK = 0.05
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_SCHEMES = ("grpc://", "grpcs://", "http://", "https://")


class CallKind(enum.Enum):
    """How a failed call may be retried (module docstring)."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class TlsConfig:
    """TLS material for the channels; every field optional (no root certs: the system trust store)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    # Secrets stay out of repr (logs, tracebacks, debuggers print it).
    private_key: bytes | None = field(default=None, repr=False)
    server_name_override: str | None = None
    # Sent as ``authorization: Bearer <key>`` on every call (grpc sends call credentials over TLS only).
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Checks the API key here: grpc refuses a metadata value with other characters only when a call is sent, and
        reports it as an unreachable cluster after every retry."""
        if self.api_key is None:
            return
        key = self.api_key.strip()  # a trailing newline from a file or a shell variable is no part of the key
        if self.api_key and not key:
            raise ValueError("the API key is blank")
        bad = [i for i, ch in enumerate(key) if not "!" <= ch <= "~"]
        if bad:
            raise ValueError(
                f"the API key has a character that is not printable ASCII (at position {bad[0]}; spaces, control "
                "characters and non-ASCII letters cannot go in an authorization header)"
            )
        object.__setattr__(self, "api_key", key or None)

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        api_key: str | None = None,
    ) -> TlsConfig:
        """Reads PEM files; a client certificate needs its key and vice versa."""
        if (cert is None) != (key is None):
            raise ValueError("a client certificate and its key must be given together")
        return cls(
            root_certificates=Path(ca).read_bytes() if ca else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
            private_key=Path(key).read_bytes() if key else None,
            server_name_override=server_name or None,
            api_key=api_key or None,
        )

    def credentials(self) -> Any:
        ssl_creds = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
        if not self.api_key:
            return ssl_creds
        return grpc.composite_channel_credentials(ssl_creds, grpc.access_token_call_credentials(self.api_key))

    def options(self) -> list[tuple[str, str]]:
        if self.server_name_override:
            return [("grpc.ssl_target_name_override", self.server_name_override)]
        return []


def _plaintext_hint(details: str) -> str:
    """Why a plaintext channel may have failed ('; ' first; else ''): a TLS server closes the connection on a
    plaintext client's first bytes, which the client reports only as "Socket closed" (or a reset), naming no TLS."""
    text = details.lower()
    if not any(sign in text for sign in ("socket closed", "connection reset", "handshake")):
        return ""
    return (
        "; the server closed the connection: it may require TLS, and this client connects in plaintext "
        "(give it the cluster's CA and a client certificate: llmctl --ca/--cert/--key, or no --endpoint to use the "
        "client context `llumnix serve` wrote)"
    )


def check_host_port(endpoint: str, given: str) -> None:
    """Raises ValueError unless ``endpoint`` is ``host:port`` or ``[ipv6]:port`` with a port in 1..65535: grpc takes a
    larger port modulo 65536 and reports a malformed one only as an unreachable endpoint."""
    if endpoint.startswith("["):
        host, sep, rest = endpoint[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"endpoint must be host:port or [ipv6]:port, got {given!r}")
        port = rest[1:]
    else:
        host, sep, port = endpoint.rpartition(":")
        if not sep:
            raise ValueError(f"endpoint must be host:port, got {given!r}")
        if ":" in host:
            raise ValueError(f"endpoint {given!r}: an IPv6 address goes in brackets, e.g. [::1]:{port}")
    if not host:
        raise ValueError(f"endpoint must be host:port, got {given!r}: the host is missing")
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535:
        raise ValueError(f"endpoint {given!r}: the port must be a number from 1 to 65535, got {port!r}")


def normalize_endpoints(endpoints: str | Iterable[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["grpc://a:1", "b:2"]`` -> ``["a:1", "b:2"]`` (order kept, duplicates dropped)."""
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for item in items:
        for raw in item.split(","):
            ep = raw.strip()
            for scheme in _SCHEMES:
                if ep.startswith(scheme):
                    ep = ep[len(scheme) :]
            ep = ep.rstrip("/")
            if not ep:
                continue
            check_host_port(ep, raw.strip())
            if ep not in out:
                out.append(ep)
    return out


def leader_from_error(exc: grpc.aio.AioRpcError) -> str | None:
    """The leader named by a follower's refusal: None when this is not such a refusal, "" when the leader is unknown."""
    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def describe(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


class _TryNext(Exception):
    """An attempt failed in a way that is safe to retry elsewhere."""

    def __init__(self, address: str, reason: str, *, no_leader: bool = False) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason
        self.no_leader = no_leader


class EndpointPool:
    """Channels to a fixed list of endpoints (plus leader addresses learned from redirects), opened lazily.

    Not thread-safe: use it from one event loop (the sync client runs one private loop for this reason).
    """

    def __init__(
        self,
        endpoints: str | Iterable[str],
        *,
        tls: TlsConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        rounds: int = 2,
        role: str = "scheduler",
    ) -> None:
        self._endpoints = normalize_endpoints(endpoints)
        if not self._endpoints:
            raise ValueError(f"at least one {role} endpoint is required")
        if timeout <= 0 or connect_timeout <= 0 or rounds < 1:
            raise ValueError("timeout and connect_timeout must be positive, rounds >= 1")
        self.tls = tls
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.rounds = rounds
        self.role = role
        self._index = 0
        self._leader: str | None = None
        self._channels: dict[str, Any] = {}
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    @property
    def current(self) -> str:
        return self._endpoints[self._index]

    @property
    def leader_hint(self) -> str | None:
        """The leader address learned from the latest redirect (None when unknown)."""
        return self._leader

    def channel(self, address: str) -> Any:
        """The grpc.aio channel to ``address`` (opened on first use, inside the running loop)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        ch = self._channels.get(address)
        if ch is None:
            options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
            traced = tracing.client_interceptors() or None  # W3C traceparent on every call when tracing is on
            if self.tls is not None:
                options += self.tls.options()
                ch = grpc.aio.secure_channel(address, self.tls.credentials(), options=options, interceptors=traced)
            else:
                ch = grpc.aio.insecure_channel(address, options=options, interceptors=traced)
            self._channels[address] = ch
        return ch

    async def wait_ready(self, address: str, timeout: float) -> str:
        """Connects to ``address``; returns "READY" or why not (a channel state name or "timeout")."""
        ch = self.channel(address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        state = ch.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                return str(state.name)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "timeout"
            try:
                await asyncio.wait_for(ch.wait_for_state_change(state), remaining)
            except TimeoutError:
                return "timeout"
            state = ch.get_state(try_to_connect=True)
        return "READY"

    def _failed(self, address: str) -> None:
        if address == self._leader:
            self._leader = None
        if self._endpoints[self._index] == address:
            self._index = (self._index + 1) % len(self._endpoints)

    def _next_target(self, prefer_leader: bool, skip: set[str]) -> str:
        if prefer_leader and self._leader is not None and self._leader not in skip:
            return self._leader
        return self._endpoints[self._index]

    async def call(
        self,
        invoke: Callable[[Any, float], Awaitable[R]],
        *,
        what: str,
        kind: CallKind,
        prefer_leader: bool = False,
        timeout: float | None = None,
    ) -> R:
        """Runs ``invoke(channel, seconds_left)`` under the retry rules of ``kind``; raises a LlumnixError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        per_round = len(self._endpoints) + (1 if prefer_leader else 0)
        max_attempts = per_round * self.rounds
        failures: list[_TryNext] = []
        skip: set[str] = set()

        def stop(state: RetryCallState) -> bool:
            return state.attempt_number >= max_attempts or loop.time() >= deadline

        def wait(state: RetryCallState) -> float:
            # No pause while other endpoints are left to try; a short backoff between rounds.
            if state.attempt_number % per_round:
                return 0.0
            backoff = min(0.05 * 2.0 ** (state.attempt_number // per_round - 1), 0.5)
            return max(min(backoff, deadline - loop.time()), 0.0)

        def before_retry(state: RetryCallState) -> None:
            if state.attempt_number % per_round == 0:
                skip.clear()

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_TryNext),
            stop=stop,
            wait=wait,
            before_sleep=before_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    target = self._next_target(prefer_leader, skip)
                    try:
                        return await self._attempt(invoke, target, what, kind, prefer_leader, deadline)
                    except _TryNext as err:
                        failures.append(err)
                        skip.add(err.address)
                        self._failed(err.address)
                        log.debug("%s on %s failed, trying elsewhere: %s", what, err.address, err.reason)
                        raise
        except _TryNext:
            pass
        tried = list(dict.fromkeys([*self._endpoints, *(f.address for f in failures)]))
        last = failures[-1].reason if failures else "deadline exceeded"
        if failures and all(f.no_leader for f in failures):
            raise NoLeaderError(
                f"{what}: no {self.role} leader reachable via [{', '.join(tried)}] (last: {last})",
                endpoints=tried,
                details=last,
            )
        last += self._tls_hint(last)
        raise UnavailableError(
            f"{what}: no {self.role} reachable at [{', '.join(tried)}] (last error: {last})",
            endpoints=tried,
            details=last,
        )

    def _tls_hint(self, details: str) -> str:
        """The reason a TLS channel failed, when we can name it ('; ' first; else ''): the client's own certificate
        expired or from another CA, the server's not from the trusted CA. A refused client certificate otherwise
        reads only "Socket closed"."""
        if self.tls is None:
            return _plaintext_hint(details)
        from pyllumnix.infra.security.tls import describe_tls_failure

        hint = describe_tls_failure(details, self.tls.certificate_chain, self.tls.root_certificates)
        return f"; {hint}" if hint else ""

    async def _attempt(
        self,
        invoke: Callable[[Any, float], Awaitable[R]],
        target: str,
        what: str,
        kind: CallKind,
        prefer_leader: bool,
        deadline: float,
    ) -> R:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _TryNext(target, "deadline exceeded before the call was sent")
        ready = await self.wait_ready(target, min(self.connect_timeout, remaining))
        # A READ may go out on a failed channel: grpc fails it at once without sending, with the cause in its details.
        if ready != "READY" and not (kind is CallKind.READ and ready == "TRANSIENT_FAILURE"):
            raise _TryNext(target, f"could not connect ({ready})")
        try:
            return await invoke(self.channel(target), max(deadline - loop.time(), 0.001))
        except grpc.aio.AioRpcError as exc:
            leader = leader_from_error(exc)
            if leader is not None:
                return await self._follow(invoke, target, leader, what, kind, deadline)
            raise self._classify(exc, target, kind, deadline) from None

    async def _follow(
        self,
        invoke: Callable[[Any, float], Awaitable[R]],
        follower: str,
        leader: str,
        what: str,
        kind: CallKind,
        deadline: float,
    ) -> R:
        """One retry at the leader a follower named (a refused call applied nothing, so this is always safe)."""
        if not leader or leader == follower:
            raise _TryNext(follower, "replica is not the leader and knows no leader", no_leader=True)
        self._leader = leader
        log.debug("%s: %s redirected to leader %s", what, follower, leader)
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        ready = await self.wait_ready(leader, min(self.connect_timeout, max(remaining, 0.0)))
        if ready != "READY":
            raise _TryNext(leader, f"could not connect to the leader named by {follower} ({ready})", no_leader=True)
        try:
            return await invoke(self.channel(leader), max(deadline - loop.time(), 0.001))
        except grpc.aio.AioRpcError as exc:
            moved = leader_from_error(exc)
            if moved is not None:
                # Leadership moved again; the next attempt starts from the newly named leader (if any).
                self._leader = moved or None
                raise _TryNext(leader, f"leader moved to {moved or 'unknown'}", no_leader=True) from None
            raise self._classify(exc, leader, kind, deadline) from None

    def _classify(self, exc: grpc.aio.AioRpcError, address: str, kind: CallKind, deadline: float) -> Exception:
        """A retryable failure (_TryNext) or the error to raise. Each attempt is given all the time left, so a READ
        that timed out with the deadline spent is DeadlineExceededError, not a reason to try elsewhere (the retry
        loop would stop at once and call the cluster unreachable); one that still has time (the server's own
        DEADLINE_EXCEEDED) is retried."""
        code = exc.code()
        if kind is CallKind.READ and code in _TRANSIENT:
            time_left = deadline - asyncio.get_running_loop().time() > _DEADLINE_SLACK
            if code == grpc.StatusCode.UNAVAILABLE or time_left:
                return _TryNext(address, describe(exc))
        return from_rpc_error(exc, endpoint=address, endpoints=[address], may_have_started=kind is CallKind.WRITE)

    async def ready_endpoint(self, timeout: float | None = None) -> tuple[str, Any]:
        """A READY endpoint and its channel, for calls that must not be re-sent once started (Generate).

        Only the connection is retried here, so a caller that then starts its stream on the returned channel sends it
        exactly once.
        """
        loop = asyncio.get_running_loop()
        budget = timeout if timeout is not None else self.timeout
        deadline = loop.time() + budget
        reasons: list[str] = []
        for round_no in range(self.rounds):
            for _ in range(len(self._endpoints)):
                address = self.current
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                ready = await self.wait_ready(address, min(self.connect_timeout, remaining))
                if ready == "READY":
                    return address, self.channel(address)
                reasons.append(f"{address}: {ready}")
                self._failed(address)
            if round_no + 1 < self.rounds and deadline - loop.time() > 0:
                await asyncio.sleep(min(0.1 * 2**round_no, max(deadline - loop.time(), 0.0)))
        hint = self._tls_hint("; ".join(reasons))
        recent = "; ".join(reasons[-3:]) or "timeout"
        raise UnavailableError(
            f"no {self.role} reachable at [{', '.join(self._endpoints)}] ({recent}{hint})",
            endpoints=self._endpoints,
            details="; ".join(reasons) + hint,
            may_have_started=False,
        )

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()

    async def __aenter__(self) -> EndpointPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def endpoints_or_none(endpoints: str | Sequence[str] | None) -> list[str] | None:
    """Normalized endpoints, or None when nothing was given."""
    if endpoints is None:
        return None
    out = normalize_endpoints(endpoints)
    return out or None
