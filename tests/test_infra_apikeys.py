"""API keys on a fake KV (the real etcd run is integration/test_etcd_tls.py): create/verify/revoke/list, hashing,
the aiohttp middleware's 401/403/503 OpenAI-style bodies, and the gRPC Bearer interceptor on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from pyllumnix.infra.etcd.keys import KeyLayout, prefix_range_end
from pyllumnix.infra.security.apikeys import (
    MAX_UNKNOWN_IDS,
    REQUEST_KEY,
    ApiKeyError,
    ApiKeyInterceptor,
    ApiKeyStore,
    ApiKeyStoreError,
    api_key_middleware,
    bearer_token,
    hash_key,
)
from pyllumnix.protos.llumnix.v1 import frontend_pb2, frontend_pb2_grpc


@dataclass
class Entry:
    key: bytes
    value: bytes


@dataclass
class Range:
    kvs: list[Entry]


class FakeKV:
    """A dict with the EtcdClient methods the store uses; ``down`` makes every call fail like an unreachable etcd."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.down = False
        self.reads = 0
        self.lists = 0
        self.gate: asyncio.Event | None = None  # when set: reads wait for it (concurrent checks overlap)

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("etcd unavailable: range failed on every endpoint [127.0.0.1:1]")

    @staticmethod
    def _b(key: str | bytes) -> bytes:
        return key.encode() if isinstance(key, str) else key

    async def get(self, key: str | bytes) -> Entry | None:
        self._check()
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
            self._check()
        k = self._b(key)
        return Entry(k, self.data[k]) if k in self.data else None

    async def put(self, key: str | bytes, value: bytes, *, lease: int = 0) -> int:
        self._check()
        self.data[self._b(key)] = value
        return len(self.data)

    async def delete(self, key: str | bytes) -> int:
        self._check()
        return 1 if self.data.pop(self._b(key), None) is not None else 0

    async def get_prefix(self, prefix: str | bytes, *, revision: int = 0) -> Range:
        self._check()
        self.lists += 1
        if self.gate is not None:
            await self.gate.wait()
            self._check()
        p = self._b(prefix)
        end = prefix_range_end(p)
        return Range([Entry(k, v) for k, v in sorted(self.data.items()) if p <= k < end])


@pytest.fixture
def kv() -> FakeKV:
    return FakeKV()


@pytest.fixture
def store(kv: FakeKV) -> ApiKeyStore:
    return ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=0.0, stale_grace=0.0)  # no caching: every check reads


async def test_create_verify_list_revoke(store: ApiKeyStore, kv: FakeKV) -> None:
    key, record = await store.create("alice", "user")
    admin_key, _ = await store.create("root", "admin")
    assert key.startswith("llx_") and len(key) == 4 + 16 + 1 + 43
    # Only the hash is stored, under the cluster's prefix.
    stored_value = kv.data[f"/llumnix/c1/apikeys/{record.id}".encode()]
    assert key.encode() not in stored_value and json.loads(stored_value)["sha256"] == hash_key(key)
    assert (await store.verify(key)).name == "alice"
    assert (await store.verify(admin_key)).role == "admin"
    assert [k.name for k in await store.list()] == ["alice", "root"]
    with pytest.raises(ValueError, match="exists"):
        await store.create("alice")
    with pytest.raises(ValueError, match="role"):
        await store.create("bob", "root")
    await store.revoke("alice")
    with pytest.raises(ApiKeyError, match="unknown or revoked"):
        await store.verify(key)
    with pytest.raises(ValueError, match="no API key named"):
        await store.revoke("alice")
    assert [k.name for k in await store.list()] == ["root"]


async def test_wrong_secret_and_malformed_keys(store: ApiKeyStore) -> None:
    key, _ = await store.create("alice")
    prefix, kid, _ = key.split("_", 2)
    forged = f"{prefix}_{kid}_{'A' * 43}"
    with pytest.raises(ApiKeyError, match="unknown or revoked"):
        await store.verify(forged)
    for bad in ("", "sk-123", f"llx_{kid}_short", key + "x"):
        with pytest.raises(ApiKeyError, match="malformed"):
            await store.verify(bad)


async def test_cache_and_revocation_in_another_process(kv: FakeKV) -> None:
    clock = [0.0]
    mine = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, clock=lambda: clock[0])
    theirs = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, clock=lambda: clock[0])
    key, _ = await mine.create("alice")
    await theirs.verify(key)
    reads = kv.reads
    await theirs.verify(key)
    assert kv.reads == reads, "a second check within cache_ttl is answered from the cache"
    await mine.revoke("alice")
    with pytest.raises(ApiKeyError):
        await mine.verify(key)  # at once where it was revoked
    clock[0] += 2.5
    with pytest.raises(ApiKeyError):
        await theirs.verify(key)  # within cache_ttl elsewhere


async def test_unknown_ids_are_read_once_per_ttl(kv: FakeKV, monkeypatch: pytest.MonkeyPatch) -> None:
    """A12: checks of an unknown id are answered from a negative cache for cache_ttl, and concurrent checks of one id
    share one read (before: one etcd read per check, 200 here). A key created meanwhile is accepted after cache_ttl
    elsewhere, at once where it was created."""
    clock = [0.0]
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, clock=lambda: clock[0])
    kid = "0123456789abcdef"
    unknown = f"llx_{kid}_{'A' * 43}"
    kv.gate = asyncio.Event()
    checks = [asyncio.ensure_future(store.verify(unknown)) for _ in range(100)]
    await asyncio.sleep(0.01)
    kv.gate.set()
    results = await asyncio.gather(*checks, return_exceptions=True)
    assert all(isinstance(r, ApiKeyError) and str(r) == "unknown or revoked API key" for r in results)
    for _ in range(100):
        with pytest.raises(ApiKeyError, match="unknown or revoked"):
            await store.verify(unknown)
    assert kv.reads == 1, "200 checks of one unknown id within cache_ttl: one read"
    # Another process creates a key with this id (random ids make that a thought experiment; the TTL bounds it).
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes: kid)
    elsewhere = ApiKeyStore(kv, KeyLayout("c1"))
    key, _ = await elsewhere.create("alice")
    with pytest.raises(ApiKeyError):
        await store.verify(key)  # still the cached "no such key"
    clock[0] += 2.5
    assert (await store.verify(key)).name == "alice"
    assert kv.reads == 2
    # Where the key is created, the cached miss goes at once.
    await store.revoke("alice")
    with pytest.raises(ApiKeyError):
        await store.verify(key)
    reads = kv.reads
    key, _ = await store.create("alice")
    assert (await store.verify(key)).name == "alice" and kv.reads == reads + 1


async def test_concurrent_checks_share_a_read_that_outlives_a_cancelled_caller(kv: FakeKV) -> None:
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0)
    key, _ = await store.create("alice")
    kv.gate = asyncio.Event()
    first = asyncio.ensure_future(store.verify(key))
    second = asyncio.ensure_future(store.verify(key))
    await asyncio.sleep(0.01)
    first.cancel()  # its client left: the read the second check waits for goes on
    await asyncio.sleep(0.01)
    kv.gate.set()
    assert (await second).name == "alice" and kv.reads == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    # A failed read answers every waiter "unavailable" and caches nothing.
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0)
    kv.gate, kv.reads = asyncio.Event(), 0
    checks = [asyncio.ensure_future(store.verify(key)) for _ in range(10)]
    await asyncio.sleep(0.01)
    kv.down = True
    kv.gate.set()
    results = await asyncio.gather(*checks, return_exceptions=True)
    assert all(isinstance(r, ApiKeyStoreError) for r in results) and kv.reads == 1
    kv.down, kv.gate = False, None
    assert (await store.verify(key)).name == "alice" and kv.reads == 2


async def test_the_negative_cache_is_bounded(kv: FakeKV) -> None:
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=60.0, unknown_reads_per_s=None)
    for i in range(MAX_UNKNOWN_IDS + 5):
        with pytest.raises(ApiKeyError):
            await store.verify(f"llx_{i:016x}_{'A' * 43}")
    assert len(store._unknown) == MAX_UNKNOWN_IDS and f"{0:016x}" not in store._unknown


async def test_reads_of_never_seen_ids_are_rate_limited_and_no_real_key_is_locked_out(kv: FakeKV) -> None:
    """Was: every check of a new random well-formed key read etcd, so one client could make etcd serve reads as fast as
    it sent requests. Now at most ``unknown_reads_per_s`` such reads a second (a bucket of as many); beyond, never-seen
    ids are answered from one listing of every key, read at most once per LISTING_TTL_S and shared. So a flood costs
    etcd a bounded load, and a real key this process has not seen (created elsewhere) is still accepted during it."""
    clock = [0.0]
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, unknown_reads_per_s=10, clock=lambda: clock[0])
    elsewhere = ApiKeyStore(kv, KeyLayout("c1"))
    alice, _ = await elsewhere.create("alice")
    bob, _ = await elsewhere.create("bob")
    kv.lists = 0  # (create lists the keys to refuse a duplicate name)
    assert (await store.verify(alice)).name == "alice"  # seen now (one token)
    kv.gate = asyncio.Event()  # the flood's checks overlap: the one listing is shared
    flood = [asyncio.ensure_future(store.verify(f"llx_{i:016x}_{'A' * 43}")) for i in range(200)]
    real = asyncio.ensure_future(store.verify(bob))  # never seen here, arriving amid the flood
    await asyncio.sleep(0.01)
    kv.gate.set()
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, ApiKeyError) for r in outcomes), {type(r).__name__ for r in outcomes}
    assert (await real).name == "bob", "a real key is not locked out by the flood"
    assert kv.reads == 10 and kv.lists == 1, (kv.reads, kv.lists)  # 1 + 9 reads, then one shared listing
    assert store.listed_answers == 192
    for i in range(300, 400):  # within LISTING_TTL_S: the same listing answers, etcd is not asked
        with pytest.raises(ApiKeyError):
            await store.verify(f"llx_{i:016x}_{'A' * 43}")
    assert kv.reads == 10 and kv.lists == 1
    clock[0] += 1.5  # the listing is stale; the bucket refilled
    for i in range(400, 450):
        with pytest.raises(ApiKeyError):
            await store.verify(f"llx_{i:016x}_{'A' * 43}")
    assert kv.reads == 20 and kv.lists == 2
    # A key revoked elsewhere: a listing's answer is fresh for cache_ttl from when it was read, as a read's.
    await elsewhere.revoke("bob")
    clock[0] += 2.5
    with pytest.raises(ApiKeyError):
        await store.verify(bob)
    with pytest.raises(ValueError, match="positive"):
        ApiKeyStore(kv, KeyLayout("c1"), unknown_reads_per_s=0)


async def test_a_verified_key_rides_out_a_bounded_etcd_outage(kv: FakeKV) -> None:
    """Attack 9 B4: with etcd stalled, a key verified 2 s before was refused (503) on its next check, so a >2.5 s
    etcd stall refused every new request. A verified record is now taken for up to ``stale_grace`` past its expiry
    while etcd reads fail, never longer, and never in place of an answer etcd gives (revocation)."""
    clock = [0.0]
    admin = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, clock=lambda: clock[0])
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, stale_grace=30.0, clock=lambda: clock[0])
    key, record = await admin.create("alice")
    other, _ = await admin.create("bob")  # never checked by ``store``: nothing to fall back on
    assert await store.verify(key) == record  # the one successful read; cached until t=2
    kv.down = True
    clock[0] = 2.5
    assert await store.verify(key) == record, "past the ttl, etcd down: the verified record still counts"
    clock[0] = 31.9
    assert await store.verify(key) == record
    assert store.stale_served == 2
    with pytest.raises(ApiKeyStoreError, match="unavailable"):
        await store.verify(other)
    clock[0] = 32.1  # 30 s past the expiry: refused, as before
    with pytest.raises(ApiKeyStoreError, match="unavailable"):
        await store.verify(key)
    # etcd answers again: a revocation made meanwhile takes effect at the next check.
    kv.down = False
    await admin.revoke("alice")
    with pytest.raises(ApiKeyError):
        await store.verify(key)


async def test_revocation_stays_within_the_ttl_while_etcd_answers(kv: FakeKV) -> None:
    """The grace is for outages only: with etcd answering, an expired record is re-read and a revocation holds at the
    ttl. After an outage, the check that finds etcd back (its read runs while it is answered from the stale record)
    is the last one the stale record serves."""
    clock = [0.0]
    admin = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, clock=lambda: clock[0])
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, stale_grace=30.0, clock=lambda: clock[0])
    key, _ = await admin.create("alice")
    await store.verify(key)
    await admin.revoke("alice")
    clock[0] = 2.5
    with pytest.raises(ApiKeyError):
        await store.verify(key)
    key, _ = await admin.create("alice")
    await store.verify(key)
    kv.down = True
    clock[0] = 5.0
    await store.verify(key)  # stale: etcd down
    kv.down = False
    await admin.revoke("alice")
    await store.verify(key)  # the last stale answer: its read finds etcd back
    for _ in range(10):  # that read (a task) and its done-callback run
        await asyncio.sleep(0)
    with pytest.raises(ApiKeyError):
        await store.verify(key)
    assert store.stale_served == 2


async def test_store_outage_is_not_a_401(store: ApiKeyStore, kv: FakeKV) -> None:
    key, _ = await store.create("alice")
    kv.down = True
    with pytest.raises(ApiKeyStoreError, match="unavailable"):
        await store.verify(key)


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


# ---- aiohttp middleware ----


@pytest.fixture
async def http(store: ApiKeyStore) -> AsyncIterator[str]:
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"name": request[REQUEST_KEY].name})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[api_key_middleware(store, admin_prefixes=("/admin/",))])
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/admin/whoami", whoami)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def get(url: str, key: str | None = None) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_http_middleware(http: str, store: ApiKeyStore, kv: FakeKV) -> None:
    user, _ = await store.create("alice", "user")
    admin, _ = await store.create("root", "admin")
    status, body, _ = await get(f"{http}/health")
    assert status == 200
    status, body, _ = await get(f"{http}/v1/whoami", user)
    assert status == 200 and body == {"name": "alice"}
    status, body, _ = await get(f"{http}/admin/whoami", admin)
    assert status == 200 and body == {"name": "root"}

    status, body, headers = await get(f"{http}/v1/whoami")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "missing_api_key" and "Authorization: Bearer" in body["error"]["message"]

    status, body, _ = await get(f"{http}/v1/whoami", user[:-1] + ("A" if user[-1] != "A" else "B"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    status, body, _ = await get(f"{http}/admin/whoami", user)
    assert status == 403 and body["error"]["code"] == "insufficient_permissions"
    assert body["error"]["message"] == "API key 'alice' has role user; this needs role admin"

    kv.down = True
    status, body, _ = await get(f"{http}/v1/whoami", user)
    assert status == 503 and body["error"]["code"] == "auth_unavailable"
    # Anyone may get this answer (no key is verified yet): it names no etcd endpoint (was the etcd error's text).
    assert body["error"]["message"] == "the API key store is unavailable; retry"


async def test_http_refuses_several_authorization_headers(http: str, store: ApiKeyStore) -> None:
    """A1, HTTP side: exactly one credential per request, so the verified value is the only one there is (before:
    the first header was verified and the rest ignored, here answering 200)."""
    alice, _ = await store.create("alice", "user")
    bob, _ = await store.create("bob", "user")
    forged_alice = f"{alice.rsplit('_', 1)[0]}_{'A' * 43}"
    for values in ([bob, forged_alice], [alice, alice]):
        headers = [("Authorization", f"Bearer {v}") for v in values]
        async with aiohttp.ClientSession() as session, session.get(f"{http}/v1/whoami", headers=headers) as resp:
            assert resp.status == 401, await resp.text()
            error = (await resp.json())["error"]
        assert error["code"] == "invalid_api_key"
        assert error["message"] == (
            "the request carries 2 Authorization values; send exactly one: 'Authorization: Bearer <key>'"
        )


# ---- gRPC interceptor ----


class Frontend(frontend_pb2_grpc.FrontendServiceServicer):
    async def Abort(self, request: frontend_pb2.AbortRequest, context: Any) -> frontend_pb2.AbortResponse:
        return frontend_pb2.AbortResponse()


class Sink(frontend_pb2_grpc.OutputSinkServiceServicer):
    async def PushOutputs(self, request: Any, context: Any) -> frontend_pb2.PushOutputsResponse:
        return frontend_pb2.PushOutputsResponse()


async def test_grpc_interceptor(store: ApiKeyStore) -> None:
    user, _ = await store.create("alice", "user")
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(store)])
    frontend_pb2_grpc.add_FrontendServiceServicer_to_server(Frontend(), server)  # type: ignore[abstract]
    frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server(Sink(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = frontend_pb2_grpc.FrontendServiceStub(channel)
            await stub.Abort(frontend_pb2.AbortRequest(), metadata=(("authorization", f"Bearer {user}"),), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Abort(frontend_pb2.AbortRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Authorization: Bearer" in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Abort(frontend_pb2.AbortRequest(), metadata=(("authorization", "Bearer nope"),), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "malformed" in (info.value.details() or "")
            # A1: metadata is a multimap; a second entry would let code after the check read an unverified one.
            forged = f"{user.rsplit('_', 1)[0]}_{'A' * 43}"
            for values in ([forged, user], [user, user]):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Abort(
                        frontend_pb2.AbortRequest(),
                        metadata=tuple(("authorization", f"Bearer {v}") for v in values),
                        timeout=5,
                    )
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "carries 2 Authorization values; send exactly one" in (info.value.details() or "")
            # Methods outside the rules are not this interceptor's business (mTLS roles guard them).
            sink = frontend_pb2_grpc.OutputSinkServiceStub(channel)
            await sink.PushOutputs(frontend_pb2.PushOutputsRequest(), timeout=5)
        admin_only = ApiKeyInterceptor(store, {"/llumnix.v1.FrontendService/Abort": "admin"})
        assert admin_only.required_role("/llumnix.v1.FrontendService/Abort") == "admin"
        assert admin_only.required_role("/llumnix.v1.FrontendService/Generate") is None
        with pytest.raises(ValueError):
            ApiKeyInterceptor(store, {"/a.B/C": "root"})
    finally:
        await server.stop(None)


async def test_a_revocation_here_is_not_undone_by_a_listing_read_before_it(kv: FakeKV) -> None:
    """A revoke takes effect at once in the revoking process: a check waiting on a listing read before the revoke must
    not cache (and accept) the revoked key's record when the listing lands after it."""
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=2.0, unknown_reads_per_s=1)
    key, _ = await ApiKeyStore(kv, KeyLayout("c1")).create("carol")
    with pytest.raises(ApiKeyError):
        await store.verify(f"llx_{1:016x}_{'A' * 43}")  # the bucket's one read
    held = asyncio.Event()
    listed = kv.get_prefix

    async def slow_first_listing(prefix: str | bytes, *, revision: int = 0) -> Range:
        result = await listed(prefix, revision=revision)  # read now, before the revoke ...
        kv.get_prefix = listed  # type: ignore[method-assign]
        await held.wait()  # ... landing after it
        return result

    kv.get_prefix = slow_first_listing  # type: ignore[method-assign]
    check = asyncio.ensure_future(store.verify(key))  # never seen here, no token: waits on the listing
    await asyncio.sleep(0.01)
    await store.revoke("carol")
    held.set()
    with pytest.raises(ApiKeyError):
        await asyncio.wait_for(check, 5)
    with pytest.raises(ApiKeyError):
        await store.verify(key)
