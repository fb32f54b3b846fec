"""The frontend core: validates a request, tracks it, places it on an instance, and cleans up after it.

Both user surfaces (gRPC Generate and the OpenAI HTTP API) go through ``Frontend.open``, an async context manager, so
"the client went away" means the same thing everywhere: leaving the context with the request unfinished aborts it on
whichever instance holds it now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from pyllumnix.clients.errors import LlumnixError
from pyllumnix.control_plane.frontend.channels import ChannelPool
from pyllumnix.control_plane.frontend.dispatch import Dispatcher, RefusalAware, Releasing
from pyllumnix.control_plane.frontend.errors import (
    DuplicateRequestError,
    FrontendError,
    InvalidRequestError,
    ModelNotFoundError,
    NoCapacityError,
    RequestFailedError,
    RequestNotFoundError,
)
from pyllumnix.control_plane.frontend.metrics import FrontendMetrics
from pyllumnix.control_plane.frontend.requests import RequestTracker, TrackedRequest
from pyllumnix.control_plane.frontend.tokenizer import Tokenizer
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2

log = logging.getLogger(__name__)

# AddRequest failures that prove the request was not added, so dispatching it again is safe.
_RETRYABLE_ADD = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)


class InstanceResolver(Protocol):
    """gRPC address of an instance this frontend never dispatched to (a migration destination), for aborts."""

    async def address_of(self, instance_id: str) -> str | None: ...


@dataclass(frozen=True)
class GenerationInput:
    """A request as both surfaces hand it in: text or token ids, sampling as the engine will get it."""

    prompt: str | Sequence[int]
    sampling: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)
    priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_NORMAL
    request_id: str = ""
    # Empty means the served model.
    model: str = ""


class Frontend:
    """Owns requests from arrival to last token. ``sink_address`` must be set (``start_grpc`` does) before use."""

    def __init__(
        self,
        *,
        model: str,
        max_model_len: int,
        tokenizer: Tokenizer,
        dispatcher: Dispatcher,
        sink_address: str = "",
        resolver: InstanceResolver | None = None,
        metrics: FrontendMetrics | None = None,
        channels: ChannelPool | None = None,
        dispatch_attempts: int = 3,
        call_timeout: float = 2.0,
    ) -> None:
        if max_model_len <= 0 or dispatch_attempts <= 0:
            raise ValueError("max_model_len and dispatch_attempts must be positive")
        self.model = model
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.dispatcher = dispatcher
        self.sink_address = sink_address
        self.resolver = resolver
        self.metrics = metrics if metrics is not None else FrontendMetrics()
        self.channels = channels if channels is not None else ChannelPool()
        self.dispatch_attempts = dispatch_attempts
        self.call_timeout = call_timeout
        self.tracker = RequestTracker()
        self.created = int(time.time())
        self._addresses: dict[str, str] = {}
        # request id -> the instance its dispatch chose (what the dispatcher's ``release`` expects back).
        self._dispatched: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def open(self, inp: GenerationInput) -> AsyncIterator[TrackedRequest]:
        """Submits ``inp``; the body reads ``request.deltas()``; leaving early aborts the request."""
        request = await self.submit(inp)
        try:
            yield request
        finally:
            self.release(request)

    async def submit(self, inp: GenerationInput) -> TrackedRequest:
        """Validates, tracks and places a request; the caller must ``release`` it. Raises FrontendError."""
        try:
            prompt_ids = self._validate(inp)
            request = TrackedRequest(
                request_id=inp.request_id or uuid.uuid4().hex,
                prompt_token_ids=prompt_ids,
                detokenizer=self.tokenizer.detokenizer(prompt_ids),
                stop=[s for s in inp.sampling.stop if s],
                priority=inp.priority or common_pb2.PRIORITY_NORMAL,
                on_stop=self._abort_soon,
            )
            self.tracker.add(request)
        except FrontendError as exc:
            self.metrics.rejected.labels(exc.code.name).inc()
            raise
        self.metrics.inflight.inc()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        try:
            await self._place(request, self._engine_request(request, inp.sampling))
        except BaseException as exc:
            if isinstance(exc, FrontendError):
                self.metrics.rejected.labels(exc.code.name).inc()
            self.release(request, record=False)
            raise
        return request

    def release(self, request: TrackedRequest, *, record: bool = True) -> None:
        """Forgets a request; if it is unfinished, finishes it as aborted and aborts it on its instance."""
        if self.tracker.get(request.request_id) is not request:
            return
        if not request.finished:
            request.finish(common_pb2.FINISH_REASON_ABORT)
            self._abort_soon(request)
        self.tracker.remove(request.request_id)
        self._release_dispatch(request.request_id)
        self.metrics.inflight.dec()
        if not record:
            return
        now = time.time()
        reason = common_pb2.FinishReason.Name(request.finish_reason).removeprefix("FINISH_REASON_").lower()
        self.metrics.requests.labels(reason).inc()
        self.metrics.generation_tokens.inc(request.num_received)
        self.metrics.e2e.observe(max(0.0, now - request.arrival_time))
        if request.first_token_time is not None:
            self.metrics.ttft.observe(max(0.0, request.first_token_time - request.arrival_time))

    async def abort(self, request_id: str) -> None:
        """Aborts a request this frontend owns; its stream ends with FINISH_REASON_ABORT. Raises NOT_FOUND."""
        request = self.tracker.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no request {request_id!r} on this frontend", param="request_id")
        if not request.finished:
            request.finish(common_pb2.FINISH_REASON_ABORT)
            self._abort_soon(request)

    def _validate(self, inp: GenerationInput) -> list[int]:
        if inp.model and inp.model != self.model:
            raise ModelNotFoundError(f"the model {inp.model!r} does not exist (served: {self.model!r})", param="model")
        if isinstance(inp.prompt, str):
            prompt_ids = self.tokenizer.encode(inp.prompt) if inp.prompt else []
        else:
            prompt_ids = list(inp.prompt)
            bad = [t for t in prompt_ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids out of vocabulary: {bad[:5]}", param="prompt")
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        s = inp.sampling
        if s.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be positive, got {s.max_tokens}", param="max_tokens")
        if len(prompt_ids) + s.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({s.max_tokens}) exceeds the model's maximum length"
                f" of {self.max_model_len}",
                param="max_tokens",
            )
        if s.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {s.temperature}", param="temperature")
        if not 0 <= s.top_p <= 1:  # 0 means "unset" (1.0) on the wire
            raise InvalidRequestError(f"top_p must be in (0, 1], got {s.top_p}", param="top_p")
        return prompt_ids

    def _engine_request(self, request: TrackedRequest, sampling: common_pb2.SamplingParams) -> common_pb2.EngineRequest:
        engine_sampling = common_pb2.SamplingParams()
        engine_sampling.CopyFrom(sampling)
        eos = self.tokenizer.eos_token_id
        if eos is not None and not sampling.ignore_eos and eos not in sampling.stop_token_ids:
            engine_sampling.stop_token_ids.append(eos)
        return common_pb2.EngineRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=engine_sampling,
            priority=request.priority,
            frontend_address=self.sink_address,
            arrival_time=request.arrival_time,
        )

    async def _place(self, request: TrackedRequest, engine_request: common_pb2.EngineRequest) -> None:
        """Dispatch + AddRequest, dispatching again (a bounded number of times) when the instance refused."""
        if not self.sink_address:
            raise NoCapacityError("frontend output sink is not serving yet")
        refusals: list[str] = []
        for _ in range(self.dispatch_attempts):
            instance_id, address = await self._dispatch(request, engine_request.sampling.max_tokens)
            self._addresses[instance_id] = address
            self._dispatched[request.request_id] = instance_id
            request.instance_id = instance_id
            add = llumlet_pb2.AddRequestRequest(request=engine_request)
            try:
                await self.channels.llumlet(address).AddRequest(add, timeout=self.call_timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # maybe added: keep instance_id so release aborts it
                    raise NoCapacityError(f"instance {instance_id} did not answer in time") from exc
                request.instance_id = ""
                self._release_dispatch(request.request_id)
                if code in _RETRYABLE_ADD:
                    refusals.append(f"{instance_id}: {code.name} {exc.details()}")
                    if isinstance(self.dispatcher, RefusalAware):
                        self.dispatcher.refused(instance_id)
                    continue
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequestError(exc.details() or "rejected by the instance") from exc
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    raise DuplicateRequestError(f"request id {request.request_id!r} is in use") from exc
                raise RequestFailedError(f"instance {instance_id}: {code.name} {exc.details()}") from exc
            if request.finished:  # aborted by the client while being added
                self._abort_soon(request)
            return
        raise NoCapacityError(f"no instance accepted the request ({'; '.join(refusals)})")

    async def _dispatch(self, request: TrackedRequest, max_tokens: int) -> tuple[str, str]:
        """The dispatcher's choice; client-library errors (clients/dispatch.py) become frontend errors."""
        try:
            instance_id, address = await self.dispatcher.dispatch(
                request.request_id, request.priority, request.num_prompt_tokens, max_tokens
            )
        except FrontendError:
            raise
        except LlumnixError as exc:
            if exc.code == "INVALID_ARGUMENT":
                raise InvalidRequestError(f"rejected by the scheduler: {exc}") from exc
            raise NoCapacityError(f"no instance can take the request: {exc}") from exc
        return instance_id, address

    def _release_dispatch(self, request_id: str) -> None:
        instance_id = self._dispatched.pop(request_id, None)
        if instance_id is not None and isinstance(self.dispatcher, Releasing):
            self.dispatcher.release(instance_id)

    def _abort_soon(self, request: TrackedRequest) -> None:
        """Aborts on the current instance in the background (callers may be cancelled or synchronous)."""
        if not request.instance_id:
            return
        task = asyncio.get_running_loop().create_task(self._abort_on_instance(request.request_id, request.instance_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_on_instance(self, request_id: str, instance_id: str) -> None:
        address = self._addresses.get(instance_id)
        if address is None and self.resolver is not None:
            address = await self.resolver.address_of(instance_id)
        if address is None:
            # Its next push is answered "unknown request", which makes the llumlet abort it anyway.
            log.info(
                "abort %s: address of %s unknown; relying on the sink's unknown-request reply", request_id, instance_id
            )
            return
        try:
            await self.channels.llumlet(address).AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id=request_id), timeout=self.call_timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("abort %s on %s failed: %s", request_id, instance_id, exc.code().name)

    async def close(self) -> None:
        """Finishes background aborts and closes channels."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.call_timeout)
        await self.channels.close()
