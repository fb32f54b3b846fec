"""A failing engine step fails the requests of that step with a clear error and the llumlet keeps serving."""

from __future__ import annotations

import asyncio

from pyllumnix.data_plane.engine.base import StepResult
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.protos.llumnix.v1 import common_pb2
from pyllumnix.tools.recording_sink import RecordingSink


def request(rid: str, sink: RecordingSink) -> common_pb2.EngineRequest:
    assert sink.server is not None
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=[1, 2, 3, 4],
        sampling=common_pb2.SamplingParams(max_tokens=20, seed=1, ignore_eos=True),
        frontend_address=sink.server.address,
    )


async def test_engine_exception_fails_the_step_requests_and_serving_goes_on(sink: RecordingSink) -> None:
    engine = SimEngine("tiny")
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step(now: float) -> StepResult:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("kernel exploded")
        return real_step(now)

    engine.step = flaky_step  # type: ignore[method-assign]
    llumlet = Llumlet(engine, "i")
    llumlet.start()
    try:
        await llumlet.add_request(request("doomed", sink))
        outs = await sink.wait("doomed", timeout=10)
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "kernel exploded" in outs[-1].error
        assert llumlet.stats.step_errors == 1
        assert engine.load().free_blocks == engine.total_blocks
        await llumlet.add_request(request("after", sink))
        outs = await sink.wait("after", timeout=10)
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(sink.tokens("after")) == 20
    finally:
        await llumlet.stop()
        await asyncio.sleep(0)
