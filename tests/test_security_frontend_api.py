"""#13 attack: aborting someone else's request, and hostile client-chosen request ids, on the frontend's real HTTP
and gRPC servers with API keys.

Alice streams a request; Bob (another user key) tries to abort it over HTTP and gRPC and is refused (403 with an
OpenAI-style ``permission_error`` body / PERMISSION_DENIED) while Alice's stream goes on untouched; an admin key may
abort it. Request ids over 128 characters or with other characters than letters, digits and ``._:-`` are refused
(400). A caller's listing (``Frontend.requests_of``) shows only its own requests unless it is an admin. Before #13 any
caller could abort any request by id, and ids of any length and content were taken.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.control_plane.frontend.dispatch import Placement
from pyllumnix.control_plane.frontend.http import HttpServer, start_http
from pyllumnix.control_plane.frontend.requests import TrackedRequest
from pyllumnix.control_plane.frontend.service import FrontendGrpc, start_grpc
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKey, ApiKeyStore
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from tests.test_frontend_fakes import MAX_MODEL_LEN, MODEL, TOKENIZER, FakeLlumlet, StaticDispatcher, start_llumlet
from tests.test_infra_apikeys import FakeKV


@dataclass
class Served:
    frontend: Frontend
    http: HttpServer
    grpc: FrontendGrpc
    llumlet: FakeLlumlet
    keys: dict[str, str]
    records: dict[str, ApiKey]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


@contextlib.asynccontextmanager
async def served(**frontend_options: Any) -> AsyncIterator[Served]:
    """Alice and Bob (user keys) and root (admin) on a frontend over one fake llumlet; ``frontend_options`` go to
    ``Frontend``."""
    store = ApiKeyStore(FakeKV(), KeyLayout("c1"), cache_ttl=0.0)
    keys: dict[str, str] = {}
    records: dict[str, ApiKey] = {}
    for name, role in (("alice", "user"), ("bob", "user"), ("root", "admin")):
        keys[name], records[name] = await store.create(name, role)
    llumlet = FakeLlumlet("i-1", delay=0.02, tokens=200)
    llumlet_server = await start_llumlet(llumlet)
    frontend = Frontend(
        model=MODEL,
        max_model_len=MAX_MODEL_LEN,
        tokenizer=TOKENIZER,
        dispatcher=StaticDispatcher([Placement(llumlet.instance_id, llumlet_server.address)]),
        **frontend_options,
    )
    grpc_server = await start_grpc(frontend, api_keys=store)
    http_server = await start_http(frontend, api_keys=store)
    try:
        yield Served(frontend, http_server, grpc_server, llumlet, keys, records)
    finally:
        await http_server.stop()
        await grpc_server.stop(None)
        await frontend.close()
        await llumlet.close()
        await llumlet_server.stop(None)


async def grpc_abort(s: Served, who: str, request_id: str) -> None:
    async with grpc.aio.insecure_channel(s.grpc.address) as channel:
        await frontend_pb2_grpc.FrontendServiceStub(channel).Abort(
            frontend_pb2.AbortRequest(request_id=request_id),
            metadata=(("authorization", f"Bearer {s.keys[who]}"),),
            timeout=5,
        )


async def test_only_the_creator_or_an_admin_may_abort_a_request() -> None:
    async with served() as s, aiohttp.ClientSession() as session:
        url = s.http.url
        body = {"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True}
        headers = {**s.auth("alice"), "X-Request-Id": "alice-1"}
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as stream:
            assert stream.status == 200
            await stream.content.readline()
            tracked = s.frontend.tracker.get("alice-1")
            assert tracked is not None and tracked.owner_key_id == s.records["alice"].id
            # Bob, over HTTP and over gRPC: refused, and the request goes on.
            async with session.post(f"{url}/v1/requests/alice-1/abort", headers=s.auth("bob")) as resp:
                assert resp.status == 403
                error = (await resp.json())["error"]
                assert error["type"] == "permission_error"
                assert "created by another API key; API key 'bob' may not abort it" in error["message"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await grpc_abort(s, "bob", "alice-1")
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "created by another API key" in (info.value.details() or "")
            # No key at all: the middleware refuses before anything is looked up.
            async with session.post(f"{url}/v1/requests/alice-1/abort") as resp:
                assert resp.status == 401
            seen = tracked.num_received
            await asyncio.wait_for(_more_tokens(tracked, seen), 5)
            assert not tracked.finished and s.llumlet.aborted == []
            # Listings: a user sees its own requests, an admin every one.
            assert [r.request_id for r in s.frontend.requests_of(s.records["alice"])] == ["alice-1"]
            assert s.frontend.requests_of(s.records["bob"]) == []
            assert [r.request_id for r in s.frontend.requests_of(s.records["root"])] == ["alice-1"]
            # An admin may abort anyone's request.
            async with session.post(f"{url}/v1/requests/alice-1/abort", headers=s.auth("root")) as resp:
                assert resp.status == 200
            payload = (await stream.read()).decode()
        assert '"finish_reason": "abort"' in payload
        await asyncio.wait_for(s.llumlet.aborted_event.wait(), 5)
        assert s.llumlet.aborted == ["alice-1"]


async def test_a_second_authorization_entry_cannot_pose_as_another_key() -> None:
    """A1: gRPC metadata is a multimap. Bob sends a forged entry with Alice's key id first and his own valid key
    last: refused (UNAUTHENTICATED), and Alice's request goes on to its full length. Before the fix the interceptor
    verified the last entry and the servicer took the caller's identity from the first: Bob aborted Alice's request."""
    async with served() as s, aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "stream": True}
        headers = {**s.auth("alice"), "X-Request-Id": "alice-3"}
        async with session.post(f"{s.http.url}/v1/completions", json=body, headers=headers) as stream:
            assert stream.status == 200
            await stream.content.readline()
            forged_alice = f"llx_{s.records['alice'].id}_{'A' * 43}"
            async with grpc.aio.insecure_channel(s.grpc.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await frontend_pb2_grpc.FrontendServiceStub(channel).Abort(
                        frontend_pb2.AbortRequest(request_id="alice-3"),
                        metadata=(
                            ("authorization", f"Bearer {forged_alice}"),
                            ("authorization", f"Bearer {s.keys['bob']}"),
                        ),
                        timeout=5,
                    )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
            payload = (await stream.read()).decode()
        assert '"finish_reason": "length"' in payload and '"finish_reason": "abort"' not in payload
        assert s.llumlet.aborted == []


async def _more_tokens(tracked: TrackedRequest, seen: int) -> None:
    while tracked.num_received <= seen:
        await asyncio.sleep(0.01)


async def test_the_creator_aborts_its_own_request_over_grpc() -> None:
    async with served() as s, aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True}
        headers = {**s.auth("alice"), "X-Request-Id": "alice-2"}
        async with session.post(f"{s.http.url}/v1/completions", json=body, headers=headers) as stream:
            await stream.content.readline()
            await grpc_abort(s, "alice", "alice-2")
            payload = (await stream.read()).decode()
        assert '"finish_reason": "abort"' in payload


async def test_an_admin_key_aborts_anyones_request_over_grpc_too() -> None:
    """The servicer takes the caller from the key the interceptor verified, role included. Before, it parsed the
    metadata again and called every gRPC caller a user: an admin could abort others' requests over HTTP only."""
    async with served() as s, aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True}
        headers = {**s.auth("alice"), "X-Request-Id": "alice-4"}
        async with session.post(f"{s.http.url}/v1/completions", json=body, headers=headers) as stream:
            await stream.content.readline()
            await grpc_abort(s, "root", "alice-4")
            payload = (await stream.read()).decode()
        assert '"finish_reason": "abort"' in payload


async def test_a_request_made_over_grpc_belongs_to_the_verified_key() -> None:
    """Generate records the verified key as the owner (the servicer reads it from the call's task): Bob may not
    abort Alice's gRPC request, Alice may."""
    async with served() as s, grpc.aio.insecure_channel(s.grpc.address) as channel:
        stub = frontend_pb2_grpc.FrontendServiceStub(channel)
        call = stub.Generate(
            frontend_pb2.GenerateRequest(
                request_id="alice-5", text="a", sampling=common_pb2.SamplingParams(max_tokens=200)
            ),
            metadata=(("authorization", f"Bearer {s.keys['alice']}"),),
            timeout=30,
        )
        await call.read()
        tracked = s.frontend.tracker.get("alice-5")
        assert tracked is not None and tracked.owner_key_id == s.records["alice"].id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await grpc_abort(s, "bob", "alice-5")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await grpc_abort(s, "alice", "alice-5")
        last = await call.read()
        while last.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
            last = await call.read()
        assert last.finish_reason == common_pb2.FINISH_REASON_ABORT


@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        ("x" * 129, "request_id has 129 characters; at most 128 allowed"),
        ("bad id", "request_id may contain only letters, digits and . _ : -"),
        ("a/../b", "request_id may contain only"),
        ("é", "request_id may contain only"),
    ],
)
async def test_client_chosen_request_ids_are_limited(request_id: str, message: str) -> None:
    async with served() as s, aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 4}
        headers = {**s.auth("alice"), "X-Request-Id": request_id}
        async with session.post(f"{s.http.url}/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 400
            assert message in (await resp.json())["error"]["message"]
        assert s.llumlet.added == [], "a refused id reaches no instance"
        ok = {**s.auth("alice"), "X-Request-Id": "A-z_0.9:" + "x" * 120}
        async with session.post(f"{s.http.url}/v1/completions", json=body, headers=ok) as resp:
            assert resp.status == 200, await resp.text()
