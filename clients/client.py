"""Python client of a Llumnix cluster: Generate/Abort at the frontends, the operator API at the scheduler replicas.

``AsyncLlumnixClient`` is the implementation (grpc.aio); ``LlumnixClient`` runs it on a private event loop in a
daemon thread so blocking code gets the same behaviour, retry rules included (see ``pyllumnix.clients.channel``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from pyllumnix.clients import config_paths
from pyllumnix.clients.channel import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, CallKind, EndpointPool, TlsConfig
from pyllumnix.clients.errors import InvalidArgumentError, LlumnixError, NotFoundError, UnavailableError, from_rpc_error
from pyllumnix.infra import vocabulary, wire
from pyllumnix.infra.security.ca import role_name
from pyllumnix.infra.security.context import ClientContext, context_path, load_context
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    config_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

T = TypeVar("T")
M = TypeVar("M", bound=Message)

Prompt = str | Sequence[int]
PriorityLike = int | str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed message: the new tokens (and their text) since the previous chunk."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    first_token_index: int
    finished: bool
    finish_reason: str | None
    usage: Usage | None
    instance_id: str

    @classmethod
    def from_pb(cls, msg: frontend_pb2.GenerateResponse) -> GenerationChunk:
        return cls(
            request_id=msg.request_id,
            text=msg.text,
            token_ids=tuple(msg.token_ids),
            first_token_index=msg.first_token_index,
            finished=msg.finished,
            finish_reason=wire.finish_label(msg.finish_reason),
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens) if msg.HasField("usage") else None,
            instance_id=msg.instance_id,
        )


@dataclass
class GenerationResult:
    """A whole completion; ``instances`` lists, in order, every instance that produced tokens (more than one after a
    migration)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    instances: list[str] = field(default_factory=list)

    def add(self, chunk: GenerationChunk) -> None:
        """Appends a chunk; tokens already held (a duplicate across a migration) are dropped by index."""
        self.request_id = chunk.request_id or self.request_id
        skip = max(len(self.token_ids) - chunk.first_token_index, 0) if chunk.token_ids else 0
        if skip < len(chunk.token_ids) or not chunk.token_ids:
            self.token_ids.extend(chunk.token_ids[skip:])
            self.text += chunk.text
        if chunk.instance_id and (not self.instances or self.instances[-1] != chunk.instance_id):
            self.instances.append(chunk.instance_id)
        if chunk.finished:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage


def parse_priority(priority: PriorityLike) -> int:
    """ "normal"/"high" (any case, with or without the PRIORITY_ prefix) or the enum number: the vocabulary's one
    strict parser, its ValueError raised as the client library's InvalidArgumentError."""
    try:
        return int(vocabulary.parse_priority(priority))
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


@contextmanager
def _argument(name: str) -> Iterator[None]:
    """Turns protobuf's ValueError/TypeError for a bad value of argument ``name`` into InvalidArgumentError."""
    try:
        yield
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgumentError(f"invalid {name}: {exc}") from None


def build_generate_request(
    prompt: Prompt,
    *,
    request_id: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: str | Sequence[str] | None,
    stop_token_ids: Sequence[int] | None,
    ignore_eos: bool,
    priority: PriorityLike,
    model: str,
) -> frontend_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; a value its field cannot hold (a seed or token id out of the field's
    integer range, a temperature that is no number) is InvalidArgumentError naming the argument, not protobuf's bare
    ValueError/TypeError."""
    priority_pb = wire.priority_to_pb(parse_priority(priority))
    sampling = common_pb2.SamplingParams()
    scalars: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "ignore_eos": ignore_eos,
    }
    if seed is not None:
        scalars["seed"] = seed
    for name, value in scalars.items():
        with _argument(name):
            setattr(sampling, name, value)
    with _argument("stop"):
        sampling.stop.extend([stop] if isinstance(stop, str) else list(stop or ()))
    with _argument("stop_token_ids"):
        sampling.stop_token_ids.extend(list(stop_token_ids or ()))
    request = frontend_pb2.GenerateRequest(sampling=sampling, priority=priority_pb)
    with _argument("request_id"):
        request.request_id = request_id
    with _argument("model"):
        request.model = model
    with _argument("prompt"):
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(int(t) for t in prompt)
    return request


ROLES_DIALLED = ("frontend", "scheduler")


def tls_from_context(ctx: ClientContext) -> TlsConfig | None:
    """The context's CA, client certificate and API key as channel TLS (None: a plaintext context)."""
    files = ctx.tls_files()
    if not files:
        return None
    return TlsConfig.from_files(**files, api_key=ctx.api_key or None)


class AsyncLlumnixClient:
    """Generate/Abort at ``frontend_endpoints``, admin calls at ``scheduler_endpoints`` (``endpoints`` is used for a
    role whose own list is not given, e.g. one address serving both).

    ``timeout`` bounds each unary call (all retries included); ``generate_timeout`` bounds a whole Generate stream
    (None: no deadline). Retry rules: ``pyllumnix.clients.channel``. Admin writes go to the leader, reads prefer it
    (followers lack load reports) but any replica may answer.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        frontend_endpoints: str | Sequence[str] | None = None,
        scheduler_endpoints: str | Sequence[str] | None = None,
        tls: TlsConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        generate_timeout: float | None = None,
    ) -> None:
        role_tls: dict[str, TlsConfig] = {}
        fe = frontend_endpoints if frontend_endpoints is not None else endpoints
        se = scheduler_endpoints if scheduler_endpoints is not None else endpoints
        if not fe and not se:
            # No endpoints: the client context file (written by `llumnix serve`) says where and with what.
            ctx = load_context()
            if ctx is None:
                raise ValueError(
                    "give endpoints, frontend_endpoints or scheduler_endpoints (or run `llumnix serve`, which writes "
                    f"the client context file {context_path()})"
                )
            fe, se = ctx.frontend, ctx.scheduler
            if tls is None:
                tls = tls_from_context(ctx)
                if tls is not None and ctx.checks_role_names():
                    # The cluster's own CA (serve wrote the context): each pool checks its servers' role names, so
                    # another component's certificate on that host cannot pose as them (API keys go to whoever
                    # passes the check).
                    role_tls = {r: dataclasses.replace(tls, server_name_override=role_name(r)) for r in ROLES_DIALLED}
        self.timeout = timeout
        self.generate_timeout = generate_timeout
        common: dict[str, Any] = {"timeout": timeout, "connect_timeout": connect_timeout}
        self._frontends = EndpointPool(fe, role="frontend", tls=role_tls.get("frontend", tls), **common) if fe else None
        self._schedulers = (
            EndpointPool(se, role="scheduler", tls=role_tls.get("scheduler", tls), **common) if se else None
        )
        # request id -> the frontend that owns its stream (Abort must reach that frontend).
        self._owners: dict[str, str] = {}

    @property
    def frontend_pool(self) -> EndpointPool:
        if self._frontends is None:
            raise LlumnixError("no frontend endpoints configured")
        return self._frontends

    @property
    def scheduler_pool(self) -> EndpointPool:
        if self._schedulers is None:
            raise LlumnixError("no scheduler endpoints configured")
        return self._schedulers

    # --- generation -------------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        priority: PriorityLike = "normal",
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Streams a completion. Leaving the loop early cancels the stream, which aborts the request.

        Only the connection is retried (another frontend when this one is not reachable); once the stream is open the
        request is never re-sent, and a broken stream, or one that ends before a finished message, raises
        UnavailableError(may_have_started=True).
        """
        request = build_generate_request(
            prompt,
            request_id=request_id or f"req-{uuid.uuid4().hex}",
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            priority=priority,
            model=model,
        )
        pool = self.frontend_pool
        address, channel = await pool.ready_endpoint()
        call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
            request, timeout=timeout if timeout is not None else self.generate_timeout
        )
        self._owners[request.request_id] = address
        finished = False
        try:
            async for msg in call:
                finished = finished or msg.finished
                yield GenerationChunk.from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, endpoint=address, endpoints=[address], may_have_started=True) from None
        finally:
            self._owners.pop(request.request_id, None)
            call.cancel()
        if not finished:
            # Status OK without a finished message: the result would be silently truncated.
            raise UnavailableError(
                f"generate {request.request_id!r}: the stream from {address} ended before the request finished",
                endpoints=[address],
                endpoint=address,
                may_have_started=True,
            )

    async def generate_text(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        priority: PriorityLike = "normal",
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> GenerationResult:
        """Runs :meth:`generate` to the end and collects text, token ids, finish reason, usage, instances seen."""
        result = GenerationResult(request_id=request_id)
        stream = self.generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            priority=priority,
            request_id=request_id,
            model=model,
            timeout=timeout,
        )
        async for chunk in stream:
            result.add(chunk)
        return result

    async def abort(self, request_id: str) -> None:
        """Aborts a request at the frontend that owns it (the one this client streamed it through, else each one)."""
        pool = self.frontend_pool
        owner = self._owners.get(request_id)
        targets = [owner] if owner else []
        targets += [a for a in pool.endpoints if a != owner]
        unreachable: list[str] = []
        for address in targets:
            if await pool.wait_ready(address, pool.connect_timeout) != "READY":
                unreachable.append(address)
                continue
            try:
                await frontend_pb2_grpc.FrontendServiceStub(pool.channel(address)).Abort(
                    frontend_pb2.AbortRequest(request_id=request_id), timeout=self.timeout
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    unreachable.append(address)
                    continue
                raise from_rpc_error(exc, endpoint=address) from None
        if unreachable:
            raise UnavailableError(
                f"abort {request_id!r}: frontends unreachable: [{', '.join(unreachable)}]", endpoints=unreachable
            )
        raise NotFoundError(f"unknown request {request_id!r}")

    # --- operator API -----------------------------------------------------------------------------------------

    async def _admin(self, method: str, request: Message, response: type[M], kind: CallKind) -> M:
        async def invoke(channel: Any, left: float) -> Any:
            return await getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request, timeout=left)

        reply = await self.scheduler_pool.call(invoke, what=method, kind=kind, prefer_leader=True)
        return cast(M, reply)

    async def list_instances(self) -> list[scheduler_pb2.InstanceStatus]:
        reply = await self._admin(
            "ListInstances", admin_pb2.ListInstancesRequest(), admin_pb2.ListInstancesResponse, CallKind.READ
        )
        return list(reply.instances)

    async def list_requests(self, instance_id: str = "") -> list[admin_pb2.ClusterRequest]:
        """Requests of one instance, or of every instance when ``instance_id`` is empty."""
        reply = await self._admin(
            "ListClusterRequests",
            admin_pb2.ListClusterRequestsRequest(instance_id=instance_id),
            admin_pb2.ListClusterRequestsResponse,
            CallKind.READ,
        )
        return list(reply.requests)

    async def migrate(self, request_id: str, to: str) -> llumlet_pb2.MigrationResult:
        reply = await self._admin(
            "MigrateRequest",
            admin_pb2.MigrateRequestRequest(request_id=request_id, destination_instance_id=to),
            admin_pb2.MigrateRequestResponse,
            CallKind.WRITE,
        )
        return reply.result

    async def drain(self, instance_id: str) -> scheduler_pb2.InstanceStatus:
        reply = await self._admin(
            "DrainInstance",
            admin_pb2.DrainInstanceRequest(instance_id=instance_id),
            admin_pb2.DrainInstanceResponse,
            CallKind.WRITE,
        )
        return reply.instance

    async def cordon(self, instance_id: str) -> scheduler_pb2.InstanceStatus:
        reply = await self._admin(
            "CordonInstance",
            admin_pb2.CordonInstanceRequest(instance_id=instance_id),
            admin_pb2.CordonInstanceResponse,
            CallKind.WRITE,
        )
        return reply.instance

    async def uncordon(self, instance_id: str) -> scheduler_pb2.InstanceStatus:
        reply = await self._admin(
            "UncordonInstance",
            admin_pb2.UncordonInstanceRequest(instance_id=instance_id),
            admin_pb2.UncordonInstanceResponse,
            CallKind.WRITE,
        )
        return reply.instance

    async def scale(self, target_instances: int) -> admin_pb2.ScaleResponse:
        return await self._admin(
            "Scale", admin_pb2.ScaleRequest(target_instances=target_instances), admin_pb2.ScaleResponse, CallKind.WRITE
        )

    async def get_config(self) -> admin_pb2.GetConfigResponse:
        """The cluster config (defaults applied) and its etcd revision."""
        return await self._admin("GetConfig", admin_pb2.GetConfigRequest(), admin_pb2.GetConfigResponse, CallKind.READ)

    async def get_config_value(self, path: str) -> Any:
        """One value by dotted path (enum names as strings); the path is checked before any call."""
        config_paths.resolve(path)
        return config_paths.get_path((await self.get_config()).config, path)

    async def set_config(
        self,
        updates: Mapping[str, Any] | config_pb2.ClusterConfig,
        *,
        paths: Sequence[str] | None = None,
        expected_revision: int = 0,
    ) -> admin_pb2.SetConfigResponse:
        """Applies ``{"migration.migrate_out_threshold": 5, "dispatch.policy": "balanced"}`` (values parsed by field
        type, checked locally) with a FieldMask of exactly those paths; or a whole ClusterConfig (``paths`` None
        replaces the config, else only ``paths``). ``expected_revision`` makes it a compare-and-swap (AbortedError).
        """
        request = admin_pb2.SetConfigRequest(expected_revision=expected_revision)
        if isinstance(updates, config_pb2.ClusterConfig):
            request.config.CopyFrom(updates)
            for path in paths or ():
                config_paths.resolve(path)
                request.update_mask.paths.append(path)
        else:
            config, mask = config_paths.make_update(updates)
            request.config.CopyFrom(config)
            request.update_mask.CopyFrom(mask)
        return await self._admin("SetConfig", request, admin_pb2.SetConfigResponse, CallKind.WRITE)

    async def leader(self) -> admin_pb2.GetLeaderResponse:
        return await self._admin("GetLeader", admin_pb2.GetLeaderRequest(), admin_pb2.GetLeaderResponse, CallKind.READ)

    async def resign_leader(self) -> admin_pb2.ResignLeaderResponse:
        """The current leader steps down (a standby takes over at once; it stays out of the election for
        ``hold_off_ms``). Sent to a follower, the call is redirected to the leader; with no leader: NoLeaderError."""
        return await self._admin(
            "ResignLeader", admin_pb2.ResignLeaderRequest(), admin_pb2.ResignLeaderResponse, CallKind.WRITE
        )

    async def membership(self) -> scheduler_pb2.GetMembershipResponse:
        """SchedulerService.GetMembership at the leader (registry joined with the latest load)."""

        async def invoke(channel: Any, left: float) -> Any:
            return await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetMembership(
                scheduler_pb2.GetMembershipRequest(), timeout=left
            )

        reply = await self.scheduler_pool.call(invoke, what="GetMembership", kind=CallKind.READ, prefer_leader=True)
        return cast(scheduler_pb2.GetMembershipResponse, reply)

    async def close(self) -> None:
        for pool in (self._frontends, self._schedulers):
            if pool is not None:
                await pool.close()

    async def __aenter__(self) -> AsyncLlumnixClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _awaited(aw: Awaitable[T]) -> T:
    return await aw


class LlumnixClient:
    """Blocking twin of :class:`AsyncLlumnixClient` (same arguments, same methods, same errors).

    The async client runs on a private event loop in a daemon thread; calls from any thread are safe.
    """

    def __init__(self, endpoints: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        self._client = AsyncLlumnixClient(endpoints, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llumnix-client", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def async_client(self) -> AsyncLlumnixClient:
        return self._client

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        priority: PriorityLike = "normal",
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> Iterator[GenerationChunk]:
        """Blocking iterator over :meth:`AsyncLlumnixClient.generate`; closing it early aborts the request."""
        stream = self._client.generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            priority=priority,
            request_id=request_id,
            model=model,
            timeout=timeout,
        )
        try:
            while True:
                try:
                    chunk = self._run(_awaited(stream.__anext__()))
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            if not self._closed:
                self._run(stream.aclose())

    def generate_text(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        priority: PriorityLike = "normal",
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> GenerationResult:
        return self._run(
            self._client.generate_text(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos,
                priority=priority,
                request_id=request_id,
                model=model,
                timeout=timeout,
            )
        )

    def abort(self, request_id: str) -> None:
        self._run(self._client.abort(request_id))

    def list_instances(self) -> list[scheduler_pb2.InstanceStatus]:
        return self._run(self._client.list_instances())

    def list_requests(self, instance_id: str = "") -> list[admin_pb2.ClusterRequest]:
        return self._run(self._client.list_requests(instance_id))

    def migrate(self, request_id: str, to: str) -> llumlet_pb2.MigrationResult:
        return self._run(self._client.migrate(request_id, to))

    def drain(self, instance_id: str) -> scheduler_pb2.InstanceStatus:
        return self._run(self._client.drain(instance_id))

    def cordon(self, instance_id: str) -> scheduler_pb2.InstanceStatus:
        return self._run(self._client.cordon(instance_id))

    def uncordon(self, instance_id: str) -> scheduler_pb2.InstanceStatus:
        return self._run(self._client.uncordon(instance_id))

    def scale(self, target_instances: int) -> admin_pb2.ScaleResponse:
        return self._run(self._client.scale(target_instances))

    def get_config(self) -> admin_pb2.GetConfigResponse:
        return self._run(self._client.get_config())

    def get_config_value(self, path: str) -> Any:
        return self._run(self._client.get_config_value(path))

    def set_config(
        self,
        updates: Mapping[str, Any] | config_pb2.ClusterConfig,
        *,
        paths: Sequence[str] | None = None,
        expected_revision: int = 0,
    ) -> admin_pb2.SetConfigResponse:
        return self._run(self._client.set_config(updates, paths=paths, expected_revision=expected_revision))

    def leader(self) -> admin_pb2.GetLeaderResponse:
        return self._run(self._client.leader())

    def resign_leader(self) -> admin_pb2.ResignLeaderResponse:
        return self._run(self._client.resign_leader())

    def membership(self) -> scheduler_pb2.GetMembershipResponse:
        return self._run(self._client.membership())

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> LlumnixClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
