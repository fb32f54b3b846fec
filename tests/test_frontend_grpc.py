"""gRPC Generate/Abort, dispatch retries, leader redirects and bypass fallback, and aborts following a migration."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pyllumnix.control_plane.frontend.dispatch import Placement
from pyllumnix.control_plane.frontend.routing import (
    BypassDispatcher,
    FallbackDispatcher,
    LeaderDispatcher,
    StaticRegistrySource,
)
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from tests.test_frontend_fakes import (
    MAX_MODEL_LEN,
    TOKENIZER,
    FakeLlumlet,
    FakeScheduler,
    expected_text,
    running_stack,
    start_llumlet,
    start_scheduler,
    token,
)


def generate_request(text: str = "Hello", max_tokens: int = 5, **kwargs: object) -> frontend_pb2.GenerateRequest:
    return frontend_pb2.GenerateRequest(
        text=text,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
        **kwargs,  # type: ignore[arg-type]
    )


async def collect(address: str, request: frontend_pb2.GenerateRequest) -> list[frontend_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [r async for r in frontend_pb2_grpc.FrontendServiceStub(channel).Generate(request, timeout=10)]


async def test_generate_streams_deduplicated_tokens() -> None:
    async with running_stack([FakeLlumlet("i-1", delay=0.001)]) as stack:
        replies = await collect(stack.grpc.address, generate_request(max_tokens=6, request_id="g-1"))
        ids = [t for r in replies for t in r.token_ids]
        assert ids == [token(i) for i in range(6)]
        assert "".join(r.text for r in replies) == expected_text(6)
        index = 0
        for r in replies:
            assert r.first_token_index == index and r.request_id == "g-1" and r.instance_id == "i-1"
            index += len(r.token_ids)
        last = replies[-1]
        assert last.finished and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(TOKENIZER.encode("Hello")) and last.usage.completion_tokens == 6
        assert not any(r.finished for r in replies[:-1])


async def test_generate_from_token_ids() -> None:
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        request = frontend_pb2.GenerateRequest(
            token_ids=frontend_pb2.TokenIds(ids=[5, 6, 7]), sampling=common_pb2.SamplingParams(max_tokens=2)
        )
        replies = await collect(stack.grpc.address, request)
        assert replies[-1].usage.prompt_tokens == 3
        assert list(stack.llumlets["i-1"].added[0].prompt_token_ids) == [5, 6, 7]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (generate_request(text=""), grpc.StatusCode.INVALID_ARGUMENT),
        (generate_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
        (generate_request(max_tokens=MAX_MODEL_LEN), grpc.StatusCode.INVALID_ARGUMENT),
        (generate_request(model="other"), grpc.StatusCode.NOT_FOUND),
        # A priority the proto does not define is refused, not silently scheduled as high.
        (generate_request(priority=7), grpc.StatusCode.INVALID_ARGUMENT),
        (
            frontend_pb2.GenerateRequest(text="a", sampling=common_pb2.SamplingParams(max_tokens=1, temperature=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            frontend_pb2.GenerateRequest(text="a", sampling=common_pb2.SamplingParams(max_tokens=1, top_p=1.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # OpenAI's range, as over HTTP: vLLM refuses more, after a dispatch (before: accepted up to 100)
        (
            frontend_pb2.GenerateRequest(text="a", sampling=common_pb2.SamplingParams(max_tokens=1, temperature=2.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
async def test_generate_validation(request_: frontend_pb2.GenerateRequest, code: grpc.StatusCode) -> None:
    async with running_stack([FakeLlumlet("i-1")]) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.grpc.address, request_)
        assert info.value.code() == code
        assert stack.llumlets["i-1"].added == []


async def test_request_id_reuse_is_already_exists() -> None:
    async with running_stack([FakeLlumlet("i-1", delay=0.02, tokens=100)]) as stack:
        first = asyncio.create_task(collect(stack.grpc.address, generate_request(max_tokens=100, request_id="dup")))
        while not stack.llumlets["i-1"].added:
            await asyncio.sleep(0.005)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.grpc.address, generate_request(request_id="dup"))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        first.cancel()


async def test_cancelling_generate_aborts_on_the_llumlet_and_abort_rpc() -> None:
    async with running_stack([FakeLlumlet("i-1", delay=0.02, tokens=200)]) as stack:
        llumlet = stack.llumlets["i-1"]
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            stub = frontend_pb2_grpc.FrontendServiceStub(channel)
            call = stub.Generate(generate_request(max_tokens=200, request_id="c-1"))
            await call.read()
            call.cancel()
            await asyncio.wait_for(llumlet.aborted_event.wait(), 5)
            assert llumlet.aborted == ["c-1"]

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Abort(frontend_pb2.AbortRequest(request_id="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            call = stub.Generate(generate_request(max_tokens=200, request_id="c-2"))
            await call.read()
            await stub.Abort(frontend_pb2.AbortRequest(request_id="c-2"))
            replies = []
            while (reply := await call.read()) is not grpc.aio.EOF:
                replies.append(reply)
            assert replies[-1].finished and replies[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        for _ in range(200):
            if "c-2" in llumlet.aborted:
                break
            await asyncio.sleep(0.01)
        assert llumlet.aborted == ["c-1", "c-2"]


async def test_add_refused_by_a_draining_instance_is_dispatched_again() -> None:
    async with running_stack([FakeLlumlet("i-1", refuse=1), FakeLlumlet("i-2")]) as stack:
        replies = await collect(stack.grpc.address, generate_request(max_tokens=3))
        assert replies[-1].instance_id == "i-2" and replies[-1].usage.completion_tokens == 3
        assert stack.llumlets["i-1"].added == [] and len(stack.llumlets["i-2"].added) == 1


async def test_instance_lost_error_is_surfaced() -> None:
    async with running_stack([FakeLlumlet("i-1", fail_after=2)]) as stack:
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(generate_request(max_tokens=10))
            replies = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for r in call:
                    replies.append(r)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "instance i-1 lost" in (info.value.details() or "")
        assert replies[-1].finished and replies[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert sum(len(r.token_ids) for r in replies) == 2


async def test_outputs_after_a_migration_and_abort_goes_to_the_destination() -> None:
    source, destination = FakeLlumlet("src", tokens=0), FakeLlumlet("dst")
    async with running_stack([source]) as stack:
        await stack.add_llumlet(destination)
        async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
            call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
                generate_request(max_tokens=50, request_id="m")
            )
            while not source.added:
                await asyncio.sleep(0.005)
            sink = stack.frontend.sink_address

            def output(first: int, n: int, instance: str) -> common_pb2.RequestOutput:
                ids = [token(i) for i in range(first, first + n)]
                return common_pb2.RequestOutput(
                    request_id="m", token_ids=ids, first_token_index=first, instance_id=instance
                )

            await source.push(sink, [output(0, 3, "src")])
            await destination.push(sink, [output(2, 3, "dst")])  # overlaps the source's last token
            await source.push(sink, [output(1, 2, "src")])  # a late re-send from the source
            got: list[int] = []
            instances = []
            while len(got) < 5:
                reply = await call.read()
                assert isinstance(reply, frontend_pb2.GenerateResponse)
                got.extend(reply.token_ids)
                instances.append(reply.instance_id)
            assert got == [token(i) for i in range(5)] and instances == ["src", "dst"]
            call.cancel()
            await asyncio.wait_for(destination.aborted_event.wait(), 5)
        assert destination.aborted == ["m"] and source.aborted == []


async def test_leader_redirect_is_followed() -> None:
    llumlet = FakeLlumlet("i-1")
    llumlet_server = await start_llumlet(llumlet)
    leader = FakeScheduler(placement=Placement("i-1", llumlet_server.address))
    leader_server = await start_scheduler(leader)
    follower = FakeScheduler(leader=leader_server.address)
    follower_server = await start_scheduler(follower)
    dispatcher = LeaderDispatcher([follower_server.address], timeout=2.0)
    try:
        async with running_stack([], dispatcher=dispatcher) as stack:
            request = generate_request(max_tokens=3, priority=common_pb2.PRIORITY_HIGH)
            replies = await collect(stack.grpc.address, request)
            assert replies[-1].usage.completion_tokens == 3 and replies[-1].instance_id == "i-1"
            assert len(follower.calls) == 1 and len(leader.calls) == 1
            assert leader.calls[0].priority == common_pb2.PRIORITY_HIGH and leader.calls[0].max_tokens == 3
            await collect(stack.grpc.address, generate_request(max_tokens=1))
            assert len(follower.calls) == 1 and len(leader.calls) == 2  # the known leader is asked first
    finally:
        await dispatcher.close()
        await llumlet.close()
        for server in (llumlet_server, leader_server, follower_server):
            await server.stop(None)


async def test_bypass_when_no_leader_answers_and_release_balances() -> None:
    follower = FakeScheduler(leader="")  # a follower that does not know the leader
    follower_server = await start_scheduler(follower)
    llumlets = [FakeLlumlet("a", delay=0.02, tokens=100), FakeLlumlet("b", delay=0.02, tokens=100)]
    leader = LeaderDispatcher([follower_server.address], timeout=0.3)
    try:
        async with running_stack(llumlets) as stack:
            infos = [common_pb2.InstanceInfo(instance_id=i, grpc_address=a) for i, a in stack.book.addresses.items()]
            bypass = BypassDispatcher(StaticRegistrySource(infos))
            stack.frontend.dispatcher = FallbackDispatcher(leader, bypass, leader_timeout=0.3)
            tasks = [
                asyncio.create_task(collect(stack.grpc.address, generate_request(max_tokens=100))) for _ in range(4)
            ]
            while sum(len(x.added) for x in llumlets) < 4:
                await asyncio.sleep(0.01)
            assert [len(x.added) for x in llumlets] == [2, 2]  # fewest in-flight requests first
            assert follower.calls
            for task in tasks:
                task.cancel()
            for _ in range(200):
                if not bypass.in_flight:
                    break
                await asyncio.sleep(0.01)
            assert bypass.in_flight == {}  # every dispatch was released when its request ended
    finally:
        await leader.close()
        await follower_server.stop(None)


async def test_no_capacity_is_unavailable() -> None:
    async with running_stack([], dispatcher=BypassDispatcher(StaticRegistrySource())) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stack.grpc.address, generate_request())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
