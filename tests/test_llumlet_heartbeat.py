"""A request queued at a llumlet for longer than its frontend's idle timeout is not ended by it: the llumlet sends
token-less "still here" outputs for the requests it holds that produced nothing for ``heartbeat_s``.

Real Frontend (gRPC Generate, output sink) and a real Llumlet with a sim engine behind a real gRPC server; the
llumlet's step loop is held back (not started), so the request waits in its queue for as long as the test wants.
Before the heartbeats the frontend ended such a request after its idle timeout (DEADLINE_EXCEEDED "no output").
"""

from __future__ import annotations

import asyncio

import grpc

from pyllumnix.control_plane.frontend.dispatch import Placement
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.infra.grpc_server import start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_frontend_fakes import StaticDispatcher, running_stack

IDLE_TIMEOUT_S = 1.2  # heartbeats every 0.3 s: only a stall of ~0.9 s could end the queued request


async def test_a_request_queued_past_the_idle_timeout_is_kept_alive_and_then_served() -> None:
    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "inst-h", heartbeat_s=IDLE_TIMEOUT_S / 4)
    server = await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, LlumletServicer(llumlet), SERVICE_NAME)]
    )
    dispatcher = StaticDispatcher([Placement("inst-h", server.address)])
    try:
        async with running_stack([], dispatcher, idle_timeout=IDLE_TIMEOUT_S) as stack:
            llumlet.start_heartbeats()  # the step loop stays off: the request waits in the queue
            async with grpc.aio.insecure_channel(stack.grpc.address) as channel:
                call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
                    frontend_pb2.GenerateRequest(
                        text="a b c", sampling=common_pb2.SamplingParams(max_tokens=6, ignore_eos=True)
                    ),
                    timeout=30,
                )
                first = asyncio.ensure_future(call.read())
                await asyncio.sleep(4 * IDLE_TIMEOUT_S)
                assert not first.done(), "nothing ended the queued request"
                assert llumlet.heartbeats_sent >= 4
                [tracked] = stack.frontend.tracker.owned_by(None)
                assert not tracked.finished and not tracked.timed_out
                llumlet.start()  # now it runs
                replies = [await first]
                while not replies[-1].finished:
                    replies.append(await call.read())
                assert await call.code() == grpc.StatusCode.OK
            assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert sum(len(r.token_ids) for r in replies) == 6
            assert stack.frontend.metrics.timeouts._value.get() == 0
    finally:
        await server.stop(None)
        await llumlet.stop()
    assert engine.load().free_blocks == engine.total_blocks


async def test_heartbeats_go_only_to_silent_held_requests_with_their_capability(sink: RecordingSink) -> None:
    assert sink.server is not None
    llumlet = Llumlet(SimEngine("tiny"), "inst-h2", heartbeat_s=None)  # heartbeats sent by hand here
    for rid in ("q1", "q2"):
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id=rid,
                prompt_token_ids=[1, 2, 3],
                sampling=common_pb2.SamplingParams(max_tokens=4),
                frontend_address=sink.server.address,
                capability=f"cap-{rid}",
            )
        )
    try:
        assert await llumlet.send_heartbeats(60.0) == 0, "both just arrived: not silent yet"
        assert await llumlet.send_heartbeats(0.0) == 2
        await llumlet.pusher.flush(sink.server.address, timeout=5)
        for rid in ("q1", "q2"):
            [beat] = sink.outputs[rid]
            assert not beat.token_ids and not beat.finished and beat.first_token_index == 0
            assert beat.capability == f"cap-{rid}" and beat.instance_id == "inst-h2"
        assert await llumlet.send_heartbeats(60.0) == 0, "a heartbeat restarts the silence"
    finally:
        await llumlet.stop()
    assert llumlet._heartbeat_task is None, "heartbeat_s=None starts no heartbeat task"
