"""Pushes request outputs to the frontends that own them, in order per frontend, without ever dropping one silently.

One sender task per frontend address sends one batch at a time; a batch is never overtaken by a later one. A failed
push is retried with exponential backoff and a growing per-attempt deadline (a slow frontend is not a dead one:
DEADLINE_EXCEEDED is a retry) for up to ``PushSettings.budget_s``. Only when that budget is spent is the frontend
given up: its queued outputs are replaced by one final ERROR output per request (sent in case it comes back) and
``on_unreachable`` lets the llumlet abort its requests and free their blocks.

While a batch is in flight, newer outputs of one request are merged into one queued message (token ids appended; the
indices are contiguous), so a stalled frontend costs O(requests) queued messages, not O(tokens).

Ordering matters across a migration: before a request's last stage commits on the destination, the source calls
``flush(frontend)`` so every token it produced reaches the frontend before the destination's first one.

A sender with nothing to send for ``idle_close_s`` closes its channel and ends (the next output re-opens one), so
addresses seen once do not keep a channel and a task for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential

from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc

log = logging.getLogger(__name__)

# Answers that no retry can change: the frontend exists but refuses this push.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_TERMINAL = (common_pb2.FINISH_REASON_ERROR, common_pb2.FINISH_REASON_ABORT)


@dataclass(frozen=True)
class PushSettings:
    """How hard the llumlet tries to reach a frontend before giving its requests up."""

    # Total time one batch may keep failing (from its first attempt) before the frontend counts as gone.
    budget_s: float = 30.0
    # Deadline of a batch's first attempt; it doubles with each retry, up to max_attempt_timeout_s.
    attempt_timeout_s: float = 2.0
    max_attempt_timeout_s: float = 10.0
    # Backoff between attempts: 0.1 s doubling, at most this.
    max_backoff_s: float = 2.0
    # A sender with nothing to send this long closes its channel and ends.
    idle_close_s: float = 60.0
    # flush's default wait, as before (a migration's request is suspended meanwhile; on timeout it aborts).
    flush_timeout_s: float = 6.0

    def __post_init__(self) -> None:
        if min(self.budget_s, self.attempt_timeout_s, self.max_attempt_timeout_s, self.idle_close_s) <= 0:
            raise ValueError(f"push settings must be positive: {self}")


class FrontendUnreachableError(Exception):
    """A flush cannot complete: the pusher gave up on the frontend (its outputs were not delivered)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() not in PERMANENT_CODES
    return isinstance(exc, TimeoutError | ConnectionError | asyncio.InvalidStateError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    return type(exc).__name__


class _Sink:
    """What one frontend address has queued, in flight and settled. Submits are numbered; ``settled`` is the highest
    submit whose outputs were delivered or given up (batches settle in order)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = open_channel(address)
        self.stub = frontend_pb2_grpc.OutputSinkServiceStub(self.channel)
        self.pending: list[common_pb2.RequestOutput] = []
        # request id -> its newest message in ``pending`` (the one a next output can be merged into)
        self.tail: dict[str, common_pb2.RequestOutput] = {}
        self.submitted = 0
        self.settled = 0
        self.last_lost = 0  # highest submit given up
        # First-attempt deadline for the next batch: it stays as long as a slow frontend needed, decays when fast.
        self.attempt_timeout = 0.0
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    def add(self, out: common_pb2.RequestOutput) -> bool:
        """Queues ``out``; returns True when it was merged into the request's queued message."""
        last = self.tail.get(out.request_id)
        if (
            last is not None
            and not last.finished
            and out.first_token_index == last.first_token_index + len(last.token_ids)
        ):
            last.token_ids.extend(out.token_ids)
            if out.finished:
                last.finished = True
                last.finish_reason = out.finish_reason
                last.error = out.error
            last.instance_id = out.instance_id or last.instance_id
            return True
        self.pending.append(out)
        self.tail[out.request_id] = out
        return False

    def take(self) -> tuple[list[common_pb2.RequestOutput], int]:
        batch, self.pending, self.tail = self.pending, [], {}
        return batch, self.submitted

    async def settle(self, seq: int, *, lost: bool) -> None:
        self.settled = max(self.settled, seq)
        if lost:
            self.last_lost = max(self.last_lost, seq)
        async with self.changed:
            self.changed.notify_all()


class OutputPusher:
    """One sender task per frontend address.

    ``on_orphans(request_ids)``: the frontend answered that it does not know these requests (abort them silently).
    ``on_unreachable(address, request_ids)``: the frontend could not be reached for the whole budget; ``request_ids``
    had outputs dropped (each got a final ERROR output queued instead); the llumlet aborts every request it still
    holds for ``address``.
    """

    def __init__(
        self,
        instance_id: str,
        on_orphans: Callable[[list[str]], None],
        on_unreachable: Callable[[str, list[str]], None] | None = None,
        settings: PushSettings | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._on_orphans = on_orphans
        self._on_unreachable = on_unreachable
        self.settings = settings or PushSettings()
        self._sinks: dict[str, _Sink] = {}
        self.pushed = 0  # messages delivered
        self.coalesced = 0  # outputs merged into a queued message
        self.retries = 0
        self.given_up = 0  # batches given up after the whole budget
        self.sinks_closed = 0  # senders closed for idleness

    @property
    def addresses(self) -> list[str]:
        """Frontends with an open sender."""
        return list(self._sinks)

    def queued(self, frontend_address: str) -> int:
        """Messages queued (not in flight) for a frontend."""
        sink = self._sinks.get(frontend_address)
        return len(sink.pending) if sink is not None else 0

    def submit(self, frontend_address: str, outputs: list[common_pb2.RequestOutput]) -> None:
        """Queues outputs (the pusher owns the messages from now on: it may merge later outputs into them)."""
        if not outputs:
            return
        sink = self._sinks.get(frontend_address)
        if sink is None:
            sink = self._sinks[frontend_address] = _Sink(frontend_address)
            sink.task = asyncio.get_running_loop().create_task(self._run(sink), name=f"push-{frontend_address}")
        for out in outputs:
            self.coalesced += sink.add(out)
        sink.submitted += 1
        sink.wake.set()

    async def flush(self, frontend_address: str, timeout: float | None = None) -> None:
        """Returns once everything submitted for the frontend so far was delivered.

        Raises TimeoutError after ``timeout`` (default ``settings.flush_timeout_s``) and FrontendUnreachableError when
        the pusher gave up on the frontend meanwhile.
        """
        sink = self._sinks.get(frontend_address)
        if sink is None:
            return
        target, settled_before = sink.submitted, sink.settled
        async with asyncio.timeout(self.settings.flush_timeout_s if timeout is None else timeout):
            async with sink.changed:
                await sink.changed.wait_for(lambda: sink.settled >= target)
        if sink.last_lost > settled_before:
            raise FrontendUnreachableError(f"outputs to frontend {frontend_address} were given up")

    async def drain(self, timeout: float) -> None:
        """Best-effort flush of every frontend (shutdown): waits at most ``timeout`` in all."""
        flushes = [self.flush(address, timeout) for address in list(self._sinks)]
        if flushes:
            await asyncio.gather(*flushes, return_exceptions=True)

    async def _run(self, sink: _Sink) -> None:
        try:
            while True:
                while not sink.pending:
                    sink.wake.clear()
                    try:
                        async with asyncio.timeout(self.settings.idle_close_s):
                            await sink.wake.wait()
                    except TimeoutError:
                        if not sink.pending:
                            await self._retire(sink)
                            return
                batch, seq = sink.take()
                await self._deliver(sink, batch, seq)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not silently stop every push to this frontend
            log.exception("output sender for %s failed", sink.address)
            if self._sinks.get(sink.address) is sink:
                del self._sinks[sink.address]
            await sink.settle(sink.submitted, lost=True)

    async def _retire(self, sink: _Sink) -> None:
        if self._sinks.get(sink.address) is sink:
            del self._sinks[sink.address]
        self.sinks_closed += 1
        log.debug("output sender for %s idle for %.0f s; closed", sink.address, self.settings.idle_close_s)
        await sink.channel.close()

    async def _deliver(self, sink: _Sink, batch: list[common_pb2.RequestOutput], seq: int) -> None:
        request = frontend_pb2.PushOutputsRequest(instance_id=self._instance_id, outputs=batch)
        start = time.monotonic()
        try:
            reply = await self._push(sink, request, start)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.CANCELLED:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError() from exc
            await self._give_up(sink, batch, seq, exc, time.monotonic() - start)
            return
        self.pushed += len(batch)
        await sink.settle(seq, lost=False)
        if reply.unknown_request_ids:
            self._on_orphans(list(reply.unknown_request_ids))

    async def _push(
        self, sink: _Sink, request: frontend_pb2.PushOutputsRequest, start: float
    ) -> frontend_pb2.PushOutputsResponse:
        s = self.settings
        deadline = start + s.budget_s
        failures = 0
        base = max(s.attempt_timeout_s, sink.attempt_timeout)
        used = base
        # The common case (the first attempt answers) skips the retry machinery: tenacity costs more per push than the
        # push's own Python work. Only a failed first attempt enters the loop below, which retries as before.
        sent = time.monotonic()
        try:
            first: frontend_pb2.PushOutputsResponse = await sink.stub.PushOutputs(request, timeout=base)
        except Exception as exc:
            if not _retryable(exc):
                raise
            failures = 1
            self.retries += 1
            log.warning(
                "push of %d outputs to frontend %s failed (%s); retrying for up to %.0f s",
                len(request.outputs),
                sink.address,
                _describe(exc),
                s.budget_s,
            )
            await asyncio.sleep(min(0.1, s.max_backoff_s))  # the backoff before the second attempt, as before
        else:
            took = time.monotonic() - sent
            sink.attempt_timeout = base / 2 if took < base / 4 else base
            return first

        def note_failure(state: RetryCallState) -> None:
            nonlocal failures
            failures += 1
            self.retries += 1
            exc = state.outcome.exception() if state.outcome is not None else None
            if failures == 1:
                log.warning(
                    "push of %d outputs to frontend %s failed (%s); retrying for up to %.0f s",
                    len(request.outputs),
                    sink.address,
                    _describe(exc) if exc is not None else "?",
                    s.budget_s,
                )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_delay(max(0.0, deadline - time.monotonic())),
            wait=wait_exponential(multiplier=0.2, max=s.max_backoff_s),
            before_sleep=note_failure,
            reraise=True,
        ):
            with attempt:
                n = attempt.retry_state.attempt_number + 1  # the first attempt was made above
                used = min(base * 2 ** (n - 1), s.max_attempt_timeout_s)
                timeout = max(0.05, min(used, deadline - time.monotonic()))
                sent = time.monotonic()
                reply: frontend_pb2.PushOutputsResponse = await sink.stub.PushOutputs(request, timeout=timeout)
        took = time.monotonic() - sent
        # A frontend that needed a longer deadline keeps it; a fast answer halves it back towards the default.
        sink.attempt_timeout = used if failures else (used / 2 if took < used / 4 else used)
        if failures:
            log.info(
                "frontend %s took outputs again after %d failed attempts (%.1f s)",
                sink.address,
                failures,
                time.monotonic() - start,
            )
        return reply

    async def _give_up(
        self, sink: _Sink, batch: list[common_pb2.RequestOutput], seq: int, exc: BaseException, elapsed: float
    ) -> None:
        """Drops what cannot be delivered, queues one final ERROR per affected request, tells the llumlet."""
        self.given_up += 1
        dropped = batch + sink.pending
        sink.pending, sink.tail = [], {}
        last_seq = sink.submitted
        await sink.settle(last_seq, lost=True)
        first_dropped: dict[str, int] = {}
        done: set[str] = set()
        for out in dropped:
            first_dropped.setdefault(out.request_id, out.first_token_index)
            if out.finished and out.finish_reason in _TERMINAL:
                done.add(out.request_id)  # already a final error notice: never generate another
        message = (
            f"instance {self._instance_id} could not deliver outputs to frontend {sink.address} for {elapsed:.1f} s "
            f"(last error: {_describe(exc)}); request aborted"
        )
        log.error(
            "%d outputs of %d requests could not be delivered to frontend %s in %.1f s (%s); aborting its requests",
            len(dropped),
            len(first_dropped),
            sink.address,
            elapsed,
            exc if not isinstance(exc, grpc.aio.AioRpcError) else f"{exc.code().name}: {exc.details()}",
        )
        notices = [
            common_pb2.RequestOutput(
                request_id=rid,
                first_token_index=first,
                finished=True,
                finish_reason=common_pb2.FINISH_REASON_ERROR,
                error=message,
                instance_id=self._instance_id,
            )
            for rid, first in first_dropped.items()
            if rid not in done
        ]
        if self._on_unreachable is not None:
            self._on_unreachable(sink.address, list(first_dropped))
        else:
            self._on_orphans([rid for rid, _ in first_dropped.items() if rid not in done])
        if notices:
            self.submit(sink.address, notices)

    async def close(self) -> None:
        sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            if sink.task is not None:
                sink.task.cancel()
        for sink in sinks:
            if sink.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sink.task
            await sink.channel.close()
