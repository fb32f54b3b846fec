"""The lean token path (#20): SSE chunks rendered from a per-stream template are byte for byte the full rendering,
queued deltas reach the client in one write, one idle timer per request (not one per token), and ``/get_load``."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from pyllumnix.control_plane.frontend.http import _ChunkTemplate
from pyllumnix.control_plane.frontend.openai_schema import choice, envelope
from pyllumnix.control_plane.frontend.requests import TrackedRequest
from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_frontend_fakes import FakeLlumlet, running_stack


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["", " plain", ' "quoted" \\ back\nslash', " ünï😀 \x00\x1f", "</script>"])
def test_template_chunk_is_the_full_rendering(chat: bool, include_usage: bool, text: str) -> None:
    t = _ChunkTemplate("r1", "m", chat=chat, include_usage=include_usage)
    for first, reason in ((False, None), (True, None), (False, "length"), (True, "stop")):
        full = envelope("r1", "m", chat=chat, chunk=True)
        full["created"] = t.created
        full["choices"] = [choice(text, reason, chat=chat, chunk=True, first=first)]
        if include_usage:
            full["usage"] = None
        assert t.render(text, reason, first) == f"data: {json.dumps(full)}\n\n"


def _tracked(idle: float | None = None) -> TrackedRequest:
    tok = SimTokenizer()
    return TrackedRequest("r1", [5, 6], tok.detokenizer([5, 6]), idle_timeout=idle)


def _out(first: int, ids: list[int], finished: bool = False) -> common_pb2.RequestOutput:
    return common_pb2.RequestOutput(
        request_id="r1",
        token_ids=ids,
        first_token_index=first,
        finished=finished,
        finish_reason=common_pb2.FINISH_REASON_LENGTH if finished else common_pb2.FINISH_REASON_UNSPECIFIED,
    )


async def test_delta_batches_take_every_queued_delta_at_once() -> None:
    req = _tracked()
    for i in range(3):
        req.accept(_out(i, [10 + i]))
    batches = req.delta_batches()
    first = await anext(batches)
    assert [d.token_ids for d in first] == [[10], [11], [12]]
    req.accept(_out(3, [13], finished=True))
    last = await anext(batches)
    assert [d.token_ids for d in last] == [[13]] and last[-1].finished
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


async def test_one_idle_timer_per_request_and_it_still_expires() -> None:
    loop = asyncio.get_running_loop()
    req = _tracked(idle=0.3)
    created: list[float] = []
    original = loop.call_at  # call_later and asyncio.timeout both schedule through call_at

    def counting(when: float, cb, *args, **kw):  # type: ignore[no-untyped-def]
        created.append(when)
        return original(when, cb, *args, **kw)

    loop.call_at = counting  # type: ignore[method-assign,assignment]
    try:
        deltas = req.deltas()
        for i in range(20):
            waiting = asyncio.ensure_future(anext(deltas))
            await asyncio.sleep(0)  # the reader waits on an empty queue, as a streaming client does
            req.accept(_out(i, [10 + i]))
            assert (await waiting).token_ids == [10 + i]
        assert len(created) <= 1  # before: one timer per wait (per token)
        start = time.monotonic()
        last = await anext(deltas)  # no more outputs: the idle timeout ends the request
    finally:
        loop.call_at = original  # type: ignore[method-assign]
    assert last.finished and req.timed_out and last.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert 0.2 < time.monotonic() - start < 5.0


async def test_get_load_reports_requests_in_flight() -> None:
    async with running_stack([FakeLlumlet("i-1", delay=0.05)]) as stack, aiohttp.ClientSession() as session:
        async with session.get(f"{stack.http.url}/get_load") as resp:
            assert resp.status == 200
            assert await resp.json() == {"load": 0}
        body = {"model": stack.frontend.model, "prompt": "hi", "max_tokens": 40, "stream": True}
        async with session.post(f"{stack.http.url}/v1/completions", json=body) as stream:
            await stream.content.readline()  # the request is being served
            async with session.get(f"{stack.http.url}/get_load") as resp:
                assert await resp.json() == {"load": 1}
            await stream.read()
