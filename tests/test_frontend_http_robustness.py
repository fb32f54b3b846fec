"""The HTTP API against slow, stalled and probing clients: bodies have a deadline (408), connections that never
finish their headers are closed, uploads count against the in-flight limit from before their body is read, large
bodies read at once are bounded, 405s say what is allowed, and readiness probes share one check.

Each test fails on the frontend before these fixes (each says how); raw sockets play the misbehaving clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.control_plane.frontend.dispatch import Readiness
from pyllumnix.control_plane.frontend.http import (
    KEEPALIVE_TIMEOUT_S,
    LARGE_BODY_SLOTS,
    OFFLOAD_BODY_BYTES,
    HttpApi,
    HttpServer,
    body_cap,
    start_http,
)
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from tests.test_frontend_fakes import MAX_MODEL_LEN, MODEL, TOKENIZER, FakeLlumlet, StaticDispatcher, running_stack

# Generous for a shared 2-core machine; the behaviour under test is "an answer at all" (the old code gave none).
ANSWER_WITHIN_S = 10.0


@contextlib.asynccontextmanager
async def bare_http(**http_options: float) -> AsyncIterator[tuple[Frontend, HttpServer]]:
    """A frontend with nowhere to dispatch (these tests never get that far) behind ``start_http``."""
    frontend = Frontend(model=MODEL, max_model_len=MAX_MODEL_LEN, tokenizer=TOKENIZER, dispatcher=StaticDispatcher([]))
    server = await start_http(frontend, **http_options)  # type: ignore[arg-type]
    try:
        yield frontend, server
    finally:
        await server.stop()
        await frontend.close()


async def stalled_upload(port: int, declared: int, sent: bytes = b'{"model": ') -> asyncio.StreamWriter:
    """A POST whose headers promise ``declared`` body bytes, of which only ``sent`` arrive."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + sent)
    await writer.drain()
    return writer


async def read_status_and_body(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    async with asyncio.timeout(ANSWER_WITHIN_S):
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(await reader.readexactly(length))


async def test_a_stalled_body_gets_408_and_the_connection_is_closed() -> None:
    """Old: ``request.read()`` had no deadline, the client was never answered (this read timed out)."""
    async with bare_http(body_timeout=0.5) as (frontend, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"model": ')
        await writer.drain()
        started = time.monotonic()
        status, body = await read_status_and_body(reader)
        assert status == 408 and time.monotonic() - started < ANSWER_WITHIN_S
        error = body["error"]
        assert isinstance(error, dict) and error["type"] == "timeout_error" and "did not arrive" in error["message"]
        async with asyncio.timeout(ANSWER_WITHIN_S + 15):  # closed (after aiohttp's lingering read, 10 s at most)
            assert await reader.read() == b""
        writer.close()
        assert frontend.inflight == 0


async def test_a_connection_stalled_inside_its_headers_is_closed() -> None:
    """Old: aiohttp's default keep-alive (3630 s) was the only guard: the socket was held for an hour."""
    assert KEEPALIVE_TIMEOUT_S <= 120
    async with bare_http(keepalive_timeout=0.5) as (_, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # no end of headers, ever
        await writer.drain()
        async with asyncio.timeout(ANSWER_WITHIN_S):
            assert await reader.read() == b""
        writer.close()


async def request_status(method: str, url: str, body: object = None) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def post_status(url: str, body: dict[str, object]) -> tuple[int, dict[str, str], str]:
    return await request_status("POST", url, body)


async def test_uploads_hold_in_flight_slots_from_before_their_body_is_read() -> None:
    """max_inflight=2 and two uploads still sending: a third request is 429 before its body is read (old: the limit
    counted requests only once parsed, so any number of bodies were read at once); the slots come back when the
    uploads' clients leave."""
    async with running_stack([FakeLlumlet("i-1")], max_inflight=2) as stack:
        url = f"{stack.http.url}/v1/completions"
        body: dict[str, object] = {"model": MODEL, "prompt": "a", "max_tokens": 2}
        uploads = [await stalled_upload(stack.http.port, 1000) for _ in range(2)]
        deadline = time.monotonic() + ANSWER_WITHIN_S
        while True:  # the uploads' handlers start when the server gets to them: poll for the refusal
            status, headers, text = await post_status(url, body)
            if status == 429 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert status == 429 and headers.get("Retry-After") == "1", text
        assert stack.llumlets["i-1"].added == []
        for upload in uploads:
            upload.close()
        deadline = time.monotonic() + ANSWER_WITHIN_S
        while (status := (await post_status(url, body))[0]) == 429 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert status == 200
        assert stack.frontend.inflight == 0


async def test_uploads_count_in_get_load_and_in_grpc_admission() -> None:
    """Two uploads still sending hold max_inflight=2's slots: /get_load reports them (a router must not pick the
    frontend busy reading bodies as idle) and a gRPC request is refused (RESOURCE_EXHAUSTED) like an HTTP one; the
    slots come back when the uploads' clients leave. Old: /get_load said 0 and the gRPC request was admitted beyond
    the limit (the uploads were counted by the HTTP handler alone)."""
    async with running_stack([FakeLlumlet("i-1")], max_inflight=2) as stack:
        load_url = f"{stack.http.url}/get_load"
        uploads = [await stalled_upload(stack.http.port, 1000) for _ in range(2)]

        async def load_becomes(want: int) -> int:
            deadline = time.monotonic() + ANSWER_WITHIN_S
            while True:  # the uploads' handlers start (and end) when the server gets to them: poll
                status, _, text = await request_status("GET", load_url)
                assert status == 200, text
                load = json.loads(text)["load"]
                if load == want or time.monotonic() > deadline:
                    return int(load)
                await asyncio.sleep(0.05)

        assert await load_becomes(2) == 2
        request = frontend_pb2.GenerateRequest(text="a", sampling=common_pb2.SamplingParams(max_tokens=2))
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            stub = frontend_pb2_grpc.FrontendServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await anext(aiter(stub.Generate(request, timeout=ANSWER_WITHIN_S)))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert stack.llumlets["i-1"].added == []
            for upload in uploads:
                upload.close()
            assert await load_becomes(0) == 0
            replies = [reply async for reply in stub.Generate(request, timeout=ANSWER_WITHIN_S)]
            assert replies[-1].finished
        assert stack.frontend.inflight == 0


async def test_large_bodies_read_at_once_are_bounded() -> None:
    """LARGE_BODY_SLOTS uploads of large bodies in progress: one more large body is 429 at once (old: read too);
    a small body still gets in."""
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        url = f"{stack.http.url}/v1/completions"
        uploads = [await stalled_upload(stack.http.port, OFFLOAD_BODY_BYTES + 1) for _ in range(LARGE_BODY_SLOTS)]
        large: dict[str, object] = {"model": MODEL, "prompt": "a", "max_tokens": 2, "user": "x" * OFFLOAD_BODY_BYTES}
        deadline = time.monotonic() + ANSWER_WITHIN_S
        while True:
            status, _, text = await post_status(url, large)
            if status == 429 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert status == 429 and "large request bodies" in text, text
        assert (await post_status(url, {"model": MODEL, "prompt": "a", "max_tokens": 2}))[0] == 200
        for upload in uploads:
            upload.close()


def test_the_default_body_cap_follows_the_prompt_cap() -> None:
    frontend = Frontend(model=MODEL, max_model_len=4096, tokenizer=TOKENIZER, dispatcher=StaticDispatcher([]))
    assert HttpApi(frontend).max_body_bytes == body_cap(frontend.max_prompt_bytes) == 1 << 20
    assert HttpApi(frontend, max_body_bytes=5000).max_body_bytes == 5000
    assert body_cap(4 << 20) == 16 << 20  # a long-context model's prompt cap still fits, escaped


async def test_405_keeps_the_allow_header() -> None:
    """RFC 9110: a 405 lists the allowed methods (old: the OpenAI error body replaced aiohttp's answer without it)."""
    async with bare_http() as (_, server):
        status, headers, text = await request_status("GET", f"{server.url}/v1/completions")
        assert status == 405 and "POST" in headers.get("Allow", "")
        assert json.loads(text)["error"]["code"] == "405"


class CountingDispatcher(StaticDispatcher):
    def __init__(self) -> None:
        super().__init__([])
        self.checks = 0

    async def readiness(self) -> Readiness:
        self.checks += 1
        await asyncio.sleep(0.05)
        return Readiness(True, "counted")


@pytest.mark.parametrize("cancel_one", [False, True])
async def test_concurrent_readiness_probes_share_one_check(cancel_one: bool) -> None:
    """100 concurrent probes, then one more: one dispatcher check (old: 101, each an RPC to the scheduler leader).
    A probe whose client leaves (cancelled) does not cancel the check the others wait on."""
    dispatcher = CountingDispatcher()
    frontend = Frontend(
        model=MODEL, max_model_len=MAX_MODEL_LEN, tokenizer=TOKENIZER, dispatcher=dispatcher, sink_address="x:1"
    )
    try:
        api = HttpApi(frontend)
        probes = [asyncio.create_task(api.readiness()) for _ in range(100)]
        if cancel_one:
            await asyncio.sleep(0)
            probes[0].cancel()
        answers = await asyncio.gather(*probes[cancel_one:])
        assert set(answers) == {Readiness(True, "counted")}
        assert await api.readiness() == Readiness(True, "counted")
        assert dispatcher.checks == 1
    finally:
        await frontend.close()
