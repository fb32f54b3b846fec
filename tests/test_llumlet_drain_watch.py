"""The drain watcher (``llumnix llumlet`` exits once draining and empty) costs an idle llumlet nothing: it sleeps
until the instance's state changes instead of polling 5 times a second."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.main import exit_when_drained
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2


class Coordinator:
    busy = False


async def test_an_active_llumlet_is_not_polled_and_a_drained_one_stops() -> None:
    llumlet = Llumlet(SimEngine("tiny", payload=False), "i-1")
    stop = asyncio.Event()
    polls = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float, *args: Any) -> Any:
        nonlocal polls
        polls += 1
        return await real_sleep(delay, *args)

    asyncio.sleep = counting_sleep  # type: ignore[assignment]
    try:
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id="r", prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(max_tokens=2)
            )
        )
        watcher = asyncio.get_running_loop().create_task(exit_when_drained(llumlet, cast(Any, Coordinator()), stop))
        await real_sleep(0.7)
        assert polls == 0, f"{polls} polls of an active llumlet in 0.7 s (before: one every 0.2 s)"
        llumlet.state = InstanceState.CORDONED
        await real_sleep(0.3)
        assert polls == 0 and not stop.is_set()
        llumlet.state = InstanceState.DRAINING
        await real_sleep(1.0)
        assert polls > 0 and not stop.is_set(), "draining but still holding a request"
        await llumlet.abort_request("r")
        await asyncio.wait_for(stop.wait(), 5)
        await asyncio.wait_for(watcher, 5)
    finally:
        asyncio.sleep = real_sleep
