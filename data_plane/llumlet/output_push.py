"""Pushes request outputs to the frontends that own them, in order per frontend, without ever dropping one silently.

One sender task per frontend address keeps one long-lived ``OutputSinkService.StreamOutputs`` stream open and writes
each engine step's outputs for that frontend as one numbered batch (a unary call per step cost more CPU than the
step's own Python work). The frontend applies batches in order and answers only when a batch asks: a batch asks when
the last answer is ``ack_interval_s`` old or a ``flush`` waits, and a stream with unanswered batches that stayed quiet
for ``ack_interval_s`` sends an empty asking batch (while outputs flow, the ask rides on them). An answer
acknowledges every batch up to its number; unanswered batches are kept. Every written message costs both sides a
fixed amount of CPU, more than its tokens: so decode-only steps are held for the next ones (``submit``'s ``hold_s``)
and ``PushSettings.stream_interval`` steps share a message (vLLM's ``--stream-interval``); first tokens, finishes and
errors are never held.

A failure -- the stream breaks, or an ask is not answered within its deadline (a slow frontend is not a dead one:
the deadline doubles with each retry, up to ``max_attempt_timeout_s``) -- closes the stream; after a backoff a new
stream resends every unacknowledged batch in order (the frontend drops tokens it already has by their index). Only
when the oldest unacknowledged batch has kept failing for ``PushSettings.budget_s`` is the frontend given up: its
unacknowledged and queued outputs are replaced by one final ERROR output per request (sent in case it comes back) and
``on_unreachable`` lets the llumlet abort its requests and free their blocks. A frontend without the stream
(UNIMPLEMENTED: an older one) is pushed to with one unary ``PushOutputs`` per batch, with the same retry rules.

While an ask is overdue (the frontend stalls) or too many batches are unanswered, no new batch is written: newer
outputs of one request are merged into one queued message (token ids appended; the indices are contiguous), so a
stalled frontend costs O(requests) queued messages, not O(tokens).

Ordering matters across a migration: before a request's last stage commits on the destination, the source calls
``flush(frontend)`` so every token it produced reaches the frontend before the destination's first one.

A sender with nothing to send for ``idle_close_s`` closes its stream and channel and ends (the next output re-opens
them), so addresses seen once do not keep a channel and a task for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential

from pyllumnix.infra.framed import FramedCall
from pyllumnix.infra.security.runtime import open_channel, open_framed
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
# Seconds a sink remembers the requests it gave up (the llumlet aborts them within a step or two).
ENDED_MEMORY_S = 60.0


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
    # A batch asks for an answer when the last answer is this old (so a dead stream is noticed within about this
    # plus the attempt deadline); while an ask is unanswered for this long no new batch is written (outputs coalesce).
    # Each answer costs both sides a message's fixed CPU, as a batch does: at 0.25 s a decoding stream got ~4 answers
    # a second against ~5 batches. A flush (a migration's last stage, shutdown) asks at once whatever this is, a
    # broken connection is noticed when it breaks, and a batch naming requests the frontend no longer knows is
    # answered at once, asked or not (control_plane/frontend/sink.py); what waits longer is a silently stalled
    # frontend (noticed in ~3 s with the 2 s attempt deadline, against ~2.25 s).
    ack_interval_s: float = 1.0
    # Most batches written and not yet acknowledged; beyond, outputs wait (coalesced) for an answer.
    max_unacked: int = 32
    # Engine steps whose decode-only outputs share one message (see ``OutputPusher.submit``): each message costs the
    # llumlet and the frontend a fixed amount of CPU (~0.3-0.5 ms each side), more than its tokens. 1: every step
    # goes out on its own. A held token reaches its client up to ``stream_interval - 1`` steps later; first tokens,
    # finishes and errors are never held, so TTFT and a request's mean time per output token do not change.
    stream_interval: int = 4
    # Push over the frontend's framed stream when it offers one (``OutputSinkService.DescribeSink``): the same
    # exchange without gRPC's per-message CPU. False: always gRPC's StreamOutputs.
    framed: bool = True

    def __post_init__(self) -> None:
        if min(self.budget_s, self.attempt_timeout_s, self.max_attempt_timeout_s, self.idle_close_s) <= 0:
            raise ValueError(f"push settings must be positive: {self}")
        if self.ack_interval_s <= 0 or self.max_unacked < 1:
            raise ValueError(f"ack_interval_s must be positive and max_unacked >= 1: {self}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1: {self}")


# A frontend whose framed stream could not be reached is pushed to over gRPC for this long before it is tried again.
FRAMED_RETRY_S = 30.0


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


@dataclass(slots=True)
class QueuedOutput:
    """One request's outputs queued for a frontend, kept as plain values until its batch is written (``add_to``).

    Why not the ``RequestOutput`` message itself: a decoding request's outputs of ``stream_interval`` steps are merged
    into one queued output (``_Sink.add``), so a message built per step was built, merged and thrown away three times
    in four; a list append is what the merge needs. The fields are the message's (``instance_id`` aside: the pusher's
    own, set when the message is built)."""

    request_id: str
    token_ids: list[int]
    first_token_index: int
    finished: bool = False
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    error: str = ""
    num_prompt_tokens: int = 0
    # The holder's capability token for the request (the frontend accepts outputs only with it).
    capability: str = ""

    @classmethod
    def from_pb(cls, out: common_pb2.RequestOutput) -> QueuedOutput:
        return cls(
            out.request_id,
            list(out.token_ids),
            out.first_token_index,
            out.finished,
            out.finish_reason,
            out.error,
            out.num_prompt_tokens,
            out.capability,
        )

    def final(self) -> QueuedOutput:
        """This output without its tokens (its end alone, at the same index)."""
        return dataclasses.replace(self, token_ids=[])

    def add_to(self, outputs: RepeatedCompositeFieldContainer[common_pb2.RequestOutput], instance_id: str) -> None:
        """Appends this output as a ``RequestOutput`` to ``outputs`` (a message's repeated field), built in place."""
        outputs.add(
            request_id=self.request_id,
            token_ids=self.token_ids,
            first_token_index=self.first_token_index,
            finished=self.finished,
            finish_reason=self.finish_reason,
            error=self.error,
            instance_id=instance_id,
            num_prompt_tokens=self.num_prompt_tokens,
            capability=self.capability,
        )


@dataclass
class _Batch:
    """A batch written to the stream and not yet acknowledged (kept for a resend or a give-up)."""

    message: frontend_pb2.StreamOutputsRequest
    # ``_Sink.submitted`` when the batch was taken: acknowledging it settles every submit up to this.
    mark: int
    first_sent: float


class _Sink:
    """What one frontend address has queued, in flight and settled. Submits are numbered; ``settled`` is the highest
    submit whose outputs were delivered or given up (batches settle in order)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = open_channel(address, peer="frontend")
        self.stub = frontend_pb2_grpc.OutputSinkServiceStub(self.channel)
        self.pending: list[QueuedOutput] = []
        # request id -> its newest output in ``pending`` (the one a next output can be merged into)
        self.tail: dict[str, QueuedOutput] = {}
        self.submitted = 0
        self.settled = 0
        self.last_lost = 0  # highest submit given up
        # First-attempt deadline for the next batch: it stays as long as a slow frontend needed, decays when fast.
        self.attempt_timeout = 0.0
        self.wake = asyncio.Event()
        # The sender's wake-up timer and its deadline (loop time): kept while the deadline stays (it is the same for
        # every step between two answers), so a decoding stream does not create and cancel a timer per step.
        self.alarm: asyncio.TimerHandle | None = None
        self.alarm_at = 0.0
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None
        # The stream (None: not open) and the task reading its answers.
        self.call: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.stream_error: BaseException | None = None
        self.unacked: deque[_Batch] = deque()
        self.next_seq = 1
        # The newest batch that asked for an answer and has none yet (0: none), when it asked, its deadline.
        self.ask_seq = 0
        self.ask_time = 0.0
        self.ask_timeout = 0.0
        self.last_ack = time.monotonic()
        # When the last batch with outputs was written: a quiet stream's empty asking batch waits ``ack_interval_s``
        # from the later of the two, so on a flowing stream the ask rides on the next outputs instead.
        self.last_data = 0.0
        self.failures = 0  # consecutive failed attempts of the current unacknowledged batches
        self.flushing = 0  # flush calls waiting
        # While ``pending`` holds only outputs submitted with a hold (see ``OutputPusher.submit``): when they must go
        # out at the latest (``time.monotonic``); 0: not held. ``held_steps``: the submits held in ``pending``.
        self.hold_until = 0.0
        self.held_steps = 0
        self.probing = False  # a new stream asked which batches were applied; no answer yet
        self.resend = False  # the answer came: the unacknowledged batches are to be written again
        self.unary = False  # the frontend has no StreamOutputs: one PushOutputs per batch
        # The frontend's framed stream address (see ``OutputPusher._framed``): None: to be asked (again after a
        # stream failure: a restarted frontend listens elsewhere); "": it offers none. Until ``framed_off_until``
        # (``time.monotonic``) it is not tried: it could not be reached.
        self.stream_address: str | None = None
        self.framed_off_until = 0.0
        # request id -> when its outputs were given up (later outputs of it are dropped; see ``_give_up``)
        self.ended: dict[tuple[str, str], float] = {}

    def add(self, out: QueuedOutput) -> bool:
        """Queues ``out``; returns True when it was merged into the request's queued output."""
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
            return True
        self.pending.append(out)
        self.tail[out.request_id] = out
        return False

    def take(self) -> tuple[list[QueuedOutput], int]:
        batch, self.pending, self.tail = self.pending, [], {}
        self.hold_until, self.held_steps = 0.0, 0
        return batch, self.submitted

    async def settle(self, seq: int, *, lost: bool) -> None:
        self.settled = max(self.settled, seq)
        if lost:
            self.last_lost = max(self.last_lost, seq)
        async with self.changed:
            self.changed.notify_all()


def _orphans(request_ids: Sequence[str], sent: Sequence[common_pb2.RequestOutput | QueuedOutput]) -> dict[str, str]:
    """Each id with the capability its outputs among ``sent`` carried: the incarnation the frontend refused (an id
    whose output is not among them maps to "", which matches only a request held without a token).

    An id whose outputs there carry different capabilities is left out: an ended request's late final and the first
    outputs of a new request reusing its id, in one message. The answer does not say which one was refused; taking
    the latest aborted the new request, silently (its client waited for ever: a flaky CI test found it). A refused
    incarnation that is still here pushes again, alone, and is told then."""
    caps: dict[str, set[str]] = {}
    for out in sent:
        caps.setdefault(out.request_id, set()).add(out.capability)
    orphans: dict[str, str] = {}
    for rid in request_ids:
        seen = caps.get(rid)
        if seen is None or len(seen) == 1:
            orphans[rid] = next(iter(seen)) if seen else ""
    return orphans


def _ring(sink: _Sink) -> None:
    sink.alarm = None
    sink.wake.set()


class OutputPusher:
    """One sender task per frontend address.

    ``on_orphans(orphans)``: the frontend answered that it does not know these requests (abort them silently);
    ``orphans`` maps each id to the capability token the refused output carried, so the llumlet aborts only that
    incarnation of the id (a client may reuse an id at once: its new request must not pay for the old one's outputs).
    ``on_unreachable(address, request_ids)``: the frontend could not be reached for the whole budget; ``request_ids``
    had outputs dropped (each got a final ERROR output queued instead); the llumlet aborts every request it still
    holds for ``address``.
    """

    def __init__(
        self,
        instance_id: str,
        on_orphans: Callable[[dict[str, str]], None],
        on_unreachable: Callable[[str, list[str]], None] | None = None,
        settings: PushSettings | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._on_orphans = on_orphans
        self._on_unreachable = on_unreachable
        self.settings = settings or PushSettings()
        self._sinks: dict[str, _Sink] = {}
        # Numbers this pusher's batches apart from those of an earlier process of the same instance.
        self._pusher_id = secrets.randbits(63) or 1
        self.pushed = 0  # messages delivered
        self.coalesced = 0  # outputs merged into a queued message
        self.held = 0  # submits held for the next one (see ``submit``)
        self.retries = 0
        self.given_up = 0  # batches given up after the whole budget
        self.sinks_closed = 0  # senders closed for idleness
        # Streams opened, by transport (the frontend's framed stream, or gRPC's StreamOutputs when it offers none or
        # cannot be reached): an operator sees which one carries the outputs (``llumnix_llumlet_streams_opened``).
        self.framed_streams = 0
        self.grpc_streams = 0

    @property
    def addresses(self) -> list[str]:
        """Frontends with an open sender."""
        return list(self._sinks)

    def queued(self, frontend_address: str) -> int:
        """Messages queued (not in flight) for a frontend."""
        sink = self._sinks.get(frontend_address)
        return len(sink.pending) if sink is not None else 0

    def submit(self, frontend_address: str, outputs: list[QueuedOutput], hold_s: float = 0.0) -> None:
        """Queues outputs (the pusher owns them from now on: it may merge later outputs into them).

        ``hold_s`` > 0 (an engine step's outputs that nobody waits on at once: no first token, no finish) lets them
        wait for the next submit, at most ``hold_s``, so ``settings.stream_interval`` steps share one message: each
        written message costs the llumlet and the frontend more CPU than its outputs do. Outputs are held while the
        queue holds only held submits, fewer than ``stream_interval - 1``; the submit after them, one without a hold
        (a first token, a finish), a flush or the deadline (``hold_s`` after the latest held submit) sends them all.
        Holding costs no wake-up of the sender: its timer is moved to the deadline here.
        """
        if not outputs:
            return
        sink = self._sinks.get(frontend_address)
        if sink is None:
            sink = self._sinks[frontend_address] = _Sink(frontend_address)
            sink.task = asyncio.get_running_loop().create_task(self._run(sink), name=f"push-{frontend_address}")
        if sink.ended:  # their final ERROR is queued (given up): the llumlet is aborting them; nothing may follow
            # (by id and capability: a later request reusing the id is not one of them)
            outputs = [out for out in outputs if (out.request_id, out.capability) not in sink.ended]
            if not outputs:
                return
        previous = sink.hold_until  # the deadline of the submits held so far (0: none)
        hold = (
            hold_s > 0
            and sink.held_steps < self.settings.stream_interval - 1
            and (previous or not sink.pending)
            and not sink.flushing
            and not sink.unary
        )
        for out in outputs:
            self.coalesced += sink.add(out)
        sink.submitted += 1
        if hold:
            self.held += 1
            sink.held_steps += 1
            deadline = time.monotonic() + hold_s
            sink.hold_until = deadline
            # The alarm moves with the hold when it was the hold's (a later deadline of the sender's own, the ask's,
            # is then noticed up to one hold late: seconds away, or an empty ask, which a held stream does not need).
            if sink.alarm is None or sink.alarm_at > deadline or (previous and sink.alarm_at == previous):
                if sink.alarm is not None:
                    sink.alarm.cancel()
                sink.alarm, sink.alarm_at = asyncio.get_running_loop().call_later(hold_s, _ring, sink), deadline
            return
        sink.hold_until, sink.held_steps = 0.0, 0
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
        sink.flushing += 1
        sink.wake.set()  # the sender asks for an answer at once
        try:
            async with asyncio.timeout(self.settings.flush_timeout_s if timeout is None else timeout):
                async with sink.changed:
                    await sink.changed.wait_for(lambda: sink.settled >= target)
        finally:
            sink.flushing -= 1
        if sink.last_lost > settled_before:
            raise FrontendUnreachableError(f"outputs to frontend {frontend_address} were given up")

    async def drain(self, timeout: float) -> None:
        """Best-effort flush of every frontend (shutdown): waits at most ``timeout`` in all."""
        flushes = [self.flush(address, timeout) for address in list(self._sinks)]
        if flushes:
            await asyncio.gather(*flushes, return_exceptions=True)

    async def _run(self, sink: _Sink) -> None:
        try:
            await self._stream(sink)
            while sink.unary:
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
            self._close_call(sink)
            await sink.settle(sink.submitted, lost=True)

    async def _retire(self, sink: _Sink) -> None:
        if self._sinks.get(sink.address) is sink:
            del self._sinks[sink.address]
        self.sinks_closed += 1
        log.debug("output sender for %s idle for %.0f s; closed", sink.address, self.settings.idle_close_s)
        self._close_call(sink)
        await sink.channel.close()

    # -- the stream ----------------------------------------------------------------------------------------------
    async def _stream(self, sink: _Sink) -> None:
        """Runs the sink's stream until the sender retires (returns) or the frontend turns out to have no stream
        (returns with ``sink.unary`` set and the unacknowledged outputs queued again in order)."""
        s = self.settings
        while True:
            now = time.monotonic()
            error = sink.stream_error
            if error is None and sink.ask_seq and now >= sink.ask_time + sink.ask_timeout:
                error = TimeoutError(f"no answer within {sink.ask_timeout:.1f} s")
            if error is not None:
                if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._fall_back_to_unary(sink)
                    return
                await self._stream_failed(sink, error)
                continue
            if sink.call is None and (sink.pending or sink.unacked):
                await self._open(sink)
                continue
            if sink.resend:
                sink.resend = False
                await self._resend(sink)
                continue
            overdue = sink.probing or (sink.ask_seq and now - sink.ask_time > s.ack_interval_s)
            held = bool(sink.hold_until) and not sink.flushing and now < sink.hold_until
            if sink.pending and len(sink.unacked) < s.max_unacked and not overdue and not held:
                outputs, mark = sink.take()
                message = self._message(sink.next_seq)
                sink.next_seq += 1
                built = message.batch.outputs
                for out in outputs:
                    out.add_to(built, self._instance_id)
                sink.unacked.append(_Batch(message, mark, now))
                sink.last_data = now
                await self._write(sink, message, ask=self._should_ask(sink, now))
                continue
            quiet_since = max(sink.last_ack, sink.last_data)
            if sink.unacked and not sink.ask_seq and (sink.flushing or now - quiet_since >= s.ack_interval_s):
                # Nothing to carry the ask: an empty batch asks (a quiet stream's last batches get answered too). Its
                # answer settles what was written before it, not outputs still held in ``pending`` (``submitted``
                # counts those too: a flush then returned before they were even sent, and they reached the frontend
                # after the migration it waited for had moved the request on).
                message = self._message(sink.next_seq)
                sink.next_seq += 1
                sink.unacked.append(_Batch(message, sink.unacked[-1].mark, now))
                await self._write(sink, message, ask=True)
                continue
            # Wait for outputs, an answer, a failure, the ask's deadline, the next ask, or idleness.
            if sink.ask_seq:
                deadline: float | None = sink.ask_time + sink.ask_timeout
            elif sink.unacked:
                # The empty ask waits for a quiet gap: ``ack_interval_s`` after the last answer or the last outputs,
                # whichever is later (while outputs flow, the ask rides on them). A timer at the last answer's
                # deadline alone rang mid-flow, ~3 times a second, only to find the gap not yet there (a wake-up of
                # the event loop each, ~0.15 ms of CPU).
                deadline = quiet_since + s.ack_interval_s
            else:
                deadline = None
            if held and sink.pending:
                deadline = sink.hold_until if deadline is None else min(deadline, sink.hold_until)
            rang = not await self._sleep(sink, deadline if deadline is not None else now + s.idle_close_s)
            if rang and deadline is None and not sink.pending and not sink.unacked and sink.stream_error is None:
                await self._retire(sink)
                return

    @staticmethod
    async def _sleep(sink: _Sink, deadline: float) -> bool:
        """Waits for ``sink.wake`` until ``deadline`` (``time.monotonic``); False when the deadline came first."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if sink.alarm is None or sink.alarm_at != deadline:
            if sink.alarm is not None:
                sink.alarm.cancel()
            sink.alarm, sink.alarm_at = asyncio.get_running_loop().call_later(left, _ring, sink), deadline
        sink.wake.clear()
        await sink.wake.wait()
        return sink.alarm is not None  # (the alarm clears itself when it rings)

    def _message(self, seq: int) -> frontend_pb2.StreamOutputsRequest:
        message = frontend_pb2.StreamOutputsRequest(seq=seq, pusher_id=self._pusher_id)
        message.batch.instance_id = self._instance_id
        return message

    def _should_ask(self, sink: _Sink, now: float) -> bool:
        if sink.ask_seq:
            return False
        return bool(
            sink.flushing
            or now - sink.last_ack >= self.settings.ack_interval_s
            or len(sink.unacked) >= self.settings.max_unacked // 2 + 1
        )

    async def _open(self, sink: _Sink) -> None:
        """Opens a stream; with unacknowledged batches, asks the frontend which of them it applied (the rest are
        resent once it answers)."""
        call = await self._framed(sink) if self.settings.framed else None
        if call is None:
            call = sink.stub.StreamOutputs()
            self.grpc_streams += 1
        else:
            self.framed_streams += 1
        sink.call = call
        sink.stream_error = None
        sink.ask_seq = 0
        sink.probing = sink.resend = False
        sink.reader = asyncio.get_running_loop().create_task(
            self._read_answers(sink, call), name=f"push-answers-{sink.address}"
        )
        if sink.unacked:
            # Ask which batches the frontend applied before the last stream broke; the answer makes the rest resent.
            sink.probing = True
            await self._write(sink, self._message(0), ask=True)

    async def _framed(self, sink: _Sink) -> FramedCall[frontend_pb2.StreamOutputsResponse] | None:
        """A framed stream to the frontend when it offers one (asked once per stream failure), else None (the gRPC
        stream). One that cannot be reached (a firewall lets only the gRPC port through, a stopping frontend) is not
        tried again for ``FRAMED_RETRY_S``: the gRPC stream carries the same exchange meanwhile."""
        timeout = self._attempt_timeout(sink)
        if time.monotonic() < sink.framed_off_until:
            return None
        if sink.stream_address is None:
            try:
                described = await sink.stub.DescribeSink(frontend_pb2.DescribeSinkRequest(), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED):
                    sink.stream_address = ""  # an older frontend, or one whose role table lacks the method
                return None  # (unreachable now: the gRPC stream meets the same failure and its retries)
            sink.stream_address = described.stream_address
        if not sink.stream_address:
            return None
        try:
            return await open_framed(
                sink.stream_address, frontend_pb2.StreamOutputsResponse, peer="frontend", timeout=timeout
            )
        except Exception as exc:  # unreachable, refused, a bad address: the gRPC stream carries the same exchange
            log.warning(
                "frontend %s: its framed output stream at %s cannot be reached (%r); pushing over gRPC's "
                "StreamOutputs for %.0f s",
                sink.address,
                sink.stream_address,
                exc,
                FRAMED_RETRY_S,
            )
            sink.stream_address = None  # asked again then: the frontend may have restarted elsewhere
            sink.framed_off_until = time.monotonic() + FRAMED_RETRY_S
            return None

    async def _resend(self, sink: _Sink) -> None:
        """Writes every unacknowledged batch again, in order; the last one asks."""
        call = sink.call
        resend = list(sink.unacked)
        for i, batch in enumerate(resend):
            if sink.call is not call or sink.stream_error is not None:
                return
            await self._write(sink, batch.message, ask=i == len(resend) - 1)

    async def _write(self, sink: _Sink, message: frontend_pb2.StreamOutputsRequest, *, ask: bool) -> None:
        """Writes one batch; a write that is not taken within the attempt deadline (the frontend's flow control is
        full: it stalls) or fails counts as the stream's failure."""
        call = sink.call
        message.ack_requested = ask
        timeout = self._attempt_timeout(sink)
        if ask:  # (the question of a new stream has seq 0: -1 marks it asked)
            sink.ask_seq, sink.ask_time, sink.ask_timeout = message.seq or -1, time.monotonic(), timeout
        try:
            async with asyncio.timeout(timeout):
                await call.write(message)
        except TimeoutError:
            self._stream_broke(sink, call, TimeoutError(f"the frontend took no batch for {timeout:.1f} s"))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._stream_broke(sink, call, ConnectionError("the output stream was cancelled"))
        except Exception as exc:
            self._stream_broke(sink, call, exc)

    def _attempt_timeout(self, sink: _Sink) -> float:
        s = self.settings
        base = max(s.attempt_timeout_s, sink.attempt_timeout)
        return float(min(base * 2**sink.failures, max(base, s.max_attempt_timeout_s)))

    def _stream_broke(self, sink: _Sink, call: Any, exc: BaseException) -> None:
        if sink.call is call and sink.stream_error is None:
            sink.stream_error = exc
        sink.wake.set()

    async def _read_answers(self, sink: _Sink, call: Any) -> None:
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise ConnectionError("the frontend ended the output stream")
                await self._answered(sink, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if sink.call is not call:
                return  # closed by this side (or replaced): nothing to report
            self._stream_broke(sink, call, exc)

    async def _answered(self, sink: _Sink, reply: frontend_pb2.StreamOutputsResponse) -> None:
        """Every batch up to ``acked_seq`` was applied: settles them."""
        now = time.monotonic()
        mark = 0
        acked: list[common_pb2.RequestOutput] = []
        while sink.unacked and sink.unacked[0].message.seq <= reply.acked_seq:
            batch = sink.unacked.popleft()
            mark = batch.mark
            self.pushed += len(batch.message.batch.outputs)
            if reply.unknown_request_ids:
                acked.extend(batch.message.batch.outputs)
        sink.last_ack = now
        if sink.probing:  # the answer to a new stream's question: resend what it did not apply
            sink.probing, sink.ask_seq = False, 0
            sink.resend = bool(sink.unacked)
        elif sink.ask_seq and reply.acked_seq >= sink.ask_seq:
            took, used = now - sink.ask_time, sink.ask_timeout
            # A frontend that needed a longer deadline keeps it; a fast answer halves it back towards the default.
            sink.attempt_timeout = used if sink.failures else (used / 2 if took < used / 4 else used)
            sink.ask_seq = 0
            if sink.failures:
                log.info("frontend %s took outputs again after %d failed attempts", sink.address, sink.failures)
                sink.failures = 0
        if reply.unknown_request_ids:
            self._on_orphans(_orphans(reply.unknown_request_ids, acked))
        sink.wake.set()
        if mark:
            await sink.settle(mark, lost=False)

    def _close_call(self, sink: _Sink) -> None:
        if sink.alarm is not None:
            sink.alarm.cancel()
            sink.alarm = None
        call, reader = sink.call, sink.reader
        sink.call, sink.reader, sink.ask_seq = None, None, 0
        sink.probing = sink.resend = False
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if call is not None:
            call.cancel()

    async def _stream_failed(self, sink: _Sink, error: BaseException) -> None:
        """Closes the broken stream; gives the frontend up (permanent error, or the budget is spent) or backs off
        before the next stream resends what is unacknowledged."""
        s = self.settings
        self._close_call(sink)
        sink.stream_error = None
        if sink.stream_address:
            sink.stream_address = None  # ask again: a restarted frontend's framed stream listens elsewhere
        if not sink.unacked and _retryable(error):
            log.debug("output stream to %s ended while idle: %s", sink.address, _describe(error))
            return  # nothing was lost; the next output opens a new stream
        elapsed = time.monotonic() - sink.unacked[0].first_sent if sink.unacked else 0.0
        if not _retryable(error) or elapsed >= s.budget_s:
            sent = [QueuedOutput.from_pb(out) for batch in sink.unacked for out in batch.message.batch.outputs]
            sink.unacked.clear()
            sink.failures = 0
            await self._give_up(sink, sent, error, elapsed)
            return
        sink.failures += 1
        self.retries += 1
        if sink.failures == 1:
            log.warning(
                "push of %d batches to frontend %s failed (%s); retrying for up to %.0f s",
                len(sink.unacked),
                sink.address,
                _describe(error),
                s.budget_s,
            )
        backoff = 0.1 if sink.failures == 1 else min(0.2 * 2 ** (sink.failures - 2), s.max_backoff_s)
        await asyncio.sleep(max(0.0, min(backoff, s.budget_s - elapsed)))

    def _fall_back_to_unary(self, sink: _Sink) -> None:
        """The frontend has no StreamOutputs: its unacknowledged outputs go first, by unary pushes from now on."""
        log.info("frontend %s has no output stream; pushing with PushOutputs", sink.address)
        self._close_call(sink)
        sink.stream_error = None
        sink.unary = True
        sent = [QueuedOutput.from_pb(out) for batch in sink.unacked for out in batch.message.batch.outputs]
        sink.unacked.clear()
        queued, sink.pending, sink.tail = sink.pending, [], {}
        sink.hold_until, sink.held_steps = 0.0, 0
        for out in [*sent, *queued]:
            self.coalesced += sink.add(out)

    async def _deliver(self, sink: _Sink, batch: list[QueuedOutput], seq: int) -> None:
        request = frontend_pb2.PushOutputsRequest(instance_id=self._instance_id)
        for out in batch:
            out.add_to(request.outputs, self._instance_id)
        start = time.monotonic()
        try:
            reply = await self._push(sink, request, start)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.CANCELLED:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError() from exc
            await self._give_up(sink, batch, exc, time.monotonic() - start)
            return
        self.pushed += len(batch)
        await sink.settle(seq, lost=False)
        if reply.unknown_request_ids:
            self._on_orphans(_orphans(reply.unknown_request_ids, batch))

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

    async def _give_up(self, sink: _Sink, sent: list[QueuedOutput], exc: BaseException, elapsed: float) -> None:
        """Drops what cannot be delivered (``sent`` and everything queued), queues one final ERROR per affected
        request, tells the llumlet."""
        self.given_up += 1
        dropped = sent + sink.pending
        sink.pending, sink.tail = [], {}
        sink.hold_until, sink.held_steps = 0.0, 0
        last_seq = sink.submitted
        await sink.settle(last_seq, lost=True)
        first_dropped: dict[str, int] = {}
        capabilities: dict[str, str] = {}
        # Requests whose dropped outputs already held their final error (an engine ERROR, an ABORT): no notice of
        # ours is made for them; that final itself is queued again (before, it was lost with the rest, and a frontend
        # that came back never told its client how the request ended).
        finals: dict[str, QueuedOutput] = {}
        for out in dropped:
            first_dropped.setdefault(out.request_id, out.first_token_index)
            capabilities.setdefault(out.request_id, out.capability)
            if out.finished and out.finish_reason in _TERMINAL:
                finals[out.request_id] = out.final()  # the final alone: its tokens were dropped with the rest
        done = set(finals)
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
            QueuedOutput(rid, [], first, finished=True, finish_reason=common_pb2.FINISH_REASON_ERROR, error=message)
            for rid, first in first_dropped.items()
            if rid not in done
        ]
        if self._on_unreachable is not None:
            self._on_unreachable(sink.address, list(first_dropped))
        else:
            self._on_orphans(_orphans([rid for rid in first_dropped if rid not in done], dropped))
        notices += finals.values()
        if notices:
            self.submit(sink.address, notices)
        # Outputs the llumlet still produces for these requests before its abort lands must not follow the notice.
        now = time.monotonic()
        sink.ended = {key: t for key, t in sink.ended.items() if now - t < ENDED_MEMORY_S}
        sink.ended.update(dict.fromkeys(((rid, capabilities[rid]) for rid in first_dropped), now))

    async def close(self) -> None:
        sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            if sink.task is not None:
                sink.task.cancel()
        for sink in sinks:
            if sink.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sink.task
            self._close_call(sink)
            await sink.channel.close()
