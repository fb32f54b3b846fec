"""API keys for users and admins: created, verified, listed and revoked in etcd, stored only as hashes.

A key looks like ``llx_<id>_<secret>``: ``id`` (16 hex digits) names the etcd record
``<root>/<cluster>/apikeys/<id>`` so a check is one read, never a scan; ``secret`` is 256 random bits. The record
keeps ``sha256(key)``, a name and a role (``user`` or ``admin``; an admin key may do everything a user key may).

Why plain SHA-256 and not a slow password hash: slow hashes (scrypt, argon2) protect *low-entropy* secrets that an
attacker with the stored hashes could guess. These keys are generated, 256-bit random tokens: no dictionary and no
brute force gets near them, so one SHA-256 is as safe as a slow hash while keeping each check at microseconds on the
request path. A stolen etcd dump therefore yields no usable key. Hashes are compared with ``hmac.compare_digest``.

Checks cache positive answers for ``cache_ttl`` seconds (default 2): a revocation takes effect at once in the process
that revoked and within ``cache_ttl`` everywhere else. While etcd cannot be read (a stall, a lost quorum), a key
verified before is still taken for up to ``stale_grace`` seconds (default 30) past its cache expiry, and refused
(UNAVAILABLE / 503) after that (attack 9 B4: an etcd stall of more than ~2.5 s refused every new request, while
dispatch and the streams in flight rode it out). The trade-off: a key revoked during such an outage works on in the
other processes for up to ``cache_ttl + stale_grace``; with etcd answering, revocation stays within ``cache_ttl``.
A key never verified by this process is not admitted during the outage (nothing to fall back on).

Negative answers (no such id) are cached for ``cache_ttl`` too, in a bounded map (:data:`MAX_UNKNOWN_IDS`), and
concurrent checks of one id share one read: a client repeating an unknown key costs etcd one read per ``cache_ttl``,
not one per request. A new key is not delayed by it: its id is random and known to nobody before ``create``
returns, and ``create`` drops any such entry in its own process.

Reads of ids this process has never seen are rate-limited (``unknown_reads_per_s``, default 100 a second, as a bucket
of as many): without it a client sending a new random well-formed key with each request made etcd serve one read per
request, as fast as it could send, taking etcd's time from lease renewals and elections. Beyond the rate such a check
is answered from one listing of every key record, read at most once per :data:`LISTING_TTL_S` and shared by all the
checks waiting for it: etcd's load stays bounded, and a real key this process has not seen yet (after a restart, or
created elsewhere) is still accepted during a flood, at most ``LISTING_TTL_S`` later. Keys verified before are checked
as usual.

A request carries exactly one credential: several ``Authorization`` headers (HTTP) or ``authorization`` metadata
entries (gRPC) are refused (401 / UNAUTHENTICATED), so the value that was verified is the only one any later code
can read.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.authz import guard_handler

log = logging.getLogger(__name__)

KEY_PREFIX = "llx"
API_ROLES = ("user", "admin")
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
LISTING_TTL_S = 1.0
"""How long one listing of every key record answers never-seen ids once their read rate is spent."""
MAX_UNKNOWN_IDS = 10_000
"""Unknown key ids remembered at most (the oldest go first): bounds the memory a stream of random ids can take."""


class ApiKeyError(Exception):
    """A key that does not authenticate (missing, malformed, unknown or revoked)."""


class ApiKeyStoreError(Exception):
    """The key store could not answer (etcd unreachable): neither yes nor no."""


class _Value(Protocol):
    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes: ...


class _Range(Protocol):
    @property
    def kvs(self) -> Sequence[_Value]: ...


class KV(Protocol):
    """The part of :class:`~pyllumnix.infra.etcd.client.EtcdClient` the store uses (fakes in unit tests)."""

    async def get(self, key: str | bytes) -> _Value | None: ...
    async def put(self, key: str | bytes, value: bytes, *, lease: int = 0) -> int: ...
    async def delete(self, key: str | bytes) -> int: ...
    async def get_prefix(self, prefix: str | bytes, *, revision: int = 0) -> _Range: ...


@dataclass(frozen=True)
class ApiKey:
    """A stored key's public part (never the key itself)."""

    id: str
    name: str
    role: str
    created: float

    def allows(self, role: str) -> bool:
        """An admin key may act as a user; a user key only as a user."""
        return self.role in ("admin", role)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """The record id inside a well-formed key; ApiKeyError if it is not one."""
    m = _KEY_RE.fullmatch(key.strip())
    if m is None:
        raise ApiKeyError(f"malformed API key (expected {KEY_PREFIX}_<16 hex>_<43 chars>)")
    return m.group(1)


def apikeys_prefix(layout: KeyLayout) -> str:
    return f"{layout.base}apikeys/"


class ApiKeyStore:
    """create / verify / revoke / list against etcd (or any :class:`KV`)."""

    def __init__(
        self,
        kv: KV,
        layout: KeyLayout,
        *,
        cache_ttl: float = 2.0,
        stale_grace: float = 30.0,
        unknown_reads_per_s: float | None = 100.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.prefix = apikeys_prefix(layout)
        self.cache_ttl = cache_ttl
        self.stale_grace = stale_grace  # seconds past expiry a cached record still counts while etcd reads fail
        self._clock = clock
        # Since the last read failed, until one succeeds: records within their grace are taken without waiting for
        # a read (each would wait out the etcd client's retry budget), a read in the background finds the recovery.
        self._failing = False
        self.stale_served = 0  # checks answered from an expired record because etcd could not be read
        self._cache: dict[str, tuple[ApiKey, str, float]] = {}  # id -> (record, hash, expiry)
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id -> expiry of "no such key", oldest first
        # id -> the etcd read under way for it: concurrent checks of one id wait for the same read.
        self._reads: dict[str, asyncio.Task[tuple[ApiKey, str] | None]] = {}
        # A token bucket for reads of ids never seen here: ``unknown_reads_per_s`` a second, at least one at once (None:
        # no limit); beyond it, the shared listing (completion time, id -> (record, hash)) and the read of it under way.
        if unknown_reads_per_s is not None and not unknown_reads_per_s > 0:
            raise ValueError(f"unknown_reads_per_s must be positive (None: no limit), got {unknown_reads_per_s}")
        self.unknown_reads_per_s = unknown_reads_per_s
        self._tokens = max(unknown_reads_per_s or 0.0, 1.0)
        self._filled_at = clock()
        self._listing: tuple[float, dict[str, tuple[ApiKey, str]]] | None = None
        self._listing_read: asyncio.Task[tuple[float, dict[str, tuple[ApiKey, str]]]] | None = None
        self.listed_answers = 0  # checks of never-seen ids answered from the listing (the read rate spent)
        self._generation = 0  # bumped by every create/revoke here: a listing read before one is not cached after it

    async def _call(self, what: str, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except Exception as exc:  # the etcd layer's own errors name endpoints and budget
            raise ApiKeyStoreError(f"API key store unavailable ({what}): {exc}") from exc

    async def create(self, name: str, role: str = "user") -> tuple[str, ApiKey]:
        """A new key for ``name``; returns ``(key, record)``. The key is shown once: only its hash is kept."""
        if role not in API_ROLES:
            raise ValueError(f"role must be one of {', '.join(API_ROLES)}, got {role!r}")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"key name must be 1-64 of letters, digits and ._@- : {name!r}")
        if any(k.name == name for k in await self.list()):
            raise ValueError(f"an API key named {name!r} exists; revoke it first")
        kid = secrets.token_hex(8)
        key = f"{KEY_PREFIX}_{kid}_{secrets.token_urlsafe(32)}"
        record = ApiKey(kid, name, role, time.time())
        body = {"name": name, "role": role, "created": record.created, "sha256": hash_key(key)}
        await self._call("create", self.kv.put(self.prefix + kid, json.dumps(body).encode()))
        self._forget(kid)
        return key, record

    async def verify(self, key: str) -> ApiKey:
        """The record of a valid key; ApiKeyError if it is not one, ApiKeyStoreError if etcd cannot say."""
        kid = key_id(key)
        digest = hash_key(key.strip())
        found = await self._lookup(kid)
        if found is None or not hmac.compare_digest(digest, found[1]):
            raise ApiKeyError("unknown or revoked API key")
        return found[0]

    async def _lookup(self, kid: str) -> tuple[ApiKey, str] | None:
        """(record, stored hash) of ``kid``, None when there is no such key: from the caches while fresh, else from
        the one read of this id under way (started here if there is none)."""
        now = self._clock()
        cached = self._cache.get(kid)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        if self._unknown.get(kid, now) > now:
            return None
        read = self._reads.get(kid)
        if read is None:
            if cached is None and not self._take_token(now):
                return await self._from_listing(kid, now)
            read = asyncio.ensure_future(self._read(kid))
            self._reads[kid] = read
            read.add_done_callback(lambda task: self._landed(kid, task))
        stale = cached is not None and cached[2] + self.stale_grace > now
        if stale and self._failing:
            return self._stale(cached)
        try:
            # Shielded: a caller that gives up (its client left) does not cancel the read the others wait for.
            return await asyncio.shield(read)
        except ApiKeyStoreError:
            if cached is None or cached[2] + self.stale_grace <= self._clock():
                raise
            return self._stale(cached)

    def _take_token(self, now: float) -> bool:
        """One read of a never-seen id from the bucket, refilled at ``unknown_reads_per_s``; False when empty."""
        rate = self.unknown_reads_per_s
        if rate is None:
            return True
        self._tokens = min(max(rate, 1.0), self._tokens + (now - self._filled_at) * rate)
        self._filled_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _from_listing(self, kid: str, now: float) -> tuple[ApiKey, str] | None:
        """``kid``'s record from the listing of every key (read at most once per LISTING_TTL_S, one read shared by
        every waiting check); a record found there is cached as a read's would be."""
        self.listed_answers += 1
        generation = self._generation
        if self._listing is None or now - self._listing[0] >= min(LISTING_TTL_S, self.cache_ttl):
            if self._listing_read is None:
                self._listing_read = asyncio.ensure_future(self._list_records())
                self._listing_read.add_done_callback(self._listed)
            read_at, records = await asyncio.shield(self._listing_read)
        else:
            read_at, records = self._listing
        if self._generation != generation:  # a create or revoke here meanwhile: this listing may predate it
            return await self._lookup(kid)
        found = records.get(kid)
        if found is not None and kid not in self._cache:
            # Fresh for cache_ttl from when it was read, as a read's answer: a revocation still holds within that.
            self._cache[kid] = (*found, read_at + self.cache_ttl)
        return found

    async def _list_records(self, what: str = "verify") -> tuple[float, dict[str, tuple[ApiKey, str]]]:
        """(when it was asked for, every key record with its hash) from one etcd range read."""
        asked = self._clock()
        result = await self._call(what, self.kv.get_prefix(self.prefix))
        records = {}
        for kv in result.kvs:
            kid = kv.key.decode()[len(self.prefix) :]
            records[kid] = self._parse(kid, kv.value)
        return asked, records

    def _listed(self, read: asyncio.Task[tuple[float, dict[str, tuple[ApiKey, str]]]]) -> None:
        """Keeps a finished listing (a failed one is not kept: the next check lists again)."""
        if self._listing_read is not read:
            return  # dropped by a create or revoke here meanwhile
        self._listing_read = None
        if not read.cancelled() and read.exception() is None:
            self._listing = read.result()

    def _stale(self, cached: tuple[ApiKey, str, float] | None) -> tuple[ApiKey, str]:
        """An expired record taken because etcd cannot be read (within ``stale_grace`` of its expiry)."""
        assert cached is not None
        self.stale_served += 1
        return cached[0], cached[1]

    async def _read(self, kid: str) -> tuple[ApiKey, str] | None:
        kv = await self._call("verify", self.kv.get(self.prefix + kid))
        return None if kv is None else self._parse(kid, kv.value)

    def _landed(self, kid: str, read: asyncio.Task[tuple[ApiKey, str] | None]) -> None:
        """Caches a finished read's answer, unless a create or revoke of the id came meanwhile (then the next check
        reads again). A failed read caches nothing: etcd could not say."""
        failed = read.cancelled() or read.exception() is not None  # (retrieved: never "exception never retrieved")
        if self._reads.get(kid) is not read:
            return
        del self._reads[kid]
        if failed:
            self._failing = self._failing or not read.cancelled()
            return
        self._failing = False
        found, expiry = read.result(), self._clock() + self.cache_ttl
        if found is None:
            self._cache.pop(kid, None)
            self._unknown[kid] = expiry
            self._unknown.move_to_end(kid)
            while len(self._unknown) > MAX_UNKNOWN_IDS:
                self._unknown.popitem(last=False)
        else:
            self._unknown.pop(kid, None)
            self._cache[kid] = (*found, expiry)

    def _forget(self, kid: str) -> None:
        """Drops what this process knows about ``kid`` (after a create or revoke here): the next check reads etcd."""
        self._cache.pop(kid, None)
        self._unknown.pop(kid, None)
        self._listing = self._listing_read = None
        self._generation += 1
        self._reads.pop(kid, None)

    async def revoke(self, name_or_id: str) -> ApiKey:
        """Deletes the key with this name (or id); ValueError if there is none."""
        for record in await self.list():
            if name_or_id in (record.name, record.id):
                await self._call("revoke", self.kv.delete(self.prefix + record.id))
                self._forget(record.id)
                return record
        raise ValueError(f"no API key named {name_or_id!r}")

    async def list(self) -> list[ApiKey]:
        _, records = await self._list_records("list")
        return sorted((record for record, _ in records.values()), key=lambda k: (k.created, k.id))

    @staticmethod
    def _parse(kid: str, value: bytes) -> tuple[ApiKey, str]:
        data = json.loads(value)
        return ApiKey(kid, str(data["name"]), str(data["role"]), float(data["created"])), str(data["sha256"])


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` value; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


@dataclass(frozen=True)
class AuthFailure:
    """How a request failed authentication: HTTP status, gRPC status, OpenAI error type/code, message."""

    http_status: int
    grpc_code: grpc.StatusCode
    type: str
    code: str
    message: str

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


def _several(count: int) -> AuthFailure:
    return AuthFailure(
        401,
        grpc.StatusCode.UNAUTHENTICATED,
        "authentication_error",
        "invalid_api_key",
        f"the request carries {count} Authorization values; send exactly one: 'Authorization: Bearer <key>'",
    )


_unavailable_logged = [-math.inf]
UNAVAILABLE_LOG_EVERY_S = 10.0


def _log_unavailable(exc: ApiKeyStoreError) -> None:
    """At most once per UNAVAILABLE_LOG_EVERY_S: every check fails alike while etcd is out."""
    now = time.monotonic()
    if now - _unavailable_logged[0] >= UNAVAILABLE_LOG_EVERY_S:
        _unavailable_logged[0] = now
        log.warning("API key checks answered 503: %s", exc)


async def authenticate(
    store: ApiKeyStore, authorization: str | Sequence[str] | None, required_role: str
) -> ApiKey | AuthFailure:
    """One decision shared by the HTTP middleware and the gRPC interceptor. ``authorization``: the request's
    Authorization value(s); more than one is refused, whatever they hold: code after this check reads the request's
    credential by name, and must not find another value than the one verified here."""
    if not isinstance(authorization, str) and authorization is not None:
        if len(authorization) > 1:
            return _several(len(authorization))
        authorization = authorization[0] if authorization else None
    token = bearer_token(authorization)
    if token is None:
        return AuthFailure(
            401,
            grpc.StatusCode.UNAUTHENTICATED,
            "authentication_error",
            "missing_api_key",
            "no API key: send the header 'Authorization: Bearer <key>'",
        )
    try:
        record = await store.verify(token)
    except ApiKeyError as exc:
        return AuthFailure(401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error", "invalid_api_key", str(exc))
    except ApiKeyStoreError as exc:
        _log_unavailable(exc)  # its text names etcd's endpoints: for the log, not for an unauthenticated caller
        message = "the API key store is unavailable; retry"
        return AuthFailure(503, grpc.StatusCode.UNAVAILABLE, "server_error", "auth_unavailable", message)
    if not record.allows(required_role):
        return AuthFailure(
            403,
            grpc.StatusCode.PERMISSION_DENIED,
            "permission_error",
            "insufficient_permissions",
            f"API key {record.name!r} has role {record.role}; this needs role {required_role}",
        )
    return record


REQUEST_KEY = web.RequestKey("llumnix.api_key", ApiKey)
"""Where the middleware leaves the caller's :class:`ApiKey` on an aiohttp request (``request[REQUEST_KEY]``)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_key_middleware(
    store: ApiKeyStore,
    *,
    exempt: Sequence[str] = ("/health", "/metrics"),
    admin_prefixes: Sequence[str] = (),
) -> Middleware:
    """An aiohttp middleware: every path except ``exempt`` needs a user key, paths under ``admin_prefixes`` an admin
    key; failures answer 401/403/503 with an OpenAI-style error body."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt:
            return await handler(request)
        role = "admin" if any(request.path.startswith(p) for p in admin_prefixes) else "user"
        outcome = await authenticate(store, request.headers.getall("Authorization", []), role)
        if isinstance(outcome, AuthFailure):
            headers = {"WWW-Authenticate": 'Bearer realm="llumnix"'} if outcome.http_status == 401 else None
            return web.json_response(outcome.body(), status=outcome.http_status, headers=headers)
        request[REQUEST_KEY] = outcome
        return await handler(request)

    return middleware


DEFAULT_GRPC_RULES: dict[str, str] = {"/llumnix.v1.FrontendService/*": "user"}


# The key the ApiKeyInterceptor verified for the gRPC call being served (set in the handler's own task, before the
# servicer runs): servicers take the caller's identity and role from here, never from the metadata again.
VERIFIED_API_KEY: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar(
    "llumnix_verified_api_key", default=None
)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bearer keys on gRPC: methods matching ``rules`` (full name or ``/pkg.Service/*`` -> role) need a key with
    that role in the ``authorization`` metadata; other methods pass through untouched."""

    def __init__(self, store: ApiKeyStore, rules: Mapping[str, str] = DEFAULT_GRPC_RULES) -> None:
        for role in rules.values():
            if role not in API_ROLES:
                raise ValueError(f"rule role must be one of {', '.join(API_ROLES)}, got {role!r}")
        self.store = store
        self.rules = dict(rules)

    def required_role(self, method: str) -> str | None:
        return self.rules.get(method) or self.rules.get(method.rsplit("/", 1)[0] + "/*")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        role = self.required_role(handler_call_details.method)
        if handler is None or role is None:
            return handler
        authorization = [
            value.decode() if isinstance(value, bytes) else value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == "authorization"
        ]
        outcome = await authenticate(self.store, authorization, role)
        if not isinstance(outcome, AuthFailure):
            verified = outcome

            async def admit(context: Any) -> None:
                VERIFIED_API_KEY.set(verified)

            return guard_handler(handler, admit)
        failure = outcome

        async def refuse(context: Any) -> None:
            await context.abort(failure.grpc_code, failure.message)

        return guard_handler(handler, refuse)
