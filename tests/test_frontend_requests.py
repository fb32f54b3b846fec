"""Request tracking without servers: in-order acceptance, stop strings, finish handling; the sim tokenizer."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyllumnix.control_plane.frontend.errors import DuplicateRequestError
from pyllumnix.control_plane.frontend.requests import Delta, RequestTracker, TrackedRequest
from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.protos.llumnix.v1 import common_pb2

TOK = SimTokenizer()
LENGTH = common_pb2.FINISH_REASON_LENGTH


def out(
    first: int,
    ids: list[int],
    *,
    finished: bool = False,
    reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    instance: str = "a",
) -> common_pb2.RequestOutput:
    return common_pb2.RequestOutput(
        request_id="r",
        token_ids=ids,
        first_token_index=first,
        finished=finished,
        finish_reason=reason,
        instance_id=instance,
    )


def tracked(stop: list[str] | None = None) -> TrackedRequest:
    return TrackedRequest("r", [5, 6], TOK.detokenizer([5, 6]), stop=stop or [])


def drain(req: TrackedRequest) -> list[Delta]:
    items = []
    while not req._queue.empty():
        items.append(req._queue.get_nowait())
    return items


def test_sim_tokenizer_is_deterministic_and_readable() -> None:
    a, b = SimTokenizer(), SimTokenizer()
    text = "The quick brown fox jumps over the lazy dog"
    assert a.encode(text) == b.encode(text)
    assert len(a.encode(text * 4)) > 3 * len(a.encode(text))  # roughly proportional to the length
    assert all(a.NUM_SPECIAL <= t < a.vocab_size for t in a.encode(text))
    assert a.encode("") == []
    words = [a.word(t) for t in (3, 100, 31_999)]
    assert all(w.startswith(" ") and w[1:].isalpha() for w in words) and len(set(words)) == 3
    assert a.word(a.eos_token_id) == ""
    assert a.detokenizer([]).add([100, 101]) == a.word(100) + a.word(101)


def test_duplicates_and_resends_are_dropped() -> None:
    req = tracked()
    req.accept(out(0, [10, 11]))
    req.accept(out(0, [10, 11]))  # pure duplicate
    req.accept(out(1, [11, 12]))  # overlapping re-send: only 12 is new
    req.accept(out(3, [13], finished=True, reason=LENGTH, instance="b"))
    deltas = drain(req)
    assert [d.token_ids for d in deltas] == [[10, 11], [12], [13]]
    assert [d.first_token_index for d in deltas] == [0, 2, 3]
    assert req.num_received == 4 and req.finished and req.finish_reason == LENGTH
    assert req.text == TOK.detokenizer([]).add([10, 11, 12, 13])
    assert req.instance_id == "b"


def test_gap_is_held_until_filled() -> None:
    req = tracked()
    req.accept(out(0, [10]))
    req.accept(out(2, [12], finished=True, reason=LENGTH))  # index 1 missing
    assert req.num_received == 1 and req.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    req.accept(out(1, [11]))
    assert req.num_received == 3 and req.finish_reason == LENGTH
    assert [d.token_ids for d in drain(req)] == [[10], [11], [12]]


def test_stale_output_does_not_move_the_request_back() -> None:
    req = tracked()
    req.accept(out(0, [10, 11], instance="a"))
    req.accept(out(2, [12], instance="b"))  # migrated to b
    req.accept(out(0, [10, 11], instance="a"))  # late re-send from the source
    assert req.instance_id == "b"


def test_error_final_output_ends_the_request_whatever_its_index() -> None:
    req = tracked()
    req.accept(out(0, [10, 11]))
    req.accept(
        common_pb2.RequestOutput(
            request_id="r", finished=True, finish_reason=common_pb2.FINISH_REASON_ERROR, error="instance a lost"
        )
    )
    last = drain(req)[-1]
    assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_ERROR and last.error == "instance a lost"


def test_stop_string_spanning_tokens_truncates_and_calls_on_stop() -> None:
    words = [TOK.word(t) for t in (100, 101, 102, 103)]
    stop = words[1][-2:] + words[2][:3]  # starts in one token's text, ends in the next one's
    stopped: list[str] = []
    req = TrackedRequest(
        "r", [5], TOK.detokenizer([5]), stop=[stop, "never-seen"], on_stop=lambda r: stopped.append(r.request_id)
    )
    for i, t in enumerate((100, 101, 102, 103)):  # 103 comes after the stop: ignored
        req.accept(out(i, [t]))
    assert req.finished and req.finish_reason == common_pb2.FINISH_REASON_STOP
    assert req.text == words[0] + words[1][:-2]
    assert "".join(d.text for d in drain(req)) == req.text
    assert req.num_received == 3 and stopped == ["r"]


@pytest.mark.parametrize("per_push", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("finished_in_push", [False, True])
def test_a_stop_string_inside_a_multi_token_push_ends_at_the_token_that_completes_it(
    per_push: int, finished_in_push: bool
) -> None:
    """A llumlet's pusher merges up to ``stream_interval`` steps into one output. Before, a stop string completed
    inside it counted (and showed, as ids) every token of the output: ``completion_tokens`` depended on batching."""
    ids = list(range(100, 108))
    words = [TOK.word(t) for t in ids]
    stop = words[3][-2:] + words[4][:2]  # completed by the fifth token
    req = TrackedRequest("r", [5], TOK.detokenizer([5]), stop=[stop])
    for start in range(0, len(ids), per_push):
        chunk = ids[start : start + per_push]
        last = start + len(chunk) >= len(ids)
        reason = LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED
        req.accept(out(start, chunk, finished=finished_in_push and last, reason=reason))
    assert req.finished and req.finish_reason == common_pb2.FINISH_REASON_STOP
    assert req.text == "".join(words[:3]) + words[3][:-2]
    deltas = drain(req)
    assert "".join(d.text for d in deltas) == req.text
    assert req.num_received == 5 and [t for d in deltas for t in d.token_ids] == ids[:5]


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    word = TOK.word(100)
    req = TrackedRequest("r", [5], TOK.detokenizer([5]), stop=[word + "!"])
    req.accept(out(0, [100]))
    assert drain(req) == [Delta("", [100], 0, "a")]  # the word could be the start of the stop string
    req.accept(out(1, [101], finished=True, reason=LENGTH))
    assert "".join(d.text for d in drain(req)) == word + TOK.word(101)


def test_tracker_ids_are_unique_and_unknown_ids_are_reported() -> None:
    tracker = RequestTracker()
    tracker.add(tracked())
    with pytest.raises(DuplicateRequestError):
        tracker.add(tracked())
    unknown = tracker.route(
        "a",
        [
            out(0, [1]),
            common_pb2.RequestOutput(request_id="gone"),
            common_pb2.RequestOutput(request_id="done", finished=True),
        ],
    )
    assert unknown == ["gone"]
    assert tracker.inflight() == {"a": 1}


async def test_outputs_without_tokens_keep_a_request_alive_and_silence_ends_it() -> None:
    ended: list[str] = []
    # idle 0.6 s against a beat every 0.1 s: only a stall of this loop of ~0.5 s (a loaded CI host) could end it
    req = TrackedRequest("r", [5], TOK.detokenizer([5]), idle_timeout=0.6, on_stop=lambda r: ended.append("abort"))

    async def heartbeat() -> None:
        for _ in range(15):  # 1.5 s of outputs with no new tokens (a queued request), then its only token
            await asyncio.sleep(0.1)
            req.accept(out(0, []))
        req.accept(out(0, [100], finished=True, reason=LENGTH))

    beating = asyncio.create_task(heartbeat())
    deltas = [d async for d in req.deltas()]
    await beating
    assert not req.timed_out and deltas[-1].finish_reason == LENGTH and ended == []

    silent = TrackedRequest("s", [5], TOK.detokenizer([5]), idle_timeout=0.2, on_stop=lambda r: ended.append("abort"))
    silent.accept(out(0, [100]))
    started = time.monotonic()
    deltas = [d async for d in silent.deltas()]
    assert time.monotonic() - started >= 0.2
    assert silent.timed_out and silent.finished and ended == ["abort"]
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_ERROR and "no output for 0.2s" in deltas[-1].error


async def test_deadline_ends_a_request_that_keeps_producing() -> None:
    req = TrackedRequest("r", [5], TOK.detokenizer([5]), idle_timeout=5.0, deadline=time.monotonic() + 0.3)

    async def produce() -> None:
        for i in range(100):
            await asyncio.sleep(0.02)
            req.accept(out(i, [100 + i]))

    producing = asyncio.create_task(produce())
    deltas = [d async for d in req.deltas()]
    producing.cancel()
    assert req.timed_out and "deadline" in deltas[-1].error and 0 < req.num_received < 100


def test_a_heartbeat_never_replaces_an_output_held_for_a_gap() -> None:
    """A llumlet's token-less "still here" output names the index of its next token; arriving while a real output
    with that index waits for a gap to fill, it must not take that output's place (the tokens would be lost)."""
    req = tracked()
    req.accept(out(0, [10]))
    req.accept(out(2, [12, 13]))  # held: index 1 has not arrived
    heard = req._last_heard
    time.sleep(0.01)
    req.accept(out(2, []))  # the heartbeat
    assert req._last_heard > heard, "a heartbeat restarts the idle clock"
    req.accept(out(1, [11]))  # the gap fills
    assert req.num_received == 4
    assert [t for d in drain(req) for t in d.token_ids] == [10, 11, 12, 13]


def test_outputs_of_a_revoked_instance_are_dropped_and_reported_unknown() -> None:
    """After an AddRequest to ``a`` timed out the request went to ``b``: whatever ``a`` pushes later (it may have
    added the request after all) is dropped, and the id goes back so ``a`` aborts it."""
    tracker = RequestTracker()
    req = tracked()
    tracker.add(req)
    req.revoke("a")
    assert tracker.route("a", [out(0, [10, 11], instance="a")]) == ["r"]
    assert tracker.route("b", [out(0, [20], instance="b")]) == []
    assert tracker.route("a", [out(1, [], finished=True, reason=common_pb2.FINISH_REASON_ERROR)]) == []
    assert not req.finished and [t for d in drain(req) for t in d.token_ids] == [20]


def test_revoking_an_instance_drops_its_outputs_held_for_a_gap() -> None:
    """REVIEW13: an output of the instance a request is taken back from, held for a gap, spliced its tokens in once
    the holder filled the gap; revoking it drops what it has held too."""
    req = tracked()
    req.accept(out(0, [100, 101], instance="s"), "s")
    req.accept(out(3, [900, 901], instance="d"), "d")  # d ran ahead: held for index 2
    req.revoke("d")
    req.accept(out(2, [102, 103, 104], finished=True, reason=LENGTH, instance="s"), "s")
    tokens = [t for delta in drain(req) for t in delta.token_ids]
    assert tokens == [100, 101, 102, 103, 104] and req.instance_id == "s"
