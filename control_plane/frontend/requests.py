"""Per-request state in the frontend: in-order token acceptance, detokenization, stop strings, current instance.

Outputs for one request can come from several llumlets (a migration moves it) and can repeat (a push retried, a
source re-sending before it hands over). A token is kept only if its index equals the number already received, so
duplicates and stale re-sends are dropped; an output that starts beyond that count is held until the gap is filled.

A reader of ``deltas()`` never waits forever: after ``idle_timeout`` seconds in which no output arrived (any pushed
output counts, also one without new tokens: a llumlet's heartbeat keeps a queued request alive), or past
``deadline``, the request ends here with FINISH_REASON_ERROR and ``timed_out`` set, and ``on_stop`` lets the frontend
abort it on its instance (whose pushes may have stopped for good: the llumlet gave up, the frontend stalled).

Who may push outputs for a request is the :class:`HolderLedger`'s business: the frontend grants the instance it adds
the request to a capability token, a migration source hands the request over (``hand_over``) before it commits, and
the destination's token becomes the only valid one with its first accepted output. Whatever a pusher sends, a request
never shows more than its ``max_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from pyllumnix.control_plane.frontend.errors import DuplicateRequestError
from pyllumnix.control_plane.frontend.tokenizer import IncrementalDetokenizer
from pyllumnix.infra.security.tokens import Capability, CapabilityTokens, TokenError, new_secret
from pyllumnix.protos.llumnix.v1 import common_pb2

log = logging.getLogger(__name__)

STOP = common_pb2.FINISH_REASON_STOP
ABORT = common_pb2.FINISH_REASON_ABORT
ERROR = common_pb2.FINISH_REASON_ERROR
# Final outputs that end a request whatever its token count (the scheduler's "instance lost" notice has no index).
_TERMINAL_ANYWHERE = (ABORT, ERROR)
# Seconds a send to the client may still block once the request's deadline has passed (its final error's send).
SEND_GRACE_S = 2.0


def _failure(pattern: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of pattern[: i + 1] that is also a suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Finds the first stop string in text that arrives piece by piece (one KMP automaton per stop string).

    Feeding a piece costs O(len(piece) x number of stops), whatever the length of the text so far, so a long output
    does not make every later token slower. ``partial`` is the length of the longest text suffix that is a proper
    prefix of some stop string: text a client must not see yet, since it may still turn out to be a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)

    @property
    def partial(self) -> int:
        return max(self._state, default=0)

    def feed(self, text: str) -> int | None:
        """Offset in ``text`` where the first stop string to complete starts (negative: it began in earlier text);
        of stops completing on the same character the longest wins. None if none completed."""
        stops, fail, state = self.stops, self._fail, self._state
        for pos, ch in enumerate(text):
            hit: int | None = None
            for j, stop in enumerate(stops):
                k = state[j]
                while k and stop[k] != ch:
                    k = fail[j][k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    start = pos + 1 - k
                    hit = start if hit is None else min(hit, start)
                    k = fail[j][k - 1]
                state[j] = k
            if hit is not None:
                return hit
        return None


@dataclass(slots=True)
class Delta:
    """What a client receives next: new text and ids, and on the last one the finish reason. One is made per token, so
    not ``frozen``: a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, about 10x the
    cost of this one (measured on a loaded host: ~15 us vs ~1 us); nothing changes a Delta once made."""

    text: str
    token_ids: list[int]
    first_token_index: int
    instance_id: str
    finished: bool = False
    finish_reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
    error: str = ""


@dataclass
class TrackedRequest:
    request_id: str
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stop: Sequence[str] = ()
    priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_NORMAL
    arrival_time: float = field(default_factory=time.time)
    # Called once when this side ends the request (a stop string, a timeout), so the frontend aborts it on its instance.
    on_stop: Callable[[TrackedRequest], None] | None = None
    # Seconds ``deltas()`` waits for the next output before ending the request (None: forever).
    idle_timeout: float | None = None
    # ``time.monotonic()`` by which the request must have finished (None: no overall deadline).
    deadline: float | None = None
    # The instance that holds the request now (the dispatch target, then whoever pushed its latest tokens).
    instance_id: str = ""
    # Most tokens the request may show (0: no cap); outputs beyond it are dropped, whoever pushes them.
    max_tokens: int = 0
    # Id of the API key that created the request ("" on a frontend without API keys): who may abort it.
    owner_key_id: str = ""
    num_received: int = field(default=0, init=False)
    finished: bool = field(default=False, init=False)
    finish_reason: common_pb2.FinishReason.ValueType = field(default=common_pb2.FINISH_REASON_UNSPECIFIED, init=False)
    error: str = field(default="", init=False)
    # True when the frontend ended the request because no output came in time (idle timeout or deadline).
    timed_out: bool = field(default=False, init=False)
    first_token_time: float | None = field(default=None, init=False)
    # Instances whose outputs for this request are dropped: an AddRequest to them timed out (they may hold it anyway,
    # and are told to abort it), and the request was placed elsewhere.
    revoked: set[str] = field(default_factory=set, init=False)
    # ``time.monotonic()`` of the latest sign of life (an output pushed, the request placed).
    _last_heard: float = field(default_factory=time.monotonic, init=False)
    # Text shown to the client so far (pieces, joined only on demand) and the tail held back while it could still
    # become a stop string.
    _shown: list[str] = field(default_factory=list, init=False)
    _pending: str = field(default="", init=False)
    _matcher: StopMatcher | None = field(default=None, init=False)
    _held: dict[int, common_pb2.RequestOutput] = field(default_factory=dict, init=False)
    _queue: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue, init=False)
    # The idle/deadline timer of a reader (see ``_next``); cancelled when the request ends.
    _timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    # A synchronous taker of unfinished deltas' text (the HTTP stream's direct writer), called as each one is made
    # while nothing is queued: a token then costs no queue, no task switch and no Delta object. It returns False to
    # leave the delta queued for the reader (e.g. the client is behind); the finishing delta is always queued.
    direct: Callable[[str], bool] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        stops = [s for s in self.stop if s]
        self._matcher = StopMatcher(stops) if stops else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def text(self) -> str:
        """Everything shown to the client so far plus any tail held back while it could still become a stop string."""
        return "".join(self._shown) + self._pending

    def accept(self, output: common_pb2.RequestOutput, instance_id: str = "") -> None:
        """Takes one pushed output (``instance_id``: the pusher's, used when the output does not name one)."""
        if self.finished:
            return
        self._last_heard = time.monotonic()
        if not output.token_ids and not output.finished:
            return  # a holder's "still here" heartbeat: it only restarts the idle clock (never held as a gap)
        if output.first_token_index > self.num_received:
            if output.finished and output.finish_reason in _TERMINAL_ANYWHERE:
                self._apply(output, instance_id, new=[])
                return
            if not self._held:
                log.warning(
                    "request %s: gap, have %d tokens, got index %d; holding",
                    self.request_id,
                    self.num_received,
                    output.first_token_index,
                )
            self._held[output.first_token_index] = output
            return
        skip = self.num_received - output.first_token_index
        new = list(output.token_ids[skip:])
        if self.max_tokens and len(new) > self.max_tokens - self.num_received:
            log.warning(
                "request %s: output from %s runs past max_tokens %d; extra tokens dropped",
                self.request_id,
                output.instance_id or instance_id or "?",
                self.max_tokens,
            )
            new = new[: max(0, self.max_tokens - self.num_received)]
        current = output.first_token_index + len(output.token_ids) >= self.num_received
        if new or (output.finished and (current or output.finish_reason in _TERMINAL_ANYWHERE)):
            self._apply(output, instance_id, new)
        if self._held:
            self._drain_held()

    def _drain_held(self) -> None:
        while self._held and not self.finished:
            ready = [i for i in self._held if i <= self.num_received]
            if not ready:
                return
            for i in sorted(ready):
                out = self._held.pop(i)
                if not self.finished:
                    self.accept(out)

    def _apply(self, output: common_pb2.RequestOutput, instance_id: str, new: list[int]) -> None:
        self.instance_id = output.instance_id or instance_id or self.instance_id
        first = self.num_received
        self.num_received += len(new)
        if new and self.first_token_time is None:
            self.first_token_time = time.time()
        matcher = self._matcher
        if matcher is not None and len(new) > 1:
            # One pushed output may carry several steps' tokens: a stop string completed inside it ends the request at
            # the token that completed it, so the count and the ids shown do not depend on how outputs were batched.
            for k, token in enumerate(new):
                text = self.detokenizer.add((token,))
                if output.finished and k == len(new) - 1:
                    text += self.detokenizer.flush()
                if self._stopped(matcher, text, new[: k + 1], first):
                    return
                self._pending += text
        else:
            text = self.detokenizer.add(new) if new else ""
            if output.finished:
                text += self.detokenizer.flush()
            if matcher is not None and self._stopped(matcher, text, new, first):
                return
            self._pending += text
        if output.finished:
            self._finish(new, first, output.finish_reason, output.error)
            return
        self._emit(new, first, held=self._matcher.partial if self._matcher is not None else 0)

    def _stopped(self, matcher: StopMatcher, text: str, new: list[int], first: int) -> bool:
        """Feeds ``text`` (the text of ``new``, the tokens from index ``first`` so far) to the stop matcher; on a hit
        ends the request there (STOP, tokens counted up to ``new``'s last) and lets ``on_stop`` abort it."""
        hit = matcher.feed(text)
        if hit is None:
            return False
        # By the hold-back rule the stop string starts in the pending tail or in ``text``, never earlier.
        self._pending = (self._pending + text)[: max(0, len(self._pending) + hit)]
        self.num_received = first + len(new)
        self._finish(new, first, STOP, "")
        if self.on_stop is not None:
            self.on_stop(self)
        return True

    def _emit(self, new: list[int], first: int, held: int) -> None:
        if held:
            cut = len(self._pending) - held
            text, self._pending = self._pending[:cut], self._pending[cut:]
        else:
            text, self._pending = self._pending, ""
        if text:
            self._shown.append(text)
        if text or new:
            direct = self.direct
            if direct is not None and self._queue.empty() and direct(text):
                return
            self._queue.put_nowait(Delta(text, new, first, self.instance_id))

    def _finish(self, new: list[int], first: int, reason: common_pb2.FinishReason.ValueType, error: str) -> None:
        self.finished = True
        self.finish_reason = reason
        self.error = error
        self._held.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        text, self._pending = self._pending, ""
        if text:
            self._shown.append(text)
        self._queue.put_nowait(Delta(text, new, first, self.instance_id, True, reason, error))

    def finish(self, reason: common_pb2.FinishReason.ValueType, error: str = "") -> None:
        """Ends the request here (abort, dispatch failure); no-op when already finished."""
        if not self.finished:
            self._finish([], self.num_received, reason, error)

    def expire(self, why: str) -> None:
        """Ends the request here as timed out (ERROR) and lets ``on_stop`` abort it on its instance."""
        if self.finished:
            return
        self.timed_out = True
        self.finish(ERROR, why)
        if self.on_stop is not None:
            self.on_stop(self)

    def revoke(self, instance_id: str) -> None:
        """Drops every later output of ``instance_id`` for this request (see ``revoked``), and those of its outputs
        held for a gap (they would splice its tokens in once the gap filled)."""
        self.revoked.add(instance_id)
        self._held = {i: out for i, out in self._held.items() if out.instance_id != instance_id}

    def touch(self) -> None:
        """Restarts the idle clock (the request was just placed: waiting for dispatch is not the instance's silence)."""
        self._last_heard = time.monotonic()

    def _wait_limit(self) -> tuple[float | None, str]:
        """How long the next wait for output may last (<= 0: time is up), and what to say when it runs out."""
        now = time.monotonic()
        limit: float | None = None
        why = ""
        if self.idle_timeout is not None:
            limit, why = self.idle_timeout - (now - self._last_heard), f"no output for {self.idle_timeout:g}s"
        if self.deadline is not None and (limit is None or self.deadline - now < limit):
            limit, why = self.deadline - now, "the request's deadline passed"
        return limit, why

    def send_limit(self) -> tuple[float | None, str]:
        """How long one send of this request's output to its client may block (None: no bound), and why it ended.

        The idle timeout bounds a client that takes nothing (it holds a slot for nothing). A deadline bounds it too:
        when it passes, the request ends and its engine work is aborted, and a handler stuck in a send to a client that
        reads nothing would otherwise keep the request's in-flight slot (with the idle timeout off: until TCP gives
        up). Past the deadline the final error's send still gets ``SEND_GRACE_S``."""
        limit: float | None = self.idle_timeout
        why = f"client took no output for {self.idle_timeout:g}s" if self.idle_timeout is not None else ""
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic()) + SEND_GRACE_S
            if limit is None or left < limit:
                limit, why = left, "the request's deadline passed while its client took no output"
        return limit, why

    async def _next(self) -> Delta:
        queue = self._queue
        if queue.empty() and self._timer is None and not self.finished:
            self._arm()
        return await queue.get()

    def _arm(self) -> None:
        """One timer per request, re-armed only when it fires: a token restarts the idle clock by moving
        ``_last_heard``, not by creating and cancelling a timer (which cost more than the token's own work)."""
        limit, _ = self._wait_limit()
        if limit is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, limit), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.finished:
            return
        limit, why = self._wait_limit()
        if limit is not None and limit <= 0:
            log.warning("request %s on %s: %s; ending it", self.request_id, self.instance_id or "?", why)
            self.expire(f"request {self.request_id} timed out: {why}")
        else:
            self._arm()

    async def delta_batches(self) -> AsyncIterator[list[Delta]]:
        """``deltas()`` with every delta already queued taken at once, so a burst (a push that carried several steps'
        tokens, or a reader that fell behind) costs one write to the client instead of one per delta."""
        while True:
            batch = [await self._next()]
            queue = self._queue
            while not batch[-1].finished and not queue.empty():
                batch.append(queue.get_nowait())
            yield batch
            if batch[-1].finished:
                return

    async def deltas(self) -> AsyncIterator[Delta]:
        """The client's view, until (and including) the finishing delta; ends by timeout rather than waiting forever."""
        while True:
            delta = await self._next()
            yield delta
            if delta.finished:
                return


class StaleCapabilityError(TokenError):
    """A genuine token of the caller that no longer (or not yet) authorizes it: the request moved on or ended."""


@dataclass
class _Holding:
    current: Capability
    token: str
    # A migration's destination, handed the request by the current holder; it becomes current with its first output.
    pending: Capability | None = None
    pending_token: str = ""

    def promote(self) -> Capability:
        """The destination becomes the holder (it pushed, or passes the request on); the source's grant is retired."""
        assert self.pending is not None
        self.current, self.token, self.pending, self.pending_token = self.pending, self.pending_token, None, ""
        return self.current

    def withdraw(self, instance_id: str) -> None:
        """Withdraws ``instance_id``'s pending grant, if it has one (its commit is taken back)."""
        if self.pending is not None and self.pending.holder_instance_id == instance_id:
            self.pending, self.pending_token = None, ""


class HolderLedger:
    """Which instance may push outputs for each request, by capability token (see the module docstring).

    Two phases on a migration: after ``hand_over`` both the source's token and the destination's are valid; the
    destination's first accepted output retires the source's, so a migration whose commit fails leaves the request
    with the source. The frontend is the only issuer and checker, so its secret never leaves this process.
    """

    def __init__(self, tokens: CapabilityTokens | None = None) -> None:
        self.tokens = tokens if tokens is not None else CapabilityTokens(new_secret(), "frontend")
        self._held: dict[str, _Holding] = {}
        # Generations are numbered across all requests and never reused (``forget`` does not reset them): a client may
        # reuse a request id at once, and the earlier incarnation's late outputs must never pass for the new one's.
        self._generations = itertools.count()

    def __len__(self) -> int:
        return len(self._held)

    def grant(self, request_id: str, instance_id: str) -> str:
        """The token sent with AddRequest to ``instance_id``; a re-dispatch (the previous instance refused) replaces
        the previous grant."""
        cap = Capability(request_id, instance_id, next(self._generations))
        token = self.tokens.issue(request_id, instance_id, generation=cap.generation)
        self._held[request_id] = _Holding(cap, token)
        return token

    def holders(self, request_id: str) -> tuple[str, ...]:
        """The current holder and, during a hand-over, the destination ((): nobody)."""
        held = self._held.get(request_id)
        if held is None:
            return ()
        if held.pending is None:
            return (held.current.holder_instance_id,)
        return held.current.holder_instance_id, held.pending.holder_instance_id

    def token_of(self, request_id: str, instance_id: str) -> str:
        """The token this ledger granted ``instance_id`` for ``request_id`` (current or pending; "" if none): what an
        abort sent there names, so it ends that request and no other one with the id."""
        held = self._held.get(request_id)
        if held is None:
            return ""
        if held.current.holder_instance_id == instance_id:
            return held.token
        if held.pending is not None and held.pending.holder_instance_id == instance_id:
            return held.pending_token
        return ""

    def held_by(self, instance_id: str) -> list[str]:
        """The requests ``instance_id`` holds now as their current holder and has not handed over. A hand-over it
        received but has not pushed for yet does not count (the source may still finish the request), nor does one it
        gave: the destination runs the request now, and its first push makes it the holder; if that commit never
        landed, the request's idle timeout ends it."""
        return [
            rid
            for rid, held in self._held.items()
            if held.current.holder_instance_id == instance_id and held.pending is None
        ]

    def check(self, token: str, *, request_id: str, caller_instance_id: str) -> Capability:
        """Accepts an output of ``caller_instance_id`` for ``request_id``; StaleCapabilityError (a genuine but outdated
        token, or a request nobody holds) or TokenError (forged, missing, another instance's) otherwise."""
        held = self._held.get(request_id)
        if held is None:
            raise StaleCapabilityError(f"request {request_id!r} is not held by anyone here (finished or unknown)")
        if _same(token, held.token) and held.current.holder_instance_id == caller_instance_id:
            return held.current
        pending = held.pending
        mine = pending is not None and pending.holder_instance_id == caller_instance_id
        if pending is not None and mine and _same(token, held.pending_token):
            return held.promote()
        if not token:
            raise TokenError(f"output for request {request_id!r} carries no capability token")
        cap = self.tokens.verify(token, request_id=request_id, holder_instance_id=caller_instance_id)
        raise StaleCapabilityError(
            f"capability token generation {cap.generation} of {caller_instance_id} for request {request_id!r} is "
            f"stale: the request is held by {held.current.holder_instance_id} (generation {held.current.generation})"
        )

    def outdated(self, token: str, *, request_id: str) -> bool:
        """Whether ``token`` is neither the current nor the pending grant of a request held here: an earlier
        incarnation's (the id was reused) or a holder's the request was taken from. For pushes that cannot be
        checked (a plaintext frontend: no caller identity), so a reused id still gets only its own outputs; a
        token-less output (an insecure migration's destination) is not outdated."""
        held = self._held.get(request_id)
        if held is None or not token:
            return False
        return not (_same(token, held.token) or _same(token, held.pending_token))

    def hand_over(self, token: str, *, request_id: str, caller_instance_id: str, new_instance_id: str) -> str:
        """The current holder hands the request to a migration destination: returns the destination's token (the
        same one again when asked twice for the same destination, e.g. after a lost answer)."""
        if not new_instance_id or new_instance_id == caller_instance_id:
            raise TokenError(f"{caller_instance_id} cannot hand request {request_id!r} over to {new_instance_id!r}")
        held = self._held.get(request_id)
        if held is None:
            raise StaleCapabilityError(f"request {request_id!r} is not held by anyone here (finished or unknown)")
        if not (_same(token, held.token) and held.current.holder_instance_id == caller_instance_id):
            # Raises, saying why, unless the caller is the pending holder with its token: the request was migrated to
            # it and it passes it on before its first output reached us: ``check`` made it the holder (ATTACK10 F4).
            self.check(token, request_id=request_id, caller_instance_id=caller_instance_id)
        if held.pending is not None and held.pending.holder_instance_id == new_instance_id:
            return held.pending_token
        cap = Capability(request_id, new_instance_id, next(self._generations))
        held.pending = cap
        held.pending_token = self.tokens.issue(request_id, new_instance_id, generation=cap.generation)
        return held.pending_token

    def take_back(self, token: str, *, request_id: str, caller_instance_id: str, from_instance_id: str) -> None:
        """The holder keeps a request it handed over to ``from_instance_id`` when its commit went unanswered (the
        destination may have installed it, or not): the destination's grant is withdrawn, unless the destination has
        pushed for the request already and so holds it now (StaleCapabilityError: the caller must drop its copy; two
        instances running one request would splice their continuations). TokenError: not the caller's to ask."""
        held = self._held.get(request_id)
        if held is None:
            raise StaleCapabilityError(f"request {request_id!r} is not held by anyone here (finished or unknown)")
        if not (_same(token, held.token) and held.current.holder_instance_id == caller_instance_id):
            if held.pending is not None and held.pending.holder_instance_id == caller_instance_id:
                raise TokenError(
                    f"{caller_instance_id} has not pushed for request {request_id!r}: nothing to take back"
                )
            self.tokens.verify(token, request_id=request_id, holder_instance_id=caller_instance_id)  # forged: raises
            raise StaleCapabilityError(
                f"request {request_id!r} is held by {held.current.holder_instance_id} now: it pushed outputs for it"
            )
        held.withdraw(from_instance_id)

    def take_back_unchecked(self, token: str, *, request_id: str, from_instance_id: str) -> bool:
        """``take_back`` for a caller with no identity (a plaintext frontend; the caller also checks who pushed
        last): withdraws ``from_instance_id``'s pending grant when ``token`` is the current one. False when ``token``
        is not (another holder's, or an earlier one's: the request moved on); a token-less caller cannot be told."""
        held = self._held.get(request_id)
        if held is None or not token:
            return held is not None
        if not _same(token, held.token):
            return False
        held.withdraw(from_instance_id)
        return True

    def promote_unchecked(self, token: str, *, request_id: str) -> None:
        """An output carrying the pending grant reached a plaintext frontend: its pusher (the migration destination)
        holds the request now, as ``check`` makes it on TLS, so the source's grant is outdated from here on (its
        late outputs, a final ERROR among them, are dropped instead of ending a request that runs on)."""
        held = self._held.get(request_id)
        if held is not None and held.pending is not None and _same(token, held.pending_token):
            held.promote()

    def hand_over_unchecked(self, token: str, *, request_id: str, new_instance_id: str) -> str:
        """``hand_over`` for a caller with no identity (a plaintext frontend): the token names the holder handing the
        request over, the current one or the pending one (which becomes current: it has the request now). A grant
        for the destination lets a later request with the same id tell the migrated request's outputs from its own
        (``outdated``); an unknown or missing token hands nothing over ("": unchecked, as before)."""
        held = self._held.get(request_id)
        if held is None or not token:
            return ""
        if held.pending is not None and _same(token, held.pending_token):
            held.promote()
        if not _same(token, held.token):
            return ""
        try:
            return self.hand_over(
                token,
                request_id=request_id,
                caller_instance_id=held.current.holder_instance_id,
                new_instance_id=new_instance_id,
            )
        except TokenError:
            return ""

    def forget(self, request_id: str) -> None:
        self._held.pop(request_id, None)


def _same(a: str, b: str) -> bool:
    return bool(a) and hmac.compare_digest(a.encode(), b.encode())


class RequestTracker:
    """The requests this frontend owns, by id, and who may push their outputs (``ledger``)."""

    def __init__(self, ledger: HolderLedger | None = None) -> None:
        self._requests: dict[str, TrackedRequest] = {}
        self.ledger = ledger if ledger is not None else HolderLedger()

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: TrackedRequest) -> None:
        if request.request_id in self._requests:
            raise DuplicateRequestError(f"request id {request.request_id!r} is in use", param="request_id")
        self._requests[request.request_id] = request

    def get(self, request_id: str) -> TrackedRequest | None:
        return self._requests.get(request_id)

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.ledger.forget(request_id)

    def owned_by(self, key_id: str | None) -> list[TrackedRequest]:
        """The requests an API key created (None: every request, for an admin or a frontend without keys)."""
        return [r for r in self._requests.values() if key_id is None or r.owner_key_id == key_id]

    def route(self, instance_id: str, outputs: Sequence[common_pb2.RequestOutput]) -> list[str]:
        """Hands outputs to their requests; returns the ids this frontend does not own (the llumlet aborts them)."""
        unknown: list[str] = []
        for output in outputs:
            request = self._requests.get(output.request_id)
            if request is None or not request.revoked.isdisjoint((instance_id, output.instance_id)):
                # Unknown, or from an instance the request was taken away from: the llumlet aborts it.
                if not output.finished and output.request_id not in unknown:
                    unknown.append(output.request_id)
                continue
            request.accept(output, instance_id)
        return unknown

    def end_held_by(self, instance_id: str, error: str, skip: Sequence[str] = ()) -> list[str]:
        """Ends every unfinished request ``instance_id`` currently holds with ``error`` (an instance declared lost;
        ``skip``: ids already ended by the notice itself); returns the ids ended. The frontend is the authority on
        who holds its requests: a request that reached the instance after the scheduler's last load snapshot of it (a
        migration landing, a fresh AddRequest) is ended here too, not left to the idle timeout."""
        ended: list[str] = []
        for rid in self.ledger.held_by(instance_id):
            request = self._requests.get(rid)
            if request is None or request.finished or rid in skip or instance_id in request.revoked:
                continue
            request.accept(
                common_pb2.RequestOutput(
                    request_id=rid,
                    first_token_index=request.num_received,
                    finished=True,
                    finish_reason=ERROR,
                    error=error,
                    instance_id=instance_id,
                ),
                instance_id,
            )
            ended.append(rid)
        return ended

    def inflight(self) -> dict[str, int]:
        """Unfinished requests per instance (what the bypass dispatcher balances on)."""
        counts: dict[str, int] = {}
        for request in self._requests.values():
            if request.instance_id and not request.finished:
                counts[request.instance_id] = counts.get(request.instance_id, 0) + 1
        return counts
