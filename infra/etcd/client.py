"""Asyncio etcd v3 client on grpc.aio with endpoint failover, short per-call deadlines and a bounded retry budget.

Our own stubs (protos/third_party/etcd) replace the ``etcd3`` package, which cannot import under protobuf 7. Every
unary call gets a deadline of at most ``call_timeout``; a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED) moves the
client to the next endpoint and retries with tenacity until ``retry_budget`` is spent, then raises
:class:`EtcdUnavailableError` naming every endpoint, so no caller ever hangs on a dead cluster.

A mutating call (put, txn) that timed out may still have been applied; callers that compare-and-swap must tolerate
finding their own earlier write (the election and the registry do).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from pyllumnix.infra.etcd.errors import (
    EtcdClosedError,
    EtcdCompactedError,
    EtcdLeaseNotFoundError,
    EtcdRequestError,
    EtcdUnavailableError,
)
from pyllumnix.infra.etcd.keys import prefix_range_end
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from pyllumnix.protos.third_party.etcd.api.mvccpb import kv_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Streams ask the member to refuse service while it has no raft leader (what etcd's Go client does), so a watch or a
# keep-alive on a member cut off from the quorum fails over instead of going silent.
REQUIRE_LEADER: tuple[tuple[str, str], ...] = (("hasleader", "true"),)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Reconnect quickly once a member is back; the defaults back off up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a silently dead peer on long-lived streams; etcd refuses pings more often than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 << 20),
)


@dataclass(frozen=True)
class KeyValue:
    """One etcd key-value pair with its revisions (a plain copy of ``mvccpb.KeyValue``)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> KeyValue:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True)
class RangeResult:
    """Keys of one range read and the store revision it was read at (watch from ``revision + 1`` to follow it)."""

    kvs: list[KeyValue]
    revision: int


@dataclass(frozen=True)
class CasResult:
    """Outcome of :meth:`EtcdClient.put_if`: ``revision`` of the write when it succeeded, else the key as it is."""

    succeeded: bool
    revision: int
    current: KeyValue | None


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[rpc_pb2.ResponseOp]


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd: the CA that signed the members' certificates and, for ``--client-cert-auth``, our certificate.

    Without ``cert``/``key`` the client still verifies etcd but shows no certificate (a member that requires client
    certificates then fails the handshake, reported as EtcdUnavailableError after the retry budget).
    """

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("an etcd client certificate and its key must be given together")

    @classmethod
    def from_files(
        cls,
        ca: str | Path,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> EtcdTls:
        return cls(
            ca=Path(ca).read_bytes(),
            cert=Path(cert).read_bytes() if cert else None,
            key=Path(key).read_bytes() if key else None,
            server_name=server_name or None,
        )

    def credentials(self) -> Any:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


class Stubs:
    """The gRPC channel to one endpoint and the stubs on it."""

    def __init__(self, address: str, tls: EtcdTls | None = None) -> None:
        self.address = address
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = [*CHANNEL_OPTIONS, *tls.options()]
            self.channel = grpc.aio.secure_channel(address, tls.credentials(), options=options)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)


def normalize_endpoint(endpoint: str) -> str:
    """``http://host:port`` or ``host:port`` -> ``host:port`` (the form grpc wants)."""
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme) :]
    endpoint = endpoint.rstrip("/")
    if not endpoint or ":" not in endpoint:
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return endpoint


def to_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


# etcd's refusal of a request stamped with an auth-store revision that changed before it applied (a user or role was
# added meanwhile: under serve's etcd auth, every certificate issued). The request had no effect, so it is retried
# on the same endpoint, as etcd's own client does.
STALE_AUTH_DETAILS = ("revision in header is old", "revision of auth store is old")


def is_stale_auth(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and any(d in (exc.details() or "") for d in STALE_AUTH_DETAILS)


def is_retried(exc: BaseException) -> bool:
    return is_transient(exc) or is_stale_auth(exc)


def raise_if_cancelling(exc: BaseException) -> None:
    """Restores a cancellation that grpc reported as AioRpcError(CANCELLED) instead of CancelledError.

    When the awaiting task is cancelled while its call is finishing, grpc.aio may raise the call's CANCELLED status;
    swallowing that would leave a cancelled task running (a watch reconnecting forever, a close that never returns).
    """
    task = asyncio.current_task()
    if (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() == grpc.StatusCode.CANCELLED
        and task is not None
        and task.cancelling()
    ):
        raise asyncio.CancelledError() from exc


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


def translate(what: str, exc: grpc.aio.AioRpcError) -> EtcdRequestError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return EtcdLeaseNotFoundError(what, code.name, details)
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return EtcdCompactedError(what, code.name, details)
    return EtcdRequestError(what, code.name, details)


class EndpointRing:
    """Which endpoint is current; a failure moves to the next one (pure logic, unit-tested)."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        self.index = 0

    @property
    def current(self) -> str:
        return self.endpoints[self.index]

    def failed(self, index: int) -> None:
        """Moves past ``index`` unless someone already moved (concurrent failures on one endpoint rotate once)."""
        if index == self.index:
            self.index = (self.index + 1) % len(self.endpoints)


class EtcdClient:
    """Unary KV/lease calls with failover; the watch and lease modules open their streams through :meth:`pick`.

    ``tls`` connects with TLS (and a client certificate, when it has one) to every endpoint; without it the channels
    are plaintext, as before.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        call_timeout: float = 0.5,
        retry_budget: float = 2.5,
        tls: EtcdTls | None = None,
    ) -> None:
        if call_timeout <= 0 or retry_budget <= 0:
            raise ValueError("call_timeout and retry_budget must be positive")
        self._ring = EndpointRing(endpoints)
        self.call_timeout = call_timeout
        self.retry_budget = retry_budget
        self.tls = tls
        self._stubs: dict[str, Stubs] = {}
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._ring.endpoints)

    @property
    def current_endpoint(self) -> str:
        return self._ring.current

    def pick(self) -> tuple[int, Stubs]:
        """The current endpoint's index and stubs (channels are opened lazily, inside the running loop)."""
        if self._closed:
            raise EtcdClosedError(f"EtcdClient for {self.endpoints} is closed")
        index = self._ring.index
        address = self._ring.endpoints[index]
        stubs = self._stubs.get(address)
        if stubs is None:
            stubs = self._stubs[address] = Stubs(address, self.tls)
        return index, stubs

    def failover(self, index: int) -> None:
        """Reports that the endpoint at ``index`` failed; the next :meth:`pick` returns another one."""
        before = self._ring.current
        self._ring.failed(index)
        if self._ring.current != before:
            log.debug("etcd endpoint %s failed, switching to %s", before, self._ring.current)

    async def close(self) -> None:
        self._closed = True
        stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            await s.channel.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, what: str, invoke: Callable[[Stubs, float], Awaitable[T]]) -> T:
        """Runs ``invoke(stubs, timeout)`` with failover and retries; raises EtcdUnavailableError after the budget."""
        start = time.monotonic()
        deadline = start + self.retry_budget
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(self.retry_budget),
                wait=wait_exponential(multiplier=0.02, max=0.25),
                retry=retry_if_exception(is_retried),
                reraise=True,
            ):
                with attempt:
                    index, stubs = self.pick()
                    timeout = max(0.05, min(self.call_timeout, deadline - time.monotonic()))
                    try:
                        return await invoke(stubs, timeout)
                    except grpc.aio.AioRpcError as exc:
                        if is_transient(exc):
                            self.failover(index)
                        raise
        except grpc.aio.AioRpcError as exc:
            raise_if_cancelling(exc)
            if is_transient(exc):
                raise EtcdUnavailableError(what, self.endpoints, time.monotonic() - start, describe(exc)) from exc
            raise translate(what, exc) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    # ---- KV ----

    async def range(self, request: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        return await self.call("range", lambda s, t: s.kv.Range(request, timeout=t))

    async def get(self, key: str | bytes) -> KeyValue | None:
        resp = await self.range(rpc_pb2.RangeRequest(key=to_bytes(key)))
        return KeyValue.from_pb(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str | bytes, *, revision: int = 0) -> RangeResult:
        """Every key under ``prefix`` (sorted by key) and the revision read at."""
        p = to_bytes(prefix)
        resp = await self.range(rpc_pb2.RangeRequest(key=p, range_end=prefix_range_end(p), revision=revision))
        return RangeResult([KeyValue.from_pb(kv) for kv in resp.kvs], resp.header.revision)

    async def put(self, key: str | bytes, value: bytes, *, lease: int = 0) -> int:
        """Writes ``key``; returns the new store revision. ``lease`` binds the key to a lease (0: none)."""
        req = rpc_pb2.PutRequest(key=to_bytes(key), value=value, lease=lease)
        resp = await self.call("put", lambda s, t: s.kv.Put(req, timeout=t))
        return int(resp.header.revision)

    async def delete(self, key: str | bytes) -> int:
        """Deletes one key; returns how many were deleted (0 or 1)."""
        req = rpc_pb2.DeleteRangeRequest(key=to_bytes(key))
        resp = await self.call("delete", lambda s, t: s.kv.DeleteRange(req, timeout=t))
        return int(resp.deleted)

    async def delete_prefix(self, prefix: str | bytes) -> int:
        p = to_bytes(prefix)
        req = rpc_pb2.DeleteRangeRequest(key=p, range_end=prefix_range_end(p))
        resp = await self.call("delete_prefix", lambda s, t: s.kv.DeleteRange(req, timeout=t))
        return int(resp.deleted)

    async def txn(
        self,
        compare: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> TxnResult:
        req = rpc_pb2.TxnRequest(compare=compare, success=success, failure=failure)
        resp = await self.call("txn", lambda s, t: s.kv.Txn(req, timeout=t))
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), list(resp.responses))

    async def put_if(
        self,
        key: str | bytes,
        value: bytes,
        *,
        mod_revision: int | None = None,
        create_revision: int | None = None,
        lease: int = 0,
    ) -> CasResult:
        """Compare-and-swap: writes only if the key's mod/create revision equals the given one (0: key absent)."""
        k = to_bytes(key)
        compares = []
        if mod_revision is not None:
            compares.append(cmp_mod_revision(k, mod_revision))
        if create_revision is not None:
            compares.append(cmp_create_revision(k, create_revision))
        if not compares:
            raise ValueError("put_if needs mod_revision or create_revision")
        result = await self.txn(compares, [op_put(k, value, lease=lease)], [op_get(k)])
        if result.succeeded:
            return CasResult(True, result.revision, None)
        kvs = result.responses[0].response_range.kvs
        return CasResult(False, result.revision, KeyValue.from_pb(kvs[0]) if kvs else None)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Drops history before ``revision``; watchers behind it get a compaction cancel (and resync)."""
        req = rpc_pb2.CompactionRequest(revision=revision, physical=physical)
        await self.call("compact", lambda s, t: s.kv.Compact(req, timeout=max(t, self.call_timeout)))

    # ---- Lease (the keep-alive stream lives in lease.py) ----

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """Returns ``(lease_id, granted_ttl)``."""
        if ttl < 1:
            raise ValueError("lease TTL must be at least 1 s")
        req = rpc_pb2.LeaseGrantRequest(TTL=ttl)
        resp = await self.call("lease_grant", lambda s, t: s.lease.LeaseGrant(req, timeout=t))
        if resp.error:
            raise EtcdRequestError("lease_grant", "ERROR", resp.error)
        return int(resp.ID), int(resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        req = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        await self.call("lease_revoke", lambda s, t: s.lease.LeaseRevoke(req, timeout=t))

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Remaining TTL in seconds; -1 when the lease has expired or never existed."""
        req = rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id)
        resp = await self.call("lease_time_to_live", lambda s, t: s.lease.LeaseTimeToLive(req, timeout=t))
        return int(resp.TTL)

    async def status(self) -> rpc_pb2.StatusResponse:
        """Maintenance.Status of the current endpoint (raft leader id, revision, version)."""
        return await self.call("status", lambda s, t: s.maintenance.Status(rpc_pb2.StatusRequest(), timeout=t))


# ---- Txn building blocks ----


def cmp_mod_revision(key: bytes, revision: int) -> rpc_pb2.Compare:
    return rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD, key=key, mod_revision=revision)


def cmp_create_revision(key: bytes, revision: int) -> rpc_pb2.Compare:
    return rpc_pb2.Compare(
        result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=key, create_revision=revision
    )


def op_put(key: bytes, value: bytes, *, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def op_get(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))


def op_delete(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))
