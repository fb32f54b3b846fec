"""The lean token path (#20): SSE chunks rendered from a per-stream template are byte for byte the full rendering,
queued deltas reach the client in one write, one idle timer per request (not one per token), a client that keeps up
gets each token written as the sink routes it (no queue, no task switch), and ``/get_load``."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from asyncio import selector_events
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pyllumnix.control_plane.frontend import http
from pyllumnix.control_plane.frontend.http import _ChunkTemplate, start_http
from pyllumnix.control_plane.frontend.openai_schema import choice, envelope
from pyllumnix.control_plane.frontend.requests import Delta, TrackedRequest
from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.infra.security.ca import CertificateAuthority, Identity
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_frontend_fakes import FakeLlumlet, expected_text, running_stack


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
    # the bytes a streamed token is written as: the same rendering, encoded
    assert t.encode(text) == t.render(text, None, False).encode()


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


def _count_queued(monkeypatch: pytest.MonkeyPatch) -> list[Delta]:
    """Every delta any TrackedRequest puts on its reader's queue, from now on."""
    queued: list[Delta] = []
    original: Callable[[TrackedRequest], None] = TrackedRequest.__post_init__

    def post_init(self: TrackedRequest) -> None:
        original(self)
        put = self._queue.put_nowait

        def counting(delta: Delta) -> None:
            queued.append(delta)
            put(delta)

        self._queue.put_nowait = counting  # type: ignore[method-assign,assignment]

    monkeypatch.setattr(TrackedRequest, "__post_init__", post_init)
    return queued


async def _stream_text(
    url: str, body: dict[str, object], ssl_context: ssl.SSLContext | None = None
) -> tuple[str, list[str | None], bool]:
    """The streamed text, the finish reasons of the chunks with a choice, and whether ``[DONE]`` ended the stream."""
    text, reasons, done = "", [], False
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context is not None else None
    async with aiohttp.ClientSession(connector=connector) as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: ") :])
            for c in chunk["choices"]:
                text += c["delta"].get("content") or "" if "delta" in c else c["text"]
                reasons.append(c["finish_reason"])
    return text, reasons, done


@pytest.mark.parametrize("chat", [False, True])
async def test_a_client_that_keeps_up_gets_tokens_without_the_queue(
    chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every unfinished delta is written by the sink's callback itself; only the finishing one is queued for the
    handler (usage, [DONE], the end of the body). The old path queued every delta and woke the handler per token."""
    queued = _count_queued(monkeypatch)
    async with running_stack([FakeLlumlet("i-1", delay=0.005, messy=False)]) as stack:
        if chat:
            url = f"{stack.http.url}/v1/chat/completions"
            body: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
        else:
            url = f"{stack.http.url}/v1/completions"
            body = {"prompt": "hi"}
        body |= {"model": stack.frontend.model, "max_tokens": 30, "stream": True}
        text, reasons, done = await _stream_text(url, body)
    assert text == expected_text(30)
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1]) and done
    assert [d.finished for d in queued] == [True]


async def test_a_token_written_directly_makes_no_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the direct path a token is text to bytes to the socket: no Delta object per token (the old path built one
    per token and handed it to the writer); only the finishing delta is made (it is queued for the handler)."""
    from pyllumnix.control_plane.frontend import requests

    made: list[Delta] = []

    class CountingDelta(Delta):
        __slots__ = ()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(requests, "Delta", CountingDelta)
    async with running_stack([FakeLlumlet("i-1", delay=0.005, messy=False)]) as stack:
        body = {"model": stack.frontend.model, "prompt": "hi", "max_tokens": 30, "stream": True}
        text, reasons, done = await _stream_text(f"{stack.http.url}/v1/completions", body)
    assert text == expected_text(30) and reasons[-1] == "length" and done
    assert [d.finished for d in made] == [True]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_the_end_of_a_stream_is_one_write(include_usage: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finishing chunk, the usage chunk, ``[DONE]`` and the chunked body's terminator leave in one send (old:
    three or four, each a syscall and a wake-up of the client)."""
    writes: list[bytes] = []
    transport_class: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009 (private, untyped)
    original_write: Callable[[Any, bytes], None] = transport_class.write
    original_writelines: Callable[[Any, Any], None] = transport_class.writelines

    def write(self: Any, data: bytes) -> None:
        writes.append(bytes(data))
        original_write(self, data)

    def writelines(self: Any, lines: Any) -> None:
        lines = [bytes(x) for x in lines]
        writes.append(b"".join(lines))
        original_writelines(self, lines)

    monkeypatch.setattr(transport_class, "write", write)
    monkeypatch.setattr(transport_class, "writelines", writelines)
    async with running_stack([FakeLlumlet("i-1", delay=0.002, messy=False)]) as stack:
        body: dict[str, object] = {"model": stack.frontend.model, "prompt": "hi", "max_tokens": 12, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        text, reasons, done = await _stream_text(f"{stack.http.url}/v1/completions", body)
    assert text == expected_text(12) and reasons[-1] == "length" and done
    last = [w for w in writes if b"[DONE]" in w]
    assert len(last) == 1
    assert b'"finish_reason": "length"' in last[0] and last[0].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert (b'"usage": {"prompt_tokens"' in last[0]) == include_usage


def test_sim_detokenizer_spells_each_id_once() -> None:
    """Detokenizing runs per streamed token: an id's word is spelled once and looked up afterwards (the same text)."""
    tok = SimTokenizer()
    spelled = [tok._spell(i) for i in range(3, 400)]
    calls = [0]
    original = tok._spell

    def counting(token_id: int) -> str:
        calls[0] += 1
        return original(token_id)

    tok._spell = counting  # type: ignore[method-assign]
    detok = tok.detokenizer([])
    assert [detok.add([i]) for i in range(3, 400)] == spelled
    assert detok.add(list(range(3, 400))) == "".join(spelled)
    assert calls[0] == len(spelled)
    assert tok.word(0) == "" and tok.word(tok.vocab_size) == "" and tok.word(-1) == ""


async def test_a_client_behind_gets_every_token_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the client's socket buffer holds unsent bytes, tokens go through the handler's queue (timed writes);
    alternating between the two paths loses, repeats and reorders nothing."""
    queued = _count_queued(monkeypatch)
    calls = [0]
    transport_class: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009 (private, untyped)
    original: Callable[[Any], int] = transport_class.get_write_buffer_size

    def sometimes_behind(self: Any) -> int:
        calls[0] += 1
        return original(self) + (1 if calls[0] % 3 == 0 else 0)

    monkeypatch.setattr(transport_class, "get_write_buffer_size", sometimes_behind)
    async with running_stack([FakeLlumlet("i-1", delay=0.002, messy=True)]) as stack:
        body = {"model": stack.frontend.model, "prompt": "hi", "max_tokens": 60, "stream": True}
        text, reasons, done = await _stream_text(f"{stack.http.url}/v1/completions", body)
    assert text == expected_text(60)
    assert reasons[-1] == "length" and done
    assert len(queued) > 1  # both paths were taken


async def test_direct_writes_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct path writes to the TLS transport the same chunked frames (an HTTPS frontend)."""
    queued = _count_queued(monkeypatch)
    ca = CertificateAuthority.create()
    ca_cert, _ = ca.write(tmp_path / "ca")
    server = ca.issue(Identity("c1", "frontend", "f1")).write(tmp_path / "server", ca_cert)
    client = ca.issue(Identity("c1", "admin", "tester")).write(tmp_path / "client", ca_cert)
    async with running_stack([FakeLlumlet("i-1", delay=0.002, messy=False)]) as stack:
        https = await start_http(stack.frontend, ssl_context=server_ssl_context(server, require_client_cert=False))
        try:
            body = {"model": stack.frontend.model, "prompt": "hi", "max_tokens": 25, "stream": True}
            text, reasons, done = await _stream_text(f"{https.url}/v1/completions", body, client_ssl_context(client))
        finally:
            await https.stop()
    assert https.url.startswith("https://")
    assert text == expected_text(25) and reasons[-1] == "length" and done
    assert [d.finished for d in queued] == [True]


async def test_a_failing_direct_write_falls_back_to_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct write runs inside the output sink: if it raises, the delta goes to the handler's queue (and its write)
    instead of the exception failing the llumlet's push for every request in it."""
    real = http._direct_writer
    calls = [0]

    def flaky(*args: Any) -> Callable[[bytes], None] | None:
        write = real(*args)
        assert write is not None

        def sometimes_raise(data: bytes) -> None:
            calls[0] += 1
            if calls[0] % 4 == 0:
                raise RuntimeError("injected")
            write(data)

        return sometimes_raise

    monkeypatch.setattr(http, "_direct_writer", flaky)
    async with running_stack([FakeLlumlet("i-1", delay=0.002, messy=False)]) as stack:
        body = {"model": stack.frontend.model, "prompt": "hi", "max_tokens": 30, "stream": True}
        text, reasons, done = await _stream_text(f"{stack.http.url}/v1/completions", body)
        assert stack.llumlets["i-1"].unknown_replies == []
    assert calls[0] >= 4
    assert text == expected_text(30) and reasons[-1] == "length" and done


def test_direct_writer_only_where_the_framing_is_known() -> None:
    """The direct path writes raw bytes to the transport: it must refuse a writer whose headers are still buffered
    (they would follow the body) or that has a per-chunk hook, compression or a declared length."""
    from unittest import mock

    from aiohttp.http_writer import StreamWriter

    loop = asyncio.new_event_loop()
    try:
        transport = mock.Mock(spec=asyncio.Transport)
        protocol = mock.Mock(transport=transport)

        def writer() -> StreamWriter:
            w = StreamWriter(protocol, loop)
            w.enable_chunking()
            w._headers_written = True  # as after prepare(): headers on the wire
            return w

        write = http._direct_writer(writer(), transport)
        assert write is not None
        write(b"abc")
        transport.write.assert_called_once_with(b"3\r\nabc\r\n")

        held = writer()
        held._headers_written = False
        assert http._direct_writer(held, transport) is None

        async def hook(chunk: bytes | bytearray | memoryview[int] | memoryview[bytes]) -> None:
            return None

        hooked = StreamWriter(protocol, loop, on_chunk_sent=hook)
        hooked._headers_written = True
        assert http._direct_writer(hooked, transport) is None

        compressed = writer()
        compressed.enable_compression("deflate")
        assert http._direct_writer(compressed, transport) is None

        sized = StreamWriter(protocol, loop)
        sized._headers_written = True
        sized.length = 10
        assert http._direct_writer(sized, transport) is None
    finally:
        loop.close()
