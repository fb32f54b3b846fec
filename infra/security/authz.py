"""Who may call what: the per-method role table of the project's services and the grpc.aio interceptor enforcing it.

The caller's role comes from its certificate (``identity``); the table maps each RPC's full name to the roles allowed
to call it. Anything not in the table is refused (deny by default), and a test checks that every RPC of every
``llumnix.v1`` service has an entry, so a new RPC cannot ship without someone deciding who may call it.

Answers: UNAUTHENTICATED when the caller has no usable identity (no certificate, no ``llumnix://`` URI in it, or
another cluster's); PERMISSION_DENIED when its role is not allowed (the message names the method, the role and the
roles allowed). Checks that depend on the request (a llumlet reports only its own load) are :func:`require_self`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from pyllumnix.infra.security.ca import ROLES, Identity, IdentityError
from pyllumnix.infra.security.identity import peer_identity

ANY_ROLE = "*"
"""A rule value: every authenticated identity of this cluster may call the method (health checks)."""

PROJECT_ROLE_TABLE: dict[str, frozenset[str]] = {
    # The scheduler: frontends dispatch, llumlets stream their own load, frontends and admins read membership.
    "/llumnix.v1.SchedulerService/Dispatch": frozenset({"frontend"}),
    "/llumnix.v1.SchedulerService/ReportLoad": frozenset({"llumlet"}),
    "/llumnix.v1.SchedulerService/GetMembership": frozenset({"frontend", "admin"}),
    # The admin API (llmctl) is served by the scheduler replicas. Frontends read the instance list (their /metrics
    # republishes the leader's per-instance figures); every other admin call, reads included, is the admins'.
    "/llumnix.v1.AdminService/*": frozenset({"admin"}),
    "/llumnix.v1.AdminService/ListInstances": frozenset({"admin", "frontend"}),
    # A llumlet: requests come from frontends; the leader reads load and gives orders; aborts also come from the
    # leader (dead-peer clean-up) and from a migration source whose request was aborted during the commit (the
    # servicer accepts a llumlet only for a request it migrated there: LlumletServicer.AbortRequest).
    "/llumnix.v1.LlumletService/AddRequest": frozenset({"frontend"}),
    "/llumnix.v1.LlumletService/AbortRequest": frozenset({"frontend", "scheduler", "llumlet"}),
    "/llumnix.v1.LlumletService/GetLoad": frozenset({"scheduler", "admin"}),
    "/llumnix.v1.LlumletService/StreamLoad": frozenset({"scheduler", "admin"}),
    "/llumnix.v1.LlumletService/ListRequests": frozenset({"scheduler", "admin"}),
    "/llumnix.v1.LlumletService/SetInstanceState": frozenset({"scheduler"}),
    "/llumnix.v1.LlumletService/MigrateOut": frozenset({"scheduler"}),
    # The destination side of a migration is called by the source llumlet only.
    "/llumnix.v1.LlumletService/PreAllocate": frozenset({"llumlet"}),
    "/llumnix.v1.LlumletService/TransferStage": frozenset({"llumlet"}),
    "/llumnix.v1.LlumletService/CommitMigration": frozenset({"llumlet"}),
    "/llumnix.v1.LlumletService/AbortMigration": frozenset({"llumlet"}),
    # A frontend: llumlets push outputs (the holder check is a capability token, see tokens.py); the leader pushes
    # the failure of requests whose instance died.
    "/llumnix.v1.OutputSinkService/PushOutputs": frozenset({"llumlet", "scheduler"}),
    # A llumlet's long-lived push (the same checks per batch; the stream's peer is the pusher).
    "/llumnix.v1.OutputSinkService/StreamOutputs": frozenset({"llumlet"}),
    # ... and where it may push the same stream as frames (the framed listener checks its peers the same way).
    "/llumnix.v1.OutputSinkService/DescribeSink": frozenset({"llumlet"}),
    # A migration source hands its request over to the destination (the holder check is its capability token).
    "/llumnix.v1.OutputSinkService/HandOver": frozenset({"llumlet"}),
    "/llumnix.v1.OutputSinkService/TakeBack": frozenset({"llumlet"}),
    # The user-facing gRPC API (API keys decide more; see apikeys.py).
    "/llumnix.v1.FrontendService/Generate": frozenset({"client", "admin"}),
    "/llumnix.v1.FrontendService/Abort": frozenset({"client", "admin"}),
    # Standard services.
    "/grpc.health.v1.Health/*": frozenset({ANY_ROLE}),
    "/grpc.reflection.v1.ServerReflection/*": frozenset({"admin"}),
    "/grpc.reflection.v1alpha.ServerReflection/*": frozenset({"admin"}),
}


class RoleTable:
    """Method full name (``/pkg.Service/Method``) -> allowed roles; ``/pkg.Service/*`` covers a whole service."""

    def __init__(self, rules: Mapping[str, Iterable[str]]) -> None:
        self.rules: dict[str, frozenset[str]] = {}
        for method, roles in rules.items():
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(f"rule key must be /package.Service/Method or /package.Service/*: {method!r}")
            allowed = frozenset(roles)
            unknown = allowed - set(ROLES) - {ANY_ROLE}
            if unknown or not allowed:
                raise ValueError(f"rule {method}: unknown or no roles {sorted(unknown)}; roles: {', '.join(ROLES)}")
            self.rules[method] = allowed

    def allowed(self, method: str) -> frozenset[str] | None:
        """Roles allowed to call ``method``; None when the table does not mention it (refused)."""
        exact = self.rules.get(method)
        if exact is not None:
            return exact
        service = method.rsplit("/", 1)[0]
        return self.rules.get(f"{service}/*")


PROJECT_ROLES = RoleTable(PROJECT_ROLE_TABLE)


@dataclass(frozen=True)
class Denial:
    """Why a call is refused: the status code and a message that names what was wrong."""

    code: grpc.StatusCode
    message: str


def authorize(method: str, identity: Identity | IdentityError, cluster: str, table: RoleTable) -> Denial | None:
    """Pure decision for one call: None to let it through, else the refusal (``identity`` may be the parse error)."""
    if isinstance(identity, IdentityError):
        return Denial(grpc.StatusCode.UNAUTHENTICATED, f"{method} needs a {cluster} cluster identity: {identity}")
    if identity.cluster != cluster:
        return Denial(
            grpc.StatusCode.UNAUTHENTICATED,
            f"caller {identity.role} {identity.id} belongs to cluster {identity.cluster!r}; this server serves "
            f"cluster {cluster!r}",
        )
    allowed = table.allowed(method)
    if allowed is None:
        return Denial(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not in the role table: refused for every caller")
    if ANY_ROLE in allowed or identity.role in allowed:
        return None
    return Denial(
        grpc.StatusCode.PERMISSION_DENIED,
        f"caller role {identity.role} may not call {method}; allowed: {', '.join(sorted(allowed))}",
    )


Guard = Callable[[Any], Awaitable[None]]
"""Checks a call before its handler runs; refuses it with ``await context.abort(...)`` (which raises)."""


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _drain(result: Any) -> Any:
    """Yields from an async-generator handler, or awaits a handler that writes with ``context.write``."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await _maybe_await(result)


def guard_handler(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """``handler`` with ``guard(context)`` run first, for each of the four call shapes (serializers kept)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await guard(context)
            return await _maybe_await(uu(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream is not None:
        us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await guard(context)
            async for item in _drain(us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary is not None:
        su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            await guard(context)
            return await _maybe_await(su(request_iterator, context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    ss = handler.stream_stream
    assert ss is not None, "an RpcMethodHandler has one of the four behaviours"

    async def stream_stream(request_iterator: Any, context: Any) -> Any:
        await guard(context)
        async for item in _drain(ss(request_iterator, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


def caller_identity(context: Any) -> Identity | IdentityError:
    """The caller's identity, or the reason there is none (never raises)."""
    try:
        return peer_identity(context)
    except IdentityError as exc:
        return exc


class RoleInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Enforces a :class:`RoleTable` on every call of a grpc.aio server of one cluster.

    ``grpc.aio.server(interceptors=[RoleInterceptor(cluster)])`` on a port opened with
    ``grpc_server_credentials(paths)`` (client certificates required).
    """

    def __init__(self, cluster: str, table: RoleTable = PROJECT_ROLES) -> None:
        self.cluster = cluster
        self.table = table
        # method -> (the service's handler, our guarded copy): services hand out the same handler object for every
        # call of a method, so the wrapper is built once per method instead of once per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]

        async def guard(context: Any) -> None:
            denial = authorize(method, caller_identity(context), self.cluster, self.table)
            if denial is not None:
                await context.abort(denial.code, denial.message)

        wrapped = guard_handler(handler, guard)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


async def require_self(context: Any, instance_id: str, *, role: str = "llumlet") -> Identity:
    """Refuses (PERMISSION_DENIED) unless the caller is the ``role`` whose id is ``instance_id``.

    For requests about the caller itself: every ``ReportLoadRequest.load.instance_id`` of a ReportLoad stream, a
    ``PreAllocateRequest.source_instance_id``, a ``PushOutputsRequest.instance_id``.
    """
    identity = caller_identity(context)
    if isinstance(identity, IdentityError):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no caller identity: {identity}")
        raise AssertionError("context.abort raises")  # pragma: no cover
    if identity.role != role or identity.id != instance_id:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller {identity.role} {identity.id} may not act for {role} {instance_id!r}",
        )
    return identity


def is_plaintext(context: Any) -> bool:
    """Whether a call came over a connection without TLS (a server opened with ``--insecure``: a TLS server has no
    plaintext port), so there is no identity to check."""
    auth = context.auth_context() or {}
    return b"ssl" not in auth.get("transport_security_type", ())


async def authenticated_caller(context: Any, what: str) -> Identity | None:
    """The caller's identity for per-request checks; None on a plaintext (``--insecure``) connection, where such
    checks are skipped; UNAUTHENTICATED (naming ``what``) on a TLS connection without a usable identity."""
    identity = caller_identity(context)
    if not isinstance(identity, IdentityError):
        return identity
    if is_plaintext(context):
        return None
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{what} needs a cluster identity: {identity}")
    raise AssertionError("context.abort raises")  # pragma: no cover
