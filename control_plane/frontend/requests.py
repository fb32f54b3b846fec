"""Per-request state in the frontend: in-order token acceptance, detokenization, stop strings, current instance.

Outputs for one request can come from several llumlets (a migration moves it) and can repeat (a push retried, a
source re-sending before it hands over). A token is kept only if its index equals the number already received, so
duplicates and stale re-sends are dropped; an output that starts beyond that count is held until the gap is filled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from pyllumnix.control_plane.frontend.errors import DuplicateRequestError
from pyllumnix.control_plane.frontend.tokenizer import IncrementalDetokenizer
from pyllumnix.protos.llumnix.v1 import common_pb2

log = logging.getLogger(__name__)

STOP = common_pb2.FINISH_REASON_STOP
ABORT = common_pb2.FINISH_REASON_ABORT
ERROR = common_pb2.FINISH_REASON_ERROR
# Final outputs that end a request whatever its token count (the scheduler's "instance lost" notice has no index).
_TERMINAL_ANYWHERE = (ABORT, ERROR)


@dataclass(frozen=True)
class Delta:
    """What a client receives next: new text and ids, and on the last one the finish reason."""

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
    # Called once when a stop string ends the request here, so the frontend can abort it on its instance.
    on_stop: Callable[[TrackedRequest], None] | None = None
    # The instance that holds the request now (the dispatch target, then whoever pushed its latest tokens).
    instance_id: str = ""
    num_received: int = field(default=0, init=False)
    # Everything shown to the client so far plus any tail held back while it could still become a stop string.
    text: str = field(default="", init=False)
    finished: bool = field(default=False, init=False)
    finish_reason: common_pb2.FinishReason.ValueType = field(default=common_pb2.FINISH_REASON_UNSPECIFIED, init=False)
    error: str = field(default="", init=False)
    first_token_time: float | None = field(default=None, init=False)
    _emitted: int = field(default=0, init=False)
    _held: dict[int, common_pb2.RequestOutput] = field(default_factory=dict, init=False)
    _queue: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue, init=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def accept(self, output: common_pb2.RequestOutput, instance_id: str = "") -> None:
        """Takes one pushed output (``instance_id``: the pusher's, used when the output does not name one)."""
        if self.finished:
            return
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
        current = output.first_token_index + len(output.token_ids) >= self.num_received
        if new or (output.finished and (current or output.finish_reason in _TERMINAL_ANYWHERE)):
            self._apply(output, instance_id, new)
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
        text = self.detokenizer.add(new) if new else ""
        if output.finished:
            text += self.detokenizer.flush()
        self.text += text
        if self.stop and self._apply_stop_strings(new, first):
            return
        if output.finished:
            self._finish(new, first, output.finish_reason, output.error)
            return
        self._emit(new, first, upto=len(self.text) - self._held_back())

    def _apply_stop_strings(self, new: list[int], first: int) -> bool:
        longest = max(len(s) for s in self.stop)
        start = max(0, self._emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self._finish(new, first, STOP, "")
        if self.on_stop is not None:
            self.on_stop(self)
        return True

    def _held_back(self) -> int:
        """Length of the text tail that could still become a stop string (not shown to the client yet)."""
        pending = len(self.text) - self._emitted
        for k in range(min(pending, max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, new: list[int], first: int, upto: int) -> None:
        upto = max(upto, self._emitted)
        text = self.text[self._emitted : upto]
        self._emitted = upto
        if text or new:
            self._queue.put_nowait(Delta(text, new, first, self.instance_id))

    def _finish(self, new: list[int], first: int, reason: common_pb2.FinishReason.ValueType, error: str) -> None:
        self.finished = True
        self.finish_reason = reason
        self.error = error
        self._held.clear()
        text = self.text[self._emitted :]
        self._emitted = len(self.text)
        self._queue.put_nowait(Delta(text, new, first, self.instance_id, True, reason, error))

    def finish(self, reason: common_pb2.FinishReason.ValueType, error: str = "") -> None:
        """Ends the request here (abort, dispatch failure); no-op when already finished."""
        if not self.finished:
            self._finish([], self.num_received, reason, error)

    async def deltas(self) -> AsyncIterator[Delta]:
        """The client's view, until (and including) the finishing delta."""
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finished:
                return


class RequestTracker:
    """The requests this frontend owns, by id."""

    def __init__(self) -> None:
        self._requests: dict[str, TrackedRequest] = {}

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

    def route(self, instance_id: str, outputs: Sequence[common_pb2.RequestOutput]) -> list[str]:
        """Hands outputs to their requests; returns the ids this frontend does not own (the llumlet aborts them)."""
        unknown: list[str] = []
        for output in outputs:
            request = self._requests.get(output.request_id)
            if request is None:
                if not output.finished and output.request_id not in unknown:
                    unknown.append(output.request_id)
                continue
            request.accept(output, instance_id)
        return unknown

    def inflight(self) -> dict[str, int]:
        """Unfinished requests per instance (what the bypass dispatcher balances on)."""
        counts: dict[str, int] = {}
        for request in self._requests.values():
            if request.instance_id and not request.finished:
                counts[request.instance_id] = counts.get(request.instance_id, 0) + 1
        return counts
