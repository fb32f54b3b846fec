"""ATTACK10 "left alone": one valid API key could take all of a frontend's request slots and starve every other
user. ``--max-requests-per-key`` caps one key's requests in flight (default a quarter of ``--max-inflight``; admin
keys, the operator's benchmarks and drills, are exempt): beyond it HTTP 429 with an OpenAI-style body naming the
limit, and RESOURCE_EXHAUSTED on gRPC ``Generate``, while other keys are served; the slot comes back however a request
ends (finish, refusal, client disconnect, abort).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import pytest

from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from tests.test_frontend_fakes import MAX_MODEL_LEN, MODEL, TOKENIZER, StaticDispatcher
from tests.test_security_frontend_api import Served, served

LONG = {"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True}
SHORT = {"model": MODEL, "prompt": "b", "max_tokens": 3}


async def _held(s: Served, who: str) -> int:
    return s.frontend.requests_in_flight_of(s.records[who].id)


async def _until(cond: Any, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not await cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


async def _grpc_generate(s: Served, who: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(s.grpc.address) as channel:
        call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
            frontend_pb2.GenerateRequest(text="c", sampling=common_pb2.SamplingParams(max_tokens=2)),
            metadata=(("authorization", f"Bearer {s.keys[who]}"),),
            timeout=10,
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as err:
            assert "limit of 2 requests in flight" in (err.details() or ""), err
            return err.code()
        return grpc.StatusCode.OK


async def test_one_key_at_its_cap_is_refused_while_another_key_is_served() -> None:
    async with served(max_inflight=16, max_requests_per_key=2) as s, aiohttp.ClientSession() as session:
        url = f"{s.http.url}/v1/completions"
        first = await session.post(url, json=LONG, headers={**s.auth("alice"), "X-Request-Id": "a-1"})
        second = await session.post(url, json=LONG, headers={**s.auth("alice"), "X-Request-Id": "a-2"})
        try:
            assert first.status == 200 and second.status == 200
            await first.content.readline()
            await second.content.readline()
            assert await _held(s, "alice") == 2
            # Alice's third: 429, OpenAI-style, naming the limit; gRPC too.
            async with session.post(url, json=SHORT, headers=s.auth("alice")) as resp:
                assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
                error = (await resp.json())["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
                assert "'alice' has its limit of 2 requests in flight" in error["message"]
                assert "--max-requests-per-key" in error["message"]
            assert await _grpc_generate(s, "alice") == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Bob is served meanwhile, on both APIs; his finished requests give their slots back.
            async with session.post(url, json=SHORT, headers=s.auth("bob")) as resp:
                assert resp.status == 200, await resp.text()
            assert await _grpc_generate(s, "bob") == grpc.StatusCode.OK
            assert await _held(s, "bob") == 0
            # At her cap even an invalid request of Alice's is shed before its body is read (its upload would hold
            # a slot of hers), and it keeps none.
            async with session.post(url, json={**SHORT, "max_tokens": -1}, headers=s.auth("alice")) as resp:
                assert resp.status == 429
            assert await _held(s, "alice") == 2
            # One of Alice's ends by client disconnect, the other by an abort: both slots come back.
            first.close()
            async with session.post(f"{s.http.url}/v1/requests/a-2/abort", headers=s.auth("alice")) as resp:
                assert resp.status == 200
            await second.read()
        finally:
            first.close()
            second.close()

        async def alice_free() -> bool:
            return await _held(s, "alice") == 0

        await _until(alice_free)
        # Below her cap an invalid request is read and refused (400), and keeps no slot either.
        async with session.post(url, json={**SHORT, "max_tokens": -1}, headers=s.auth("alice")) as resp:
            assert resp.status == 400
        assert await _held(s, "alice") == 0
        async with session.post(url, json=SHORT, headers=s.auth("alice")) as resp:
            assert resp.status == 200, await resp.text()
        assert await _grpc_generate(s, "alice") == grpc.StatusCode.OK
        assert s.frontend.inflight == 0


async def test_admin_keys_are_exempt_and_zero_means_no_cap() -> None:
    """The admin key of serve's context drives ``bench serving``/``bench peers``/``sim live``, hundreds of streams at
    once: capping it would make the operator's own benchmarks fail with 429 (a user key at the same cap is refused)."""
    async with served(max_inflight=16, max_requests_per_key=1) as s, aiohttp.ClientSession() as session:
        url = f"{s.http.url}/v1/completions"
        admin = [await session.post(url, json=LONG, headers=s.auth("root")) for _ in range(3)]
        try:
            assert [r.status for r in admin] == [200] * 3
            async with session.post(url, json=LONG, headers=s.auth("alice")) as held:
                assert held.status == 200
                await held.content.readline()
                async with session.post(url, json=SHORT, headers=s.auth("alice")) as resp:
                    assert resp.status == 429
        finally:
            for r in admin:
                r.close()
    async with served(max_inflight=16, max_requests_per_key=0) as s, aiohttp.ClientSession() as session:
        url = f"{s.http.url}/v1/completions"
        streams = [await session.post(url, json=LONG, headers=s.auth("alice")) for _ in range(5)]
        try:
            assert [r.status for r in streams] == [200] * 5
        finally:
            for r in streams:
                r.close()


def test_the_default_cap_is_a_quarter_of_the_frontends_slots() -> None:
    def make(**options: Any) -> Frontend:
        return Frontend(
            model=MODEL, max_model_len=MAX_MODEL_LEN, tokenizer=TOKENIZER, dispatcher=StaticDispatcher([]), **options
        )

    assert make().max_requests_per_key == 64
    assert make(max_inflight=8).max_requests_per_key == 2
    assert make(max_inflight=2).max_requests_per_key == 1
    with pytest.raises(ValueError, match="max_requests_per_key"):
        make(max_requests_per_key=-1)


async def test_a_keys_stalled_uploads_count_against_its_cap() -> None:
    """A body still being read holds one of its key's slots (session 10's leftover: uploads counted only globally, so
    one key could hold every slot of the frontend with stalled bodies, within the body timeout and the global cap)."""
    async with served(max_inflight=16, max_requests_per_key=1) as s, aiohttp.ClientSession() as session:
        _, writer = await asyncio.open_connection("127.0.0.1", s.http.port)
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {s.keys['alice']}\r\nContent-Length: 1000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"model": ')  # the rest never comes
        await writer.drain()
        try:
            await _until(lambda: _held(s, "alice"), timeout=5)
            url = f"{s.http.url}/v1/completions"
            async with session.post(url, json=SHORT, headers=s.auth("alice")) as resp:
                assert resp.status == 429, await resp.text()
                assert "'alice' has its limit of 1 requests in flight" in (await resp.json())["error"]["message"]
            async with session.post(url, json=SHORT, headers=s.auth("bob")) as resp:
                assert resp.status == 200, await resp.text()
        finally:
            writer.close()
        await _until(lambda: _is_zero(s, "alice"), timeout=10)  # the upload's slot comes back when it ends
        async with session.post(f"{s.http.url}/v1/completions", json=SHORT, headers=s.auth("alice")) as resp:
            assert resp.status == 200, await resp.text()


async def _is_zero(s: Served, who: str) -> bool:
    return await _held(s, who) == 0
