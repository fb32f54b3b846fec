"""The frontend core: validates a request, tracks it, places it on an instance, and cleans up after it.

Both user surfaces (gRPC Generate and the OpenAI HTTP API) go through ``Frontend.open``, an async context manager, so
"the client went away" means the same thing everywhere: leaving the context with the request unfinished aborts it on
whichever instance holds it now.

Protection of the event loop and of the cluster lives here too, so both surfaces get it: an in-flight limit (beyond it
OverloadedError, HTTP 429 / RESOURCE_EXHAUSTED) and a per-API-key share of it (so one key cannot take every slot and
starve the other users), a prompt size cap checked before tokenising, tokenising of large
prompts on a worker thread, range checks of every sampling parameter, a bounded dispatch, and an idle timeout and
optional deadline on every request's output stream.

Authorization: each request records the id of the API key that created it (``owner``); only that key or an admin key
may abort it (PermissionDeniedError, HTTP 403). A frontend without API keys has no owners and no such check. Every
placement grants the chosen instance a capability token for the request (see ``requests.HolderLedger`` and ``sink``).
Client-chosen request ids are at most ``MAX_REQUEST_ID_CHARS`` characters of ``REQUEST_ID_CHARS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from aiohttp import web

from pyllumnix.clients.errors import LlumnixError, ResourceExhaustedError
from pyllumnix.control_plane.frontend.channels import ChannelPool
from pyllumnix.control_plane.frontend.dispatch import (
    Dispatcher,
    Readiness,
    ReadinessAware,
    RefusalAware,
    Releasing,
    public_cause,
)
from pyllumnix.control_plane.frontend.errors import (
    DuplicateRequestError,
    FrontendError,
    InvalidRequestError,
    ModelNotFoundError,
    NoCapacityError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RequestFailedError,
    RequestNotFoundError,
)
from pyllumnix.control_plane.frontend.metrics import FrontendMetrics
from pyllumnix.control_plane.frontend.requests import RequestTracker, TrackedRequest
from pyllumnix.control_plane.frontend.tokenizer import Tokenizer
from pyllumnix.infra import tracing, wire
from pyllumnix.infra.security.apikeys import REQUEST_KEY, VERIFIED_API_KEY, ApiKey
from pyllumnix.infra.vocabulary import normalize_priority, parse_priority
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# AddRequest failures that prove the request was not added, so dispatching it again is safe (RESOURCE_EXHAUSTED: the
# instance's queue is full).
_RETRYABLE_ADD = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)

# Limits of the sampling parameters (OpenAI's where it has them: at most 4 stop strings, penalties in [-2, 2]).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
# OpenAI's sampling temperature range; vLLM's SamplingParams refuses more (VLLMValidationError), so a larger value is
# refused here, on gRPC and HTTP alike, rather than by the engine after a dispatch.
MAX_TEMPERATURE = 2.0
PENALTY_RANGE = (-2.0, 2.0)
MAX_REPETITION_PENALTY = 10.0
# Bytes of prompt text allowed per token of the model's length when no explicit cap is given (a token is rarely more
# than 16 bytes of text), and the least such cap: enough that no valid prompt is refused, small enough that tokenising
# it cannot stall anything.
AUTO_PROMPT_BYTES_PER_TOKEN = 32
MIN_AUTO_PROMPT_BYTES = 64 << 10
# Prompts of more characters than this are tokenised on a worker thread. Measured here: the sim tokenizer takes ~1.7 ms
# for 1 Ki characters, ~8.5 ms for 4 Ki, ~37 ms for 16 Ki; the thread hop ~40 us. Below 2 Ki the hop is not worth it.
OFFLOAD_CHARS = 2 << 10


# Client-chosen request ids: they appear in URLs, logs, metrics labels and etcd-free lookups, so short and plain.
MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_CHARS = "letters, digits and . _ : -"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")


def check_request_id(request_id: str) -> None:
    """A client-chosen request id: at most MAX_REQUEST_ID_CHARS of REQUEST_ID_CHARS (InvalidRequestError, 400)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} allowed", param="request_id"
        )
    if not _REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidRequestError(f"request_id may contain only {REQUEST_ID_CHARS}", param="request_id")


def api_key_of(request: web.Request) -> ApiKey | None:
    """The caller's API key as the frontend's API-key middleware left it on an aiohttp request (None: no keys)."""
    key = request.get(REQUEST_KEY)
    return key if isinstance(key, ApiKey) else None


def grpc_api_key_of(context: object) -> ApiKey | None:
    """The caller's API key on the gRPC surface: the one the ApiKeyInterceptor verified for this call, with its role
    (an admin key may abort others' requests, as over HTTP). None when the frontend checks no keys. Never read from
    the metadata here: a second, unverified entry once let a user pose as another key."""
    del context  # the call's own task carries the verified key
    return VERIFIED_API_KEY.get()


def may_act_on(owner_key_id: str, caller: ApiKey | None) -> bool:
    """Whether ``caller`` may act on (abort, see) a request created by key ``owner_key_id``."""
    if caller is not None and caller.role == "admin":
        return True
    if not owner_key_id:  # created on a frontend without API keys
        return True
    return caller is not None and caller.id == owner_key_id


def utf8_len_over(text: str, limit: int) -> bool:
    """Whether ``text`` is more than ``limit`` UTF-8 bytes, without encoding it when the answer is clear already."""
    if len(text) > limit:
        return True
    if len(text) * 4 <= limit or text.isascii():
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def check_text(value: str, param: str) -> None:
    """Text must be valid Unicode (no lone surrogates: JSON allows ``"\\ud800"``, UTF-8 and protobuf do not)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{param} is not valid Unicode text: {exc.reason}", param=param) from exc


def _check_range(value: float, param: str, lo: float, hi: float) -> None:
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequestError(f"{param} must be a finite number in [{lo:g}, {hi:g}], got {value}", param=param)


def check_sampling(s: common_pb2.SamplingParams, vocab_size: int) -> None:
    """Range and finiteness of every field, as both surfaces hand them in (the wire's 0 means "unset" where noted in
    common.proto)."""
    _check_range(s.temperature, "temperature", 0.0, MAX_TEMPERATURE)
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:  # 0 means "unset" (1.0) on the wire
        raise InvalidRequestError(f"top_p must be in (0, 1], got {s.top_p}", param="top_p")
    if s.top_k < -1:
        raise InvalidRequestError(f"top_k must be -1 or 0 (disabled) or positive, got {s.top_k}", param="top_k")
    _check_range(s.presence_penalty, "presence_penalty", *PENALTY_RANGE)
    _check_range(s.frequency_penalty, "frequency_penalty", *PENALTY_RANGE)
    # 0 means "unset" (1.0) on the wire
    if s.repetition_penalty != 0 and not 0 < s.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequestError(
            f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {s.repetition_penalty}",
            param="repetition_penalty",
        )
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}", param="stop")
    for stop in s.stop:
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidRequestError(f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids", param="stop_token_ids")
    bad = [t for t in s.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop token ids out of vocabulary: {bad[:5]}", param="stop_token_ids")


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
    # True: ``sampling.max_tokens`` is unset and means "up to the model's maximum length" (the OpenAI default).
    fill_max_tokens: bool = False


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
        idle_timeout: float | None = 30.0,
        request_timeout: float | None = None,
        max_inflight: int = 256,
        max_requests_per_key: int | None = None,
        max_prompt_bytes: int = 0,
        dispatch_timeout: float = 5.0,
        readiness_timeout: float = 1.0,
    ) -> None:
        """``idle_timeout``: seconds a request may go without output before it is ended and aborted (None: never);
        ``request_timeout``: overall deadline per request (None: none); ``max_inflight``: requests this frontend serves
        at once (beyond: OverloadedError); ``max_requests_per_key``: requests one API key may have in flight here
        (None: a quarter of ``max_inflight``, at least 1; 0: no cap); ``max_prompt_bytes``: prompt text cap (0: derived
        from max_model_len)."""
        if max_model_len <= 0 or dispatch_attempts <= 0 or max_inflight <= 0:
            raise ValueError("max_model_len, dispatch_attempts and max_inflight must be positive")
        if max_requests_per_key is not None and max_requests_per_key < 0:
            raise ValueError("max_requests_per_key must be >= 0 (0: no cap)")
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
        self.idle_timeout = idle_timeout if idle_timeout else None
        self.request_timeout = request_timeout if request_timeout else None
        self.max_inflight = max_inflight
        self.max_requests_per_key = max(1, max_inflight // 4) if max_requests_per_key is None else max_requests_per_key
        self.max_prompt_bytes = max_prompt_bytes or max(
            MIN_AUTO_PROMPT_BYTES, max_model_len * AUTO_PROMPT_BYTES_PER_TOKEN
        )
        self.dispatch_timeout = dispatch_timeout
        self.readiness_timeout = readiness_timeout
        self.tracker = RequestTracker()
        # Tells the scheduler leader's replica id (``sink.ElectionLeader``; set where etcd is known): the output sink
        # takes lost-instance notices from that scheduler only (None: from none).
        self.scheduler_leader: Callable[[], Awaitable[str | None]] | None = None
        # Requests admitted and not yet released (tracked ones plus those still being validated).
        self._admitted = 0
        # Requests whose body is still being read or parsed (the HTTP API, ``reading_body``): they hold a slot too.
        self._reading = 0
        # API key id -> its requests admitted and not yet released (the per-key cap; keys with none are not kept).
        self._per_key: dict[str, int] = {}
        # Heavy per-request CPU work (tokenising a long prompt, parsing a large body) runs here, off the event loop.
        # One thread: the work is mostly Python (GIL-bound), so more threads would add contention with the loop, not
        # throughput.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frontend-cpu")
        self.created = int(time.time())
        self._addresses: dict[str, str] = {}
        # request id -> the instance its dispatch chose (what the dispatcher's ``release`` expects back).
        self._dispatched: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        # request id -> its aborts still on their way to an instance. The id stays reserved until they are answered:
        # an abort names the request by id only, so one landing after a new request of the same id was added (a
        # client reusing the id at once) would kill that one instead.
        self._aborting: dict[str, set[asyncio.Task[None]]] = {}
        # request id -> its trace span (tracing on only): from arrival to release; dispatch and AddRequest are its
        # children, so the scheduler and the instance continue the same trace.
        self._traces: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def open(self, inp: GenerationInput, *, owner: ApiKey | None = None) -> AsyncIterator[TrackedRequest]:
        """Submits ``inp`` for ``owner`` (the caller's API key); the body reads ``request.deltas()``; leaving early
        aborts the request."""
        request = await self.submit(inp, owner=owner)
        try:
            yield request
        finally:
            self.release(request)

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet released: what the in-flight limit counts."""
        return self._admitted

    @property
    def load(self) -> int:
        """Requests holding an in-flight slot: the admitted ones plus those whose body is still being read. The limit
        counts these on every API (a gRPC request is refused while HTTP uploads hold the slots, as an HTTP one is),
        and ``/get_load`` reports them: an upload becomes a request here, so a router must not take a frontend busy
        reading bodies for an idle one."""
        return self._admitted + self._reading

    @contextlib.contextmanager
    def reading_body(self, owner: ApiKey | None = None) -> Iterator[None]:
        """Holds an in-flight slot while a request's body is read and parsed (the HTTP API sheds on ``load`` before
        it reads anything, so stalled or slow uploads cannot pile up beyond the limit); leave it before ``submit``,
        which takes the request's own slot. The upload holds one of ``owner``'s per-key slots too (OverloadedError at
        the cap): before, one key's uploads were counted only globally, so a single key could hold every slot with
        stalled bodies."""
        key_id = self._admit_key(owner)
        self._reading += 1
        try:
            yield
        finally:
            self._reading -= 1
            self._release_key(key_id)

    def check_admission(self) -> None:
        """Raises OverloadedError when the in-flight limit is reached (cheap: callers may shed before parsing)."""
        if self.load >= self.max_inflight:
            exc = OverloadedError(f"this frontend is serving its limit of {self.max_inflight} requests; retry later")
            self.metrics.rejected.labels(exc.code.name).inc()
            raise exc

    def _admit_key(self, owner: ApiKey | None) -> str:
        """Takes one of ``owner``'s per-key slots; returns the key id to give back with ``_release_key`` ("" for a
        frontend without API keys and for admin keys, which have no per-key cap). Raises OverloadedError at the cap.

        Admin keys are exempt: they are the operator's own tools (``bench serving``/``bench peers``/``sim live`` and
        drills replay hundreds of concurrent streams on the admin key of ``serve``'s context), and an admin can drain
        or reconfigure the cluster anyway, so capping it protects no one. The global ``max_inflight`` still holds."""
        if owner is None or owner.role == "admin":
            return ""
        held = self._per_key.get(owner.id, 0)
        if self.max_requests_per_key and held >= self.max_requests_per_key:
            exc = OverloadedError(
                f"API key {owner.name!r} has its limit of {self.max_requests_per_key} requests in flight on this "
                "frontend (--max-requests-per-key); retry when one ends"
            )
            self.metrics.rejected.labels(exc.code.name).inc()
            raise exc
        self._per_key[owner.id] = held + 1
        return owner.id

    def _release_key(self, key_id: str) -> None:
        """Gives back one per-key slot taken by ``_admit_key``."""
        if not key_id:
            return
        held = self._per_key.get(key_id, 0) - 1
        if held > 0:
            self._per_key[key_id] = held
        else:
            self._per_key.pop(key_id, None)

    def requests_in_flight_of(self, key_id: str) -> int:
        """Requests of one API key admitted and not yet released (what the per-key cap counts)."""
        return self._per_key.get(key_id, 0)

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """Runs ``fn(*args)`` on the frontend's worker threads, so heavy CPU work does not stall the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def readiness(self) -> Readiness:
        """Whether a request could be served now: the sink serves and the dispatcher has somewhere to send it."""
        if not self.sink_address:
            return Readiness(False, "the output sink is not serving yet")
        if not isinstance(self.dispatcher, ReadinessAware):
            return Readiness(True, "dispatcher has no readiness check")
        try:
            return await asyncio.wait_for(self.dispatcher.readiness(), self.readiness_timeout)
        except TimeoutError:
            return Readiness(False, f"the dispatcher's readiness check took over {self.readiness_timeout:g}s")
        except Exception as exc:
            log.warning("readiness check failed", exc_info=True)
            return Readiness(False, f"the dispatcher's readiness check failed ({public_cause(exc)})", str(exc))

    async def submit(self, inp: GenerationInput, *, owner: ApiKey | None = None) -> TrackedRequest:
        """Validates, tracks and places a request; the caller must ``release`` it. Raises FrontendError."""
        self.check_admission()
        key_id = self._admit_key(owner)
        self._admitted += 1
        try:
            prompt_ids, max_tokens = await self._validate(inp)
            if inp.request_id in self._aborting:
                await self._await_aborts(inp.request_id)
            request = TrackedRequest(
                request_id=inp.request_id or uuid.uuid4().hex,
                prompt_token_ids=prompt_ids,
                detokenizer=self.tokenizer.detokenizer(prompt_ids),
                stop=[s for s in inp.sampling.stop if s],
                priority=wire.priority_to_pb(normalize_priority(inp.priority)),
                on_stop=self._abort_soon,
                idle_timeout=self.idle_timeout,
                deadline=time.monotonic() + self.request_timeout if self.request_timeout else None,
                max_tokens=max_tokens,
                owner_key_id=owner.id if owner is not None else "",
            )
            self.tracker.add(request)
        except BaseException as exc:
            self._admitted -= 1
            self._release_key(key_id)
            if isinstance(exc, FrontendError):
                self.metrics.rejected.labels(exc.code.name).inc()
            raise
        self.metrics.inflight.inc()
        if tracing.enabled():  # a child of the caller's traceparent (gRPC: the server span; HTTP: the handler's)
            attributes = {"llumnix.request_id": request.request_id, "llumnix.prompt_tokens": len(prompt_ids)}
            self._traces[request.request_id] = tracing.start_span("llumnix.request", None, attributes)
        try:
            with tracing.activated(self._traces.get(request.request_id)):
                await self._place(request, self._engine_request(request, inp.sampling, max_tokens))
        except BaseException as exc:
            if isinstance(exc, FrontendError):
                self.metrics.rejected.labels(exc.code.name).inc()
            self.release(request, record=False)
            raise
        self.metrics.prompt_tokens.inc(len(prompt_ids))  # only prompts that reached an instance
        return request

    def count_rejected(self, exc: FrontendError) -> None:
        """Counts a refusal made before ``submit`` (a surface's own parsing: bad JSON, a schema error)."""
        self.metrics.rejected.labels(exc.code.name).inc()

    def release(self, request: TrackedRequest, *, record: bool = True) -> None:
        """Forgets a request; if it is unfinished, finishes it as aborted and aborts it on its instance."""
        if self.tracker.get(request.request_id) is not request:
            return
        if not request.finished:
            request.finish(common_pb2.FINISH_REASON_ABORT)
            self._abort_soon(request)
        self.tracker.remove(request.request_id)
        self._admitted -= 1
        self._release_key(request.owner_key_id)
        span = self._traces.pop(request.request_id, None)
        if span is not None:
            if request.first_token_time is not None:
                tracing.event(span, "first_token", ts=request.first_token_time)
            reason = wire.finish_label(request.finish_reason) or "unspecified"
            tracing.event(span, "finish", {"llumnix.finish": reason, "llumnix.tokens": request.num_received})
            span.set_attributes({"llumnix.finish": reason, "llumnix.instance_id": request.instance_id})
            span.end()
        self._release_dispatch(request.request_id)
        self.metrics.inflight.dec()
        if not record:
            return
        if request.timed_out:
            self.metrics.timeouts.inc()
        now = time.time()
        reason = wire.finish_label(request.finish_reason) or "unspecified"
        self.metrics.requests.labels(reason).inc()
        self.metrics.generation_tokens.inc(request.num_received)
        self.metrics.e2e.observe(max(0.0, now - request.arrival_time))
        if request.first_token_time is not None:
            self.metrics.ttft.observe(max(0.0, request.first_token_time - request.arrival_time))

    async def abort(self, request_id: str, caller: ApiKey | None = None) -> None:
        """Aborts a request this frontend owns; its stream ends with FINISH_REASON_ABORT. Raises NOT_FOUND, and
        PermissionDeniedError when ``caller`` (the caller's API key) is neither the request's creator nor an admin."""
        request = self.tracker.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no request {request_id!r} on this frontend", param="request_id")
        if not may_act_on(request.owner_key_id, caller):
            who = f"API key {caller.name!r}" if caller is not None else "a caller without an API key"
            raise PermissionDeniedError(
                f"request {request_id!r} was created by another API key; {who} may not abort it", param="request_id"
            )
        if not request.finished:
            request.finish(common_pb2.FINISH_REASON_ABORT)
            self._abort_soon(request)

    def requests_of(self, caller: ApiKey | None) -> list[TrackedRequest]:
        """The requests ``caller`` may see: its own, or every one for an admin (and on a frontend without keys)."""
        if caller is None or caller.role == "admin":
            return self.tracker.owned_by(None)
        return self.tracker.owned_by(caller.id)

    async def _validate(self, inp: GenerationInput) -> tuple[list[int], int]:
        """The prompt's token ids and the max_tokens to use; every check that needs no tokens runs first, so a bad
        or oversized request costs no tokenising."""
        if inp.model and inp.model != self.model:
            check_text(inp.model, "model")
            raise ModelNotFoundError(f"the model {inp.model!r} does not exist (served: {self.model!r})", param="model")
        try:
            parse_priority(int(inp.priority))  # a gRPC client may send any int; HTTP parsed it by name already
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="priority") from None
        s = inp.sampling
        if not inp.fill_max_tokens and s.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be positive, got {s.max_tokens}", param="max_tokens")
        if s.max_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens ({s.max_tokens}) leaves no room for a prompt within the model's maximum length of"
                f" {self.max_model_len}",
                param="max_tokens",
            )
        check_sampling(s, self.tokenizer.vocab_size)
        for stop in s.stop:
            check_text(stop, "stop")
        if inp.request_id:
            check_request_id(inp.request_id)
        if isinstance(inp.prompt, str):
            if utf8_len_over(inp.prompt, self.max_prompt_bytes):
                raise PayloadTooLargeError(
                    f"the prompt is over {self.max_prompt_bytes} bytes (this model takes at most"
                    f" {self.max_model_len} tokens)",
                    param="prompt",
                )
            check_text(inp.prompt, "prompt")
            prompt_ids = await self._tokenize(inp.prompt) if inp.prompt else []
        else:
            if len(inp.prompt) >= self.max_model_len:
                raise InvalidRequestError(
                    f"the prompt has {len(inp.prompt)} tokens; the model's maximum length is {self.max_model_len}",
                    param="prompt",
                )
            prompt_ids = list(inp.prompt)
            bad = [t for t in prompt_ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids out of vocabulary: {bad[:5]}", param="prompt")
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        max_tokens = s.max_tokens
        if inp.fill_max_tokens and max_tokens <= 0:
            if len(prompt_ids) >= self.max_model_len:  # no room for a token: the prompt is at fault, not max_tokens
                raise InvalidRequestError(
                    f"the prompt has {len(prompt_ids)} tokens; the model's maximum length is {self.max_model_len}",
                    param="prompt",
                )
            max_tokens = self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's maximum length"
                f" of {self.max_model_len}",
                param="max_tokens",
            )
        return prompt_ids, max_tokens

    async def _tokenize(self, text: str) -> list[int]:
        """Long prompts, and every prompt of a tokenizer that encodes without the GIL (HF), go to the worker thread;
        the single worker also keeps an HF tokenizer's encodes from overlapping each other."""
        if len(text) <= OFFLOAD_CHARS and not getattr(self.tokenizer, "encodes_without_gil", False):
            return self.tokenizer.encode(text)
        return await self.offload(self.tokenizer.encode, text)

    def _engine_request(
        self, request: TrackedRequest, sampling: common_pb2.SamplingParams, max_tokens: int
    ) -> common_pb2.EngineRequest:
        engine_sampling = common_pb2.SamplingParams()
        engine_sampling.CopyFrom(sampling)
        engine_sampling.max_tokens = max_tokens
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
        """Dispatch + AddRequest, dispatching again (a bounded number of times) when the instance refused, or did not
        answer in time (DEADLINE_EXCEEDED is ambiguous: the instance may still add the request, so it is told to abort
        it and its outputs for the request are dropped from then on; an instance that did not answer is not tried
        again for the same request)."""
        if not self.sink_address:
            raise NoCapacityError("frontend output sink is not serving yet")
        refusals: list[str] = []
        codes: set[grpc.StatusCode] = set()
        for _ in range(self.dispatch_attempts):
            instance_id, address = await self._dispatch(request, engine_request.sampling.max_tokens)
            if instance_id in request.revoked:  # it did not answer this request's AddRequest: do not wait on it again
                self._release_now(instance_id)
                refusals.append(f"{instance_id}: did not answer in time")
                codes.add(grpc.StatusCode.DEADLINE_EXCEEDED)
                continue
            self._addresses[instance_id] = address
            self._dispatched[request.request_id] = instance_id
            request.instance_id = instance_id
            engine_request.capability = self.tracker.ledger.grant(request.request_id, instance_id)
            add = llumlet_pb2.AddRequestRequest(request=engine_request)
            channel = self.channels.channel(address)
            try:
                with tracing.span("add_request", None, {"llumnix.instance_id": instance_id}):
                    await self.channels.add_request(address, add, self.call_timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:  # the next call dials afresh (e.g. a restarted llumlet)
                    self.channels.discard(address, channel)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # Ambiguous: the instance may have added it (and may push outputs once it wakes up). Abort it
                    # there, best-effort, and never accept its outputs for this request (``revoke``: the next grant
                    # also makes its capability stale); then place the request elsewhere.
                    self._abort_soon(request)
                    request.revoke(instance_id)
                    refusals.append(f"{instance_id}: did not answer in time")
                    codes.add(code)
                    request.instance_id = ""
                    self._release_dispatch(request.request_id)
                    if isinstance(self.dispatcher, RefusalAware):
                        self.dispatcher.refused(instance_id)
                    continue
                request.instance_id = ""
                self._release_dispatch(request.request_id)
                if code == grpc.StatusCode.ABORTED and not request.finished:
                    # The instance's tombstone for this id: an earlier request's abort (ids may be the client's)
                    # reached it after that request had left. Never this request's: it is aborted on an instance
                    # only once finished or once its add there is abandoned. The refusal took the tombstone: retry.
                    refusals.append(f"{instance_id}: {exc.details()}")
                    codes.add(code)
                    continue
                if code in _RETRYABLE_ADD:
                    refusals.append(f"{instance_id}: {code.name} {exc.details()}")
                    codes.add(code)
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
            request.touch()
            return
        if codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}:
            raise OverloadedError(f"every instance tried is full ({'; '.join(refusals)}); retry later")
        raise NoCapacityError(f"no instance accepted the request ({'; '.join(refusals)})")

    async def _dispatch(self, request: TrackedRequest, max_tokens: int) -> tuple[str, str]:
        """The dispatcher's choice; client-library errors (routing.py) become frontend errors."""
        try:
            # asyncio.timeout, not wait_for: no extra task (and loop iteration) per request.
            with tracing.span("dispatch") as span:
                async with asyncio.timeout(self.dispatch_timeout):
                    instance_id, address = await self.dispatcher.dispatch(
                        request.request_id, request.priority, request.num_prompt_tokens, max_tokens
                    )
                tracing.set_attributes({"llumnix.instance_id": instance_id}, span)
        except FrontendError:
            raise
        except TimeoutError as exc:
            raise NoCapacityError(f"dispatch did not answer within {self.dispatch_timeout:g}s") from exc
        except ResourceExhaustedError as exc:
            raise OverloadedError(f"the cluster is full: {exc}") from exc
        except LlumnixError as exc:
            if exc.code == "INVALID_ARGUMENT":
                raise InvalidRequestError(f"rejected by the scheduler: {exc}") from exc
            raise NoCapacityError(f"no instance can take the request: {exc}") from exc
        except Exception as exc:  # e.g. a registry client's own error: still "cannot dispatch now", never a 500
            log.warning("dispatch of %s failed", request.request_id, exc_info=True)
            raise NoCapacityError(f"no instance can take the request: {exc}") from exc
        return instance_id, address

    def _release_dispatch(self, request_id: str) -> None:
        instance_id = self._dispatched.pop(request_id, None)
        if instance_id is not None:
            self._release_now(instance_id)

    def _release_now(self, instance_id: str) -> None:
        """Gives back one dispatch to ``instance_id`` (the dispatcher's ``release`` hook)."""
        if isinstance(self.dispatcher, Releasing):
            self.dispatcher.release(instance_id)

    def _abort_soon(self, request: TrackedRequest) -> None:
        """Aborts on the current instance in the background (callers may be cancelled or synchronous); the request's
        id stays reserved until the abort is answered (see ``_await_aborts``)."""
        if not request.instance_id:
            return
        request_id = request.request_id
        capability = self.tracker.ledger.token_of(request_id, request.instance_id)
        task = asyncio.get_running_loop().create_task(
            self._abort_on_instance(request_id, request.instance_id, capability)
        )
        self._background.add(task)
        self._aborting.setdefault(request_id, set()).add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            pending = self._aborting.get(request_id)
            if pending is not None:
                pending.discard(t)
                if not pending:
                    del self._aborting[request_id]

        task.add_done_callback(done)

    async def _await_aborts(self, request_id: str) -> None:
        """A new request reuses the id of one whose abort is still on its way: waits for that abort's answer (it is
        bounded by the call timeout), so it cannot land on the new one; DuplicateRequestError (409) if it does not
        come in time."""
        pending = self._aborting.get(request_id)
        if pending:
            await asyncio.wait(set(pending), timeout=2 * self.call_timeout)
        if self._aborting.get(request_id):
            raise DuplicateRequestError(
                f"request id {request_id!r} is in use: an earlier request with this id is still being aborted; "
                "retry shortly",
                param="request_id",
            )

    async def _abort_on_instance(self, request_id: str, instance_id: str, capability: str = "") -> None:
        address = self._addresses.get(instance_id)
        if address is None and self.resolver is not None:
            address = await self.resolver.address_of(instance_id)
        if address is None:
            # Its next push is answered "unknown request", which makes the llumlet abort it anyway.
            log.info(
                "abort %s: address of %s unknown; relying on the sink's unknown-request reply", request_id, instance_id
            )
            return
        channel = self.channels.channel(address)
        try:
            await llumlet_pb2_grpc.LlumletServiceStub(channel).AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id=request_id, capability=capability),
                timeout=self.call_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.channels.discard(address, channel)
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("abort %s on %s failed: %s", request_id, instance_id, exc.code().name)

    async def close(self) -> None:
        """Finishes background aborts and closes channels."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.call_timeout)
        await self.channels.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
