"""Generate/Abort through frontends: streaming, collection, failover before start, and never a re-submitted request."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from pyllumnix.clients import AsyncLlumnixClient, InvalidArgumentError, LlumnixClient, NotFoundError, UnavailableError
from pyllumnix.clients.client import GenerationChunk, GenerationResult
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_clients_fakes import FakeFrontend, dead_address, serve_frontend


async def test_generate_streams_and_collects() -> None:
    fe = FakeFrontend("fe-a", migrate_at=2)
    server = await serve_frontend(fe)
    try:
        async with AsyncLlumnixClient(frontend_endpoints=server.address) as client:
            chunks = [c async for c in client.generate([1, 2, 3], max_tokens=3, seed=7, priority="high", stop="x")]
            assert [c.token_ids for c in chunks] == [(100,), (101,), (102,)]
            assert chunks[-1].finished and chunks[-1].finish_reason == "length"
            sent = fe.generate_calls[-1]
            assert sent.priority == common_pb2.PRIORITY_HIGH
            assert sent.sampling.seed == 7 and list(sent.sampling.stop) == ["x"]
            assert sent.request_id  # assigned by the client so it can abort it

            result = await client.generate_text("hi", max_tokens=4, request_id="r-text")
            assert result.request_id == "r-text"
            assert result.text == "t0 t1 t2 t3 "
            assert result.token_ids == [100, 101, 102, 103]
            assert result.finish_reason == "length"
            assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (2, 4)
            assert result.instances == ["i-1", "i-2"]
            with pytest.raises(InvalidArgumentError):
                await client.generate_text("hi", priority="urgent")
    finally:
        await server.stop(None)


def test_result_drops_duplicate_tokens_by_index() -> None:
    result = GenerationResult(request_id="r")
    for first, ids, text in ((0, (1, 2), "ab"), (1, (2,), "b"), (2, (3,), "c")):
        result.add(GenerationChunk("r", text, ids, first, False, None, None, "i-1"))
    assert result.token_ids == [1, 2, 3]
    assert result.text == "abc"


async def test_generate_fails_over_before_start_only() -> None:
    fe = FakeFrontend("fe-b")
    server = await serve_frontend(fe)
    try:
        async with AsyncLlumnixClient(frontend_endpoints=[dead_address(), server.address]) as client:
            result = await client.generate_text([5], max_tokens=2)
            assert result.token_ids == [100, 101]
            assert len(fe.generate_calls) == 1
    finally:
        await server.stop(None)


async def test_generate_not_resubmitted_after_it_started() -> None:
    broken = FakeFrontend("fe-broken", break_after=1)
    healthy = FakeFrontend("fe-ok")
    s_broken, s_ok = await serve_frontend(broken), await serve_frontend(healthy)
    try:
        async with AsyncLlumnixClient(frontend_endpoints=[s_broken.address, s_ok.address]) as client:
            got: list[GenerationChunk] = []
            with pytest.raises(UnavailableError) as err:
                async for chunk in client.generate([1], max_tokens=5):
                    got.append(chunk)
            assert err.value.may_have_started
            assert len(got) == 1
            assert len(broken.generate_calls) == 1
            assert healthy.generate_calls == []  # never re-sent elsewhere
    finally:
        await s_broken.stop(None)
        await s_ok.stop(None)


async def test_abort_and_early_exit_cancel() -> None:
    fe = FakeFrontend("fe-c")
    server = await serve_frontend(fe)
    try:
        async with AsyncLlumnixClient(frontend_endpoints=[server.address]) as client:
            # Long enough that the fake (1 ms per token) is still streaming when the client leaves, however slow
            # the machine: a stream that ended by itself would not be cancelled.
            stream = client.generate([1], max_tokens=1_000_000, request_id="long")
            first = await stream.__anext__()
            assert first.request_id == "long"
            await client.abort("long")
            assert fe.aborted == ["long"]
            await stream.aclose()  # leaving early cancels the call
            await asyncio.wait_for(fe.cancelled.wait(), 2)
            with pytest.raises(NotFoundError, match="unknown request"):
                await client.abort("never-seen")
    finally:
        await server.stop(None)


async def test_sync_client_generate_and_admin_errors() -> None:
    fe = FakeFrontend("fe-sync")
    server = await serve_frontend(fe)
    try:

        def use_sync() -> tuple[list[int], str]:
            with LlumnixClient(frontend_endpoints=[server.address], scheduler_endpoints=[dead_address()]) as client:
                ids = [t for c in client.generate([1, 2], max_tokens=3) for t in c.token_ids]
                assert client.generate_text("x", max_tokens=2).text == "t0 t1 "
                try:
                    client.list_instances()
                except UnavailableError as exc:
                    return ids, str(exc)
                raise AssertionError("expected UnavailableError")

        ids, message = await asyncio.to_thread(use_sync)
        assert ids == [100, 101, 102]
        assert "no scheduler reachable" in message
    finally:
        await server.stop(None)


def test_client_needs_some_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoints and no context file. The context path is this test's own: under pytest-xdist a worker may have run
    an integration module first, whose session fixture points $LLUMNIX_CONTEXT at a file a serve test wrote."""
    monkeypatch.setenv("LLUMNIX_CONTEXT", str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError):
        AsyncLlumnixClient()


async def test_stream_that_ends_before_a_finished_message_is_an_error() -> None:
    """Status OK without a finished message: the caller must not take the truncated output for the whole result."""
    fe = FakeFrontend("fe-short", end_after=2)
    server = await serve_frontend(fe)
    try:
        async with AsyncLlumnixClient(frontend_endpoints=[server.address]) as client:
            got: list[GenerationChunk] = []
            with pytest.raises(UnavailableError, match="ended before the request finished") as err:
                async for chunk in client.generate([1], max_tokens=5):
                    got.append(chunk)
            assert err.value.may_have_started
            assert [c.token_ids for c in got] == [(100,), (101,)]
            with pytest.raises(UnavailableError, match="ended before the request finished"):
                await client.generate_text("hi", max_tokens=5)

        def use_sync() -> None:
            with (
                LlumnixClient(frontend_endpoints=[server.address]) as client,
                pytest.raises(UnavailableError, match="ended before the request finished"),
            ):
                client.generate_text("hi", max_tokens=5)

        await asyncio.to_thread(use_sync)
        assert len(fe.generate_calls) == 3  # each request sent once, never re-sent
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("prompt", "arguments", "named"),
    [
        ([1], {"seed": 2**70}, "seed"),
        ([2**40], {}, "prompt"),
        (["x"], {}, "prompt"),
        ([1], {"temperature": "x"}, "temperature"),
        ([1], {"max_tokens": 2**40}, "max_tokens"),
        ([1], {"stop_token_ids": [2**40]}, "stop_token_ids"),
        ([1], {"top_k": 1.5}, "top_k"),
    ],
)
async def test_out_of_range_generation_arguments_are_invalid_argument(
    prompt: list[object], arguments: dict[str, object], named: str
) -> None:
    """Checked before any connection: the dead frontend is never tried."""
    async with AsyncLlumnixClient(frontend_endpoints=[dead_address()]) as client:
        with pytest.raises(InvalidArgumentError, match=f"invalid {named}"):
            await client.generate_text(prompt, **arguments)  # type: ignore[arg-type]
    with (
        LlumnixClient(frontend_endpoints=[dead_address()]) as sync_client,
        pytest.raises(InvalidArgumentError, match=f"invalid {named}"),
    ):
        sync_client.generate_text(prompt, **arguments)  # type: ignore[arg-type]


def test_a_client_from_serves_context_checks_each_servers_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A context written by ``llumnix serve`` holds the cluster CA: the frontend pool checks its servers for the
    frontend's role name, the scheduler pool for the scheduler's (was: the host only, so another component's
    certificate on that host passed, and got the API key). An explicit server name in the context is kept."""
    from pyllumnix.infra.security.bootstrap import bootstrap_local
    from pyllumnix.infra.security.context import ClientContext, save_context

    pki = bootstrap_local(tmp_path / "pki", "c1")
    admin = pki.ensure("admin", "admin")
    path = tmp_path / "context.yaml"
    monkeypatch.setenv("LLUMNIX_CONTEXT", str(path))
    ctx = ClientContext("c1", scheduler=["127.0.0.1:1"], frontend=["127.0.0.1:2"], ca=admin.ca, cert=admin.cert,
                        key=admin.key)  # fmt: skip
    save_context(ctx, path)
    client = AsyncLlumnixClient()
    assert client._frontends is not None and client._schedulers is not None
    assert client._frontends.tls is not None and client._schedulers.tls is not None
    assert client._frontends.tls.server_name_override == "frontend.llumnix.invalid"
    assert client._schedulers.tls.server_name_override == "scheduler.llumnix.invalid"
    save_context(dataclasses.replace(ctx, server_name="lb.example"), path)
    kept = AsyncLlumnixClient()
    assert kept._frontends is not None and kept._frontends.tls is not None
    assert kept._frontends.tls.server_name_override == "lb.example"
    # A hand-written context for a load balancer (a CA, an API key, no client certificate of the cluster): the host.
    save_context(dataclasses.replace(ctx, cert=None, key=None, api_key="llx_" + "0" * 16 + "_" + "A" * 43), path)
    balanced = AsyncLlumnixClient()
    assert balanced._frontends is not None and balanced._frontends.tls is not None
    assert balanced._frontends.tls.server_name_override is None
