"""Helpers for integration tests that run a whole cluster: find the leader, dispatch and add like a frontend does."""

from __future__ import annotations

import asyncio
import time

import grpc

from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)


async def leader_of(addresses: list[str], timeout: float = 10.0) -> admin_pb2.GetLeaderResponse:
    """The leader as the first reachable replica reports it, once one is elected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for address in addresses:
            try:
                async with grpc.aio.insecure_channel(address) as ch:
                    reply: admin_pb2.GetLeaderResponse = await admin_pb2_grpc.AdminServiceStub(ch).GetLeader(
                        admin_pb2.GetLeaderRequest(), timeout=1
                    )
                if reply.leader_address:
                    return reply
            except grpc.aio.AioRpcError:
                continue
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no leader among {addresses}")


async def list_instances(leader: str) -> list[scheduler_pb2.InstanceStatus]:
    async with grpc.aio.insecure_channel(leader) as ch:
        reply = await admin_pb2_grpc.AdminServiceStub(ch).ListInstances(admin_pb2.ListInstancesRequest(), timeout=2)
    return list(reply.instances)


async def submit(leader: str, request_id: str, sink: str, prompt_len: int, max_tokens: int, priority: int = 1) -> str:
    """Dispatch through the leader, then AddRequest on the chosen llumlet; returns the instance id."""
    async with grpc.aio.insecure_channel(leader) as ch:
        choice = await scheduler_pb2_grpc.SchedulerServiceStub(ch).Dispatch(
            scheduler_pb2.DispatchRequest(
                request_id=request_id,
                priority=priority,  # type: ignore[arg-type]
                num_prompt_tokens=prompt_len,
                max_tokens=max_tokens,
            ),
            timeout=2,
        )
    await add_request(choice.grpc_address, request_id, sink, prompt_len, max_tokens, priority)
    instance_id: str = choice.instance_id
    return instance_id


async def add_request(
    address: str, request_id: str, sink: str, prompt_len: int, max_tokens: int, priority: int = 1
) -> None:
    request = common_pb2.EngineRequest(
        request_id=request_id,
        prompt_token_ids=[(i * 7 + len(request_id)) % 200 + 1 for i in range(prompt_len)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=hash(request_id) % 1000, ignore_eos=True),
        priority=priority,  # type: ignore[arg-type]
        frontend_address=sink,
        arrival_time=time.time(),
    )
    async with grpc.aio.insecure_channel(address) as ch:
        await llumlet_pb2_grpc.LlumletServiceStub(ch).AddRequest(
            llumlet_pb2.AddRequestRequest(request=request), timeout=5
        )


async def get_load(address: str) -> common_pb2.InstanceLoad:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await llumlet_pb2_grpc.LlumletServiceStub(ch).GetLoad(llumlet_pb2.GetLoadRequest(), timeout=2)
    load: common_pb2.InstanceLoad = reply.load
    return load
