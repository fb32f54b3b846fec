"""Issue #12, frontend side: every request ends (idle timeout, deadline), probes tell liveness from readiness, etcd
down is 503 + Retry-After, overload is 429, bad or oversized input is 400/413 before any heavy work, and the event
loop stays responsive while large bad payloads arrive. Real aiohttp and grpc.aio servers; fakes only for the cluster.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import grpc
import pytest

from pyllumnix.control_plane.frontend.core import MAX_STOP_CHARS
from pyllumnix.control_plane.frontend.http import READINESS_CACHE_S
from pyllumnix.control_plane.frontend.requests import StopMatcher
from pyllumnix.control_plane.frontend.routing import BypassDispatcher, EtcdRegistrySource, StaticRegistrySource
from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2_grpc
from tests.test_frontend_fakes import MODEL, FakeLlumlet, Stack, running_stack, token


async def start_llumlet_on(servicer: FakeLlumlet, port: int) -> RunningServer:
    """A fake llumlet's server on a given port of 127.0.0.1 (a llumlet restarted where it was)."""
    return await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, "llumnix.v1.LlumletService")],
        "127.0.0.1",
        port,
    )


async def post(url: str, body: bytes | dict[str, Any], **headers: str) -> tuple[int, dict[str, Any], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as resp:
        try:
            payload = await resp.json(content_type=None)
        except ValueError:
            payload = await resp.text()
        return resp.status, dict(resp.headers), payload


def assert_openai_error(payload: Any) -> dict[str, Any]:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def assert_clean(stack: Stack) -> None:
    """The frontend's in-flight count matches reality: nothing tracked, nothing admitted."""
    assert stack.frontend.inflight == 0 and len(stack.frontend.tracker) == 0
    assert stack.frontend.metrics.inflight._value.get() == 0


def info(instance_id: str, address: str) -> common_pb2.InstanceInfo:
    return common_pb2.InstanceInfo(instance_id=instance_id, grpc_address=address)


def _raw(text: str) -> bytes:
    return text.encode()


BAD_BODIES: list[tuple[bytes, str | None]] = [
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 2147483648}}'), "max_tokens"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "top_k": 2147483648}}'), "top_k"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "seed": 9223372036854775808}}'), "seed"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "seed": {10**400}}}'), "seed"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "\\ud800", "max_tokens": 4}}'), None),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "stop": ["\\udfff"]}}'), None),
    (_raw('{"model": "' + MODEL + '", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"), None),
    (_raw('{"a": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}"), None),
    (_raw('{"a": ' + "[" * 40 + "]" * 40 + "}"), None),  # parses fine, still deeper than the limit
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "temperature": NaN}}'), None),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "temperature": Infinity}}'), None),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "temperature": 1e300}}'), "temperature"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "temperature": 1e999}}'), "temperature"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "temperature": 250}}'), "temperature"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "presence_penalty": NaN}}'), None),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "presence_penalty": 3}}'), "presence_penalty"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "frequency_penalty": -2.5}}'), "frequency_penalty"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "top_k": -5}}'), "top_k"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "repetition_penalty": -3}}'), "repetition_penalty"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "ignore_eos": "false"}}'), "ignore_eos"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "stream": "true"}}'), "stream"),
    (
        _raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "stream_options": {{"include_usage": 1}}}}'),
        "include_usage",
    ),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "stop": ["a", "b", "c", "d", "e"]}}'), "stop"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "stop": "{"x" * (MAX_STOP_CHARS + 1)}"}}'), "stop"),
    (_raw(f'{{"model": "{MODEL}", "prompt": [1, 4294967296], "max_tokens": 4}}'), "prompt"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "n": {10**400}}}'), "n"),
    # equal to a default but not of its type: 0 == False, True == 1 (were accepted and silently ignored)
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "logprobs": 0}}'), "logprobs"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "best_of": true}}'), "best_of"),
    (_raw(f'{{"model": "{MODEL}", "prompt": "a", "max_tokens": 4, "stream": true, "stream_options": false}}'), None),
    # no max_tokens and no room left for a token: the prompt is at fault (the error named max_tokens)
    (_raw(f'{{"model": "{MODEL}", "prompt": "{"w " * 2000}"}}'), "prompt"),
]


@pytest.mark.parametrize(("raw", "param"), BAD_BODIES, ids=[f"bad{i}" for i in range(len(BAD_BODIES))])
async def test_bad_payloads_get_400_with_an_openai_body_and_reach_no_instance(raw: bytes, param: str | None) -> None:
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        status, _, payload = await post(f"{stack.http.url}/v1/completions", raw)
        assert status == 400, payload
        error = assert_openai_error(payload)
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param
        assert stack.llumlets["i-1"].added == []
        assert_clean(stack)


async def test_a_malformed_max_tokens_beside_max_completion_tokens_is_400() -> None:
    """A chat body's ``max_completion_tokens`` supersedes ``max_tokens``; a malformed ``max_tokens`` was not checked."""
    raw = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": "abc",
            "max_completion_tokens": 3,
        }
    ).encode()
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        status, _, payload = await post(f"{stack.http.url}/v1/chat/completions", raw)
        assert status == 400, payload
        assert assert_openai_error(payload)["param"] == "max_tokens"
        assert stack.llumlets["i-1"].added == []


async def test_lone_surrogate_in_a_chat_message_is_400() -> None:
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        raw = _raw(f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi \\ud800"}}]}}')
        status, _, payload = await post(f"{stack.http.url}/v1/chat/completions", raw)
        assert status == 400 and "Unicode" in assert_openai_error(payload)["message"]


async def test_valid_sampling_still_passes_through() -> None:
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        body = {
            "model": MODEL,
            "prompt": "a",
            "max_tokens": 3,
            "temperature": 0.7,
            "top_k": -1,
            "seed": 2**63 - 1,
            "ignore_eos": True,
            "repetition_penalty": 1.1,
            "presence_penalty": -2,
            "stop": ["x", "y", "z", "w"],
        }
        status, _, payload = await post(f"{stack.http.url}/v1/completions", body)
        assert status == 200, payload
        sampling = stack.llumlets["i-1"].added[0].sampling
        assert sampling.seed == 2**63 - 1 and sampling.ignore_eos and sampling.top_k == -1
        # ignore_eos: true means the frontend adds no EOS stop token.
        assert SimTokenizer.EOS not in sampling.stop_token_ids
        assert_clean(stack)


async def test_oversized_body_and_prompt_get_413_before_tokenising() -> None:
    class CountingTokenizer(SimTokenizer):
        calls = 0

        def encode(self, text: str) -> list[int]:
            CountingTokenizer.calls += 1
            return super().encode(text)

    tok = CountingTokenizer()
    async with running_stack(
        [FakeLlumlet("i-1")], tokenizer=tok, max_body_bytes=256 << 10, max_prompt_bytes=32 << 10
    ) as stack:
        url = f"{stack.http.url}/v1/completions"
        status, _, payload = await post(url, {"model": MODEL, "prompt": "w " * (200 << 10), "max_tokens": 4})
        assert status == 413, payload
        assert_openai_error(payload)
        status, _, payload = await post(url, {"model": MODEL, "prompt": "w " * (20 << 10), "max_tokens": 4})
        assert status == 413 and assert_openai_error(payload)["param"] == "prompt"
        # Multi-byte text counts in UTF-8 bytes: 12k characters of 3 bytes each are over 32 KiB.
        status, _, payload = await post(url, {"model": MODEL, "prompt": "\u20ac" * 12_000, "max_tokens": 4})
        assert status == 413
        assert CountingTokenizer.calls == 0
        # Token ids: more than the model's length is refused before the vocabulary scan.
        status, _, payload = await post(url, {"model": MODEL, "prompt": [5] * 50_000, "max_tokens": 4})
        assert status == 400 and assert_openai_error(payload)["param"] == "prompt"
        assert_clean(stack)


async def test_grpc_generate_rejects_huge_messages_and_bad_sampling() -> None:
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        async with grpc.aio.insecure_channel(
            stack.grpc.address, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            stub = frontend_pb2_grpc.FrontendServiceStub(channel)

            async def generate(request: frontend_pb2.GenerateRequest) -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.Generate(request, timeout=10):
                        pass
                return caught.value

            huge = frontend_pb2.GenerateRequest(
                text="w " * (3 << 20), sampling=common_pb2.SamplingParams(max_tokens=4)
            )  # 6 MiB: over the 4 MiB cap, refused by gRPC before it is parsed
            assert (await generate(huge)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            bad: list[common_pb2.SamplingParams] = [
                common_pb2.SamplingParams(max_tokens=4, temperature=float("nan")),
                common_pb2.SamplingParams(max_tokens=4, temperature=float("inf")),
                common_pb2.SamplingParams(max_tokens=4, top_p=float("nan")),
                common_pb2.SamplingParams(max_tokens=4, presence_penalty=float("nan")),
                common_pb2.SamplingParams(max_tokens=4, top_k=-5),
                common_pb2.SamplingParams(max_tokens=4, repetition_penalty=-3),
                common_pb2.SamplingParams(max_tokens=4, stop=["a", "b", "c", "d", "e"]),
                common_pb2.SamplingParams(max_tokens=4, stop=["x" * (MAX_STOP_CHARS + 1)]),
                common_pb2.SamplingParams(max_tokens=4, stop_token_ids=[1 << 30]),
                common_pb2.SamplingParams(max_tokens=2**31 - 1),
            ]
            for sampling in bad:
                err = await generate(frontend_pb2.GenerateRequest(text="hello", sampling=sampling))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (sampling, err)
            # A prompt over the byte cap (but under the message cap) is refused without tokenising.
            big = frontend_pb2.GenerateRequest(text="w " * (1 << 20), sampling=common_pb2.SamplingParams(max_tokens=4))
            assert (await generate(big)).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stack.llumlets["i-1"].added == []
        assert_clean(stack)


async def test_inflight_limit_answers_429_with_retry_after_on_http_and_grpc() -> None:
    async with running_stack([FakeLlumlet("i-1", delay=0.05, messy=False)], max_inflight=2) as stack:
        url = f"{stack.http.url}/v1/completions"
        body = {"model": MODEL, "prompt": "a", "max_tokens": 30}
        held = [asyncio.create_task(post(url, body)) for _ in range(2)]
        while stack.frontend.inflight < 2:
            await asyncio.sleep(0.005)
        status, headers, payload = await post(url, {"model": MODEL, "prompt": "b", "max_tokens": 4})
        assert status == 429 and int(headers["Retry-After"]) >= 1
        error = assert_openai_error(payload)
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
                frontend_pb2.GenerateRequest(text="c", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = dict(caught.value.trailing_metadata() or ())
            assert int(trailing["retry-after"]) >= 1
        assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]
        assert len(stack.llumlets["i-1"].added) == 2
        assert_clean(stack)
        # The slots are free again.
        status, _, _ = await post(url, {"model": MODEL, "prompt": "d", "max_tokens": 2})
        assert status == 200


async def test_instances_refusing_with_full_queues_give_429_not_500() -> None:
    full = [FakeLlumlet(f"i-{k}", refuse=10, refuse_code=grpc.StatusCode.RESOURCE_EXHAUSTED) for k in (1, 2)]
    async with running_stack(full) as stack:
        status, headers, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4}
        )
        assert status == 429 and "Retry-After" in headers, payload
        assert "full" in assert_openai_error(payload)["message"]
        assert_clean(stack)
    # One full instance, one with room: the dispatcher tries the other and the request is served.
    mixed = [FakeLlumlet("i-1", refuse=10, refuse_code=grpc.StatusCode.RESOURCE_EXHAUSTED), FakeLlumlet("i-2")]
    async with running_stack(mixed) as stack:
        status, _, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4}
        )
        assert status == 200, payload
        assert len(stack.llumlets["i-2"].added) == 1
        assert_clean(stack)


async def test_an_add_request_that_times_out_is_aborted_there_and_placed_elsewhere() -> None:
    """i-1 is stopped (its AddRequest never answers) but adds the request once it wakes up: the frontend must not
    fail the request (it used to: UNAVAILABLE "did not answer in time"), nor show i-1's outputs beside i-2's. It aborts
    the request on i-1 (best-effort), places it on i-2, and drops whatever i-1 pushes for it later."""
    stalled = FakeLlumlet("i-1", stall_add=1, messy=False)
    live = FakeLlumlet("i-2", delay=0.1, messy=False)
    async with running_stack([stalled, live], call_timeout=0.5) as stack:
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
                frontend_pb2.GenerateRequest(text="a", sampling=common_pb2.SamplingParams(max_tokens=8)), timeout=20
            )
            replies = [await call.read()]
            rid = stalled.stalled[0]
            assert [r.request_id for r in live.added] == [rid], "placed on i-2 after i-1's deadline"
            await asyncio.wait_for(stalled.aborted_event.wait(), 5)
            assert stalled.aborted == [rid], "i-1 was told to abort it"
            stalled.wake.set()  # i-1 adds it after all and pushes all 8 tokens at once
            while not replies[-1].finished:
                replies.append(await call.read())
            assert await call.code() == grpc.StatusCode.OK
        assert rid in stalled.unknown_replies, "i-1's outputs were refused: it stops the request"
        assert all(r.instance_id == "i-2" for r in replies if r.token_ids), "only i-2's outputs reach the client"
        tokens = [t for r in replies for t in r.token_ids]
        assert tokens == [token(i) for i in range(8)]
        assert replies[-1].finished and replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert_clean(stack)


async def _read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    events: list[Any] = []
    async for line in resp.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            data = text[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_a_stream_that_receives_nothing_ends_with_a_clear_error_and_is_aborted() -> None:
    # The llumlet pushes two tokens and then nothing (it gave up pushing): the stream must not hang.
    silent = FakeLlumlet("i-1", silent_after=2, messy=False)
    async with running_stack([silent], idle_timeout=0.4) as stack:
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "prompt": "a", "max_tokens": 20, "stream": True}
            async with session.post(f"{stack.http.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                events = await asyncio.wait_for(_read_sse(resp), 10)
        elapsed = time.monotonic() - started
        assert elapsed >= 0.4
        text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))
        assert text == SimTokenizer().word(token(0)) + SimTokenizer().word(token(1))
        error = assert_openai_error(events[-2])
        assert error["code"] == "deadline_exceeded" and "no output for 0.4s" in error["message"]
        assert events[-1] == "[DONE]"
        await asyncio.wait_for(silent.aborted_event.wait(), 5)
        assert silent.aborted == [silent.added[0].request_id]
        assert_clean(stack)
        assert stack.frontend.metrics.timeouts._value.get() == 1


async def test_idle_timeout_non_streaming_is_504_and_grpc_is_deadline_exceeded() -> None:
    silent = FakeLlumlet("i-1", silent_after=0)
    async with running_stack([silent], idle_timeout=0.3) as stack:
        status, headers, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4}
        )
        assert status == 504 and assert_openai_error(payload)["type"] == "timeout_error"
        # the error names the request (which the client did not name): it can be looked up or aborted
        assert {k.lower(): v for k, v in headers.items()}.get("x-request-id") == silent.added[0].request_id
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
                frontend_pb2.GenerateRequest(text="b", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=10
            )
            replies = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for reply in call:
                    replies.append(reply)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no output" in (caught.value.details() or "")
            assert replies[-1].finished and replies[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        for _ in range(200):
            if len(silent.aborted) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(silent.aborted) == sorted(r.request_id for r in silent.added)
        assert_clean(stack)


async def test_request_deadline_ends_a_slow_but_live_stream() -> None:
    slow = FakeLlumlet("i-1", delay=0.05, messy=False)
    async with running_stack([slow], idle_timeout=5.0, request_timeout=0.5) as stack:
        status, _, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 200}
        )
        assert status == 504 and "deadline" in assert_openai_error(payload)["message"]
        await asyncio.wait_for(slow.aborted_event.wait(), 5)
        assert_clean(stack)


async def test_liveness_and_readiness_follow_the_registry() -> None:
    registry = StaticRegistrySource()
    llumlet = FakeLlumlet("i-1")
    async with running_stack([llumlet], dispatcher=BypassDispatcher(registry)) as stack:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{stack.http.url}/livez") as resp:
                assert resp.status == 200
            for path in ("/health", "/readyz"):
                async with session.get(f"{stack.http.url}{path}") as resp:
                    assert resp.status == 503 and "Retry-After" in resp.headers
                    assert "no instance" in (await resp.json())["reason"]
            status, headers, payload = await post(
                f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}
            )
            assert status == 503 and "Retry-After" in headers
            assert assert_openai_error(payload)["type"] == "service_unavailable"
            registry.set([info("i-1", stack.book.addresses["i-1"])])
            # Readiness answers are reused for up to READINESS_CACHE_S (probes are public): poll for the change.
            deadline = time.monotonic() + READINESS_CACHE_S + 5
            while True:
                async with session.get(f"{stack.http.url}/health") as resp:
                    if resp.status == 200 or time.monotonic() > deadline:
                        assert resp.status == 200 and "1 registered" in (await resp.json())["reason"]
                        break
                await asyncio.sleep(0.1)
            status, _, _ = await post(
                f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}
            )
            assert status == 200
        assert_clean(stack)


class _DeadEtcd:
    async def list(self) -> Any:
        raise EtcdUnavailableError("range", ["127.0.0.1:1"], 0.1, "connection refused")


async def test_etcd_unavailable_is_503_with_retry_after_on_http_and_grpc_never_500() -> None:
    dispatcher = BypassDispatcher(EtcdRegistrySource(_DeadEtcd()))
    async with running_stack([FakeLlumlet("i-1")], dispatcher=dispatcher) as stack:
        status, headers, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}
        )
        assert status == 503, payload
        assert int(headers["Retry-After"]) >= 1
        error = assert_openai_error(payload)
        assert error["type"] == "service_unavailable" and "etcd unavailable" in error["message"]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{stack.http.url}/health") as resp:
                # Public: why, without the error's text (which names etcd's endpoints); the log has that.
                assert resp.status == 503 and "the registry cannot be read" in (await resp.json())["reason"]
            async with session.get(f"{stack.http.url}/livez") as resp:
                assert resp.status == 200
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
                frontend_pb2.GenerateRequest(text="b", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert int(dict(caught.value.trailing_metadata() or ())["retry-after"]) >= 1
        assert_clean(stack)


def _naive_first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Reference: the stop string that completes first (ties: the longest), by its start index."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else best[1]


def test_stop_matcher_agrees_with_a_naive_search_over_random_pieces() -> None:
    rng = random.Random(12)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        matcher = StopMatcher(stops)
        fed, found = 0, None
        while fed < len(text) and found is None:
            piece = text[fed : fed + rng.randint(1, 4)]
            hit = matcher.feed(piece)
            if hit is not None:
                found = fed + hit
            fed += len(piece)
        assert found == _naive_first_stop(text, stops), (stops, text)
        if found is None:
            # What is held back is exactly the longest text suffix that is a proper prefix of a stop string.
            longest = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert matcher.partial == longest


_LOADER = r"""
import http.client, json, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
model = sys.argv[3]
bodies = [
    json.dumps({"model": model, "prompt": "w " * (1 << 20), "max_tokens": 4}).encode(),  # 2 MiB prompt: 413
    json.dumps({"model": model, "prompt": "w " * 450000, "max_tokens": 4}).encode(),  # 0.9 MB prompt: 413
    ('{"prompt": ' + "[" * 500000 + "]" * 500000 + "}").encode(),  # 1 MB of nesting: 400
    json.dumps({"model": model, "prompt": "a", "stop": ["s%d" % i for i in range(78000)]}).encode(),  # 400
    json.dumps({"model": model, "prompt": "ab " * 20000, "max_tokens": 4}).encode(),  # tokenised, too long: 400
]
counts = {}
lock = threading.Lock()
def work(k):
    end = time.monotonic() + seconds
    i = k
    while time.monotonic() < end:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/completions", body=bodies[i % len(bodies)], headers=headers)
        status = conn.getresponse().status
        conn.close()
        with lock:
            counts[status] = counts.get(status, 0) + 1
        i += 1
threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(counts))
"""


async def test_liveness_answers_fast_while_large_bad_payloads_arrive() -> None:
    """The issue's acceptance point: /livez in < 100 ms while large bad payloads arrive. The payloads come from
    another process (the test's own sending must not load this event loop); the bound on the worst probe is
    generous for a shared machine, the median is held to the acceptance figure."""
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        loader = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _LOADER,
            str(stack.http.port),
            "4",
            MODEL,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            latencies: list[float] = []
            async with aiohttp.ClientSession() as session:
                await asyncio.sleep(0.5)  # let the loader get going
                while loader.returncode is None and len(latencies) < 400:
                    started = time.perf_counter()
                    async with session.get(f"{stack.http.url}/livez") as resp:
                        assert resp.status == 200
                    latencies.append(time.perf_counter() - started)
                    await asyncio.sleep(0.01)
            out, _ = await asyncio.wait_for(loader.communicate(), 60)
        finally:
            if loader.returncode is None:
                loader.kill()
                await loader.wait()
        counts = {int(k): v for k, v in json.loads(out).items()}
        assert set(counts) <= {400, 413} and sum(counts.values()) >= 4, counts
        assert len(latencies) >= 20
        worst, median = max(latencies), statistics.median(latencies)
        print(f"livez under load: {len(latencies)} probes, median {median * 1e3:.1f} ms, max {worst * 1e3:.1f} ms")
        assert median < 0.1 and worst < 2.0, (median, worst)  # one stall of this shared host is not the frontend
        assert stack.llumlets["i-1"].added == []
        assert_clean(stack)


class _BigWordTokenizer(SimTokenizer):
    """Each generated token reads as 512 KiB of text, so a stream fills a non-reading client's socket quickly."""

    def word(self, token_id: int) -> str:
        return "x" * (512 << 10) if token_id >= self.NUM_SPECIAL else ""


# (idle_timeout, request_timeout): the idle timeout bounds a send to a client that reads nothing; so does the request's
# deadline, also with the idle timeout off (before, the deadline ended and aborted the request but the handler stayed
# in its send, holding the slot until TCP gave up).
NOT_READING_LIMITS = [(1.0, None), (None, 1.0)]


async def wait_inflight_zero(stack: Stack, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.frontend.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("idle_timeout", "request_timeout"), NOT_READING_LIMITS)
async def test_a_client_that_stops_reading_is_dropped_and_its_request_aborted(
    idle_timeout: float | None, request_timeout: float | None
) -> None:
    """500 never-reading streams held every slot: a stream whose client takes nothing for the idle timeout (or past
    the request's deadline) is dropped, its request aborted on the instance and its slot freed, although the instance
    keeps producing."""
    llumlet = FakeLlumlet("i-1", delay=0.05, messy=False)
    async with running_stack(
        [llumlet], tokenizer=_BigWordTokenizer(), idle_timeout=idle_timeout, request_timeout=request_timeout
    ) as stack:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.http.port))
        _, writer = await asyncio.open_connection(sock=sock)
        body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True}).encode()
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        try:
            # Never read: 200 tokens at 50 ms would take 10 s; the abort must come well before the end.
            await asyncio.wait_for(llumlet.aborted_event.wait(), 8)
            assert llumlet.aborted == [llumlet.added[0].request_id]
            await wait_inflight_zero(stack)
            assert_clean(stack)
        finally:
            writer.close()


@pytest.mark.parametrize(("idle_timeout", "request_timeout"), NOT_READING_LIMITS)
async def test_a_grpc_client_that_stops_reading_is_dropped_and_its_request_aborted(
    idle_timeout: float | None, request_timeout: float | None
) -> None:
    llumlet = FakeLlumlet("i-1", delay=0.05, messy=False)
    big = _BigWordTokenizer()
    async with (
        running_stack([llumlet], tokenizer=big, idle_timeout=idle_timeout, request_timeout=request_timeout) as stack,
        grpc.aio.insecure_channel(stack.grpc.address) as channel,
    ):
        call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
            frontend_pb2.GenerateRequest(text="a", sampling=common_pb2.SamplingParams(max_tokens=200)), timeout=30
        )
        # Never read: 200 tokens at 50 ms would take 10 s; the abort must come well before the end.
        await asyncio.wait_for(llumlet.aborted_event.wait(), 8)
        assert llumlet.aborted == [llumlet.added[0].request_id]
        await wait_inflight_zero(stack)
        assert_clean(stack)
        call.cancel()


def _rejected(stack: Stack, code: str) -> float:
    return float(stack.frontend.metrics.rejected.labels(code)._value.get())


async def test_schema_refusals_are_counted_and_unplaced_prompts_are_not() -> None:
    """``llumnix_frontend_rejected_requests`` counts a request the HTTP schema refuses (it used to count only what
    ``submit`` refused), and ``prompt_tokens`` counts only prompts that reached an instance (it used to count them
    before placement)."""
    full = [FakeLlumlet("i-1", refuse=10, refuse_code=grpc.StatusCode.FAILED_PRECONDITION)]
    async with running_stack(full) as stack:
        prompt_tokens = stack.frontend.metrics.prompt_tokens
        status, _, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -1}
        )
        assert status == 400 and assert_openai_error(payload)["param"] == "max_tokens"
        assert _rejected(stack, "INVALID_ARGUMENT") == 1
        status, _, payload = await post(f"{stack.http.url}/v1/completions", b"{not json")
        assert status == 400 and _rejected(stack, "INVALID_ARGUMENT") == 2
        status, _, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
        )
        assert status == 503, payload  # every instance refused: placement failed
        assert _rejected(stack, "UNAVAILABLE") == 1
        assert prompt_tokens._value.get() == 0, "a prompt that was never placed is not counted"
        assert_clean(stack)
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        status, _, payload = await post(
            f"{stack.http.url}/v1/completions", {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
        )
        assert status == 200, payload
        assert stack.frontend.metrics.prompt_tokens._value.get() == payload["usage"]["prompt_tokens"] > 0


async def test_a_llumlet_restarted_on_the_same_port_is_reached_at_once() -> None:
    """The frontend's cached channel to a llumlet that went away sits in gRPC's reconnect backoff (1 s, growing to
    120 s by default), failing calls at once with UNAVAILABLE: a llumlet restarted on the same port was refused for
    seconds (the drill saw it). Now an UNAVAILABLE drops the channel, so the first request after the restart lands."""
    first = FakeLlumlet("i-1", messy=False)
    async with running_stack([first], call_timeout=1.0) as stack:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
        status, _, payload = await post(f"{stack.http.url}/v1/completions", body)
        assert status == 200, (payload, len(first.added), first.push_failures)
        address = stack.book.addresses["i-1"]
        port = int(address.rsplit(":", 1)[1])
        for server in stack.servers:
            await server.stop(None)
        stack.servers.clear()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # refused while it is down: the backoff of a kept channel would grow
            status, headers, payload = await post(f"{stack.http.url}/v1/completions", body)
            assert status == 503 and "Retry-After" in headers, payload
            await asyncio.sleep(0.2)
        restarted = FakeLlumlet("i-1", messy=False)
        stack.servers.append(await start_llumlet_on(restarted, port))
        stack.llumlets["i-1"] = restarted
        status, _, payload = await post(f"{stack.http.url}/v1/completions", body)
        assert status == 200, payload
        assert len(restarted.added) == 1
        assert stack.frontend.channels.discarded >= 1
        assert_clean(stack)


async def test_one_llumlet_stub_per_channel() -> None:
    """AddRequest runs once per request: its stub (a callable per method of the service, built on construction) is
    kept with its channel and replaced with it (old: a new stub per call)."""
    from pyllumnix.control_plane.frontend.channels import ChannelPool

    pool = ChannelPool()
    try:
        stub = pool.llumlet("127.0.0.1:1")
        assert pool.llumlet("127.0.0.1:1") is stub
        assert pool.llumlet("127.0.0.1:2") is not stub
        pool.discard("127.0.0.1:1")
        assert pool.llumlet("127.0.0.1:1") is not stub, "a discarded channel's stub goes with it"
    finally:
        await pool.close()
