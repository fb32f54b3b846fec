"""A full waiting queue refuses AddRequest with RESOURCE_EXHAUSTED; every request that ends on the llumlet for a
reason other than finishing (client abort, shutdown) ends with a final output that says why."""

from __future__ import annotations

import grpc
import pytest

from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.infra.grpc_server import start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink


def engine_request(rid: str, sink: RecordingSink, max_tokens: int = 20) -> common_pb2.EngineRequest:
    assert sink.server is not None
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=[1, 2, 3, 4],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=1, ignore_eos=True),
        frontend_address=sink.server.address,
    )


async def test_a_full_waiting_queue_refuses_add_request_with_resource_exhausted(sink: RecordingSink) -> None:
    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "inst-q", max_waiting=2)  # not started: whatever is added keeps waiting
    server = await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, LlumletServicer(llumlet), SERVICE_NAME)]
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
            for rid in ("w0", "w1"):
                await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=engine_request(rid, sink)), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=engine_request("w2", sink)), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = err.value.details() or ""
            assert "inst-q" in details and "limit is 2" in details, details
            assert sorted(engine.request_ids()) == ["w0", "w1"], "the refused request left no trace"
            # once one leaves the queue, there is room again
            await stub.AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="w0"), timeout=5)
            await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=engine_request("w2", sink)), timeout=5)
    finally:
        await server.stop(None)
        await llumlet.stop()


async def test_client_abort_and_shutdown_end_requests_with_a_final_output_saying_why(sink: RecordingSink) -> None:
    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "inst-e")  # not started: the requests stay queued until they end
    await llumlet.add_request(engine_request("aborted", sink))
    await llumlet.add_request(engine_request("left-behind", sink))
    await llumlet.abort_request("aborted")
    outs = await sink.wait("aborted", timeout=10)
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert "aborted by its client" in outs[-1].error and "inst-e" in outs[-1].error

    await llumlet.stop()
    outs = await sink.wait("left-behind", timeout=10)
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "inst-e is shutting down" in outs[-1].error
    assert engine.load().free_blocks == engine.total_blocks
