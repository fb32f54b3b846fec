"""Client library: resign_leader (async and sync) reaches the leader through a follower's redirect."""

from __future__ import annotations

import asyncio

import pytest

from pyllumnix.clients.client import AsyncLlumnixClient, LlumnixClient
from pyllumnix.clients.errors import NoLeaderError
from tests.test_clients_fakes import Replica, serve_replica, stop_all


async def test_resign_leader_async_and_sync() -> None:
    s0, admin = await serve_replica(Replica("s-0", leader=True))
    s1, _ = await serve_replica(Replica("s-1", leader=False, leader_address=s0.address))
    s2, _ = await serve_replica(Replica("s-2", leader=False, leader_address=""))
    try:
        async with AsyncLlumnixClient(scheduler_endpoints=[s1.address]) as client:
            reply = await client.resign_leader()
        assert reply.resigned.replica_id == "s-0" and reply.hold_off_ms == 3000

        def sync_call() -> str:
            with LlumnixClient(scheduler_endpoints=[s1.address]) as c:
                return c.resign_leader().resigned.replica_id

        assert await asyncio.to_thread(sync_call) == "s-0"
        assert admin.resigned == 2
        async with AsyncLlumnixClient(scheduler_endpoints=[s2.address], timeout=2) as client:
            with pytest.raises(NoLeaderError):
                await client.resign_leader()
    finally:
        await stop_all([s0, s1, s2])
