"""A llumlet's instance state over gRPC: SetInstanceState takes only the states an order may set, the load report
and the answer carry it, and a non-active instance refuses new requests naming its state."""

from __future__ import annotations

import grpc
import pytest

from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import make_node, request


@pytest.mark.parametrize("state", [common_pb2.INSTANCE_STATE_UNSPECIFIED, common_pb2.INSTANCE_STATE_STARTING, 99])
async def test_set_instance_state_refuses_what_an_order_cannot_set(state: int) -> None:
    node = await make_node("a")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.stub.SetInstanceState(llumlet_pb2.SetInstanceStateRequest(state=state))  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert node.llumlet.state is InstanceState.ACTIVE
    finally:
        await node.close()


async def test_cordoned_llumlet_reports_its_state_and_refuses_requests(sink: RecordingSink) -> None:
    node = await make_node("a")
    try:
        cordon = llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_CORDONED)
        reply = await node.stub.SetInstanceState(cordon)
        assert reply.state == common_pb2.INSTANCE_STATE_CORDONED
        assert node.llumlet.state is InstanceState.CORDONED
        load = (await node.stub.GetLoad(llumlet_pb2.GetLoadRequest())).load
        assert load.state == common_pb2.INSTANCE_STATE_CORDONED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.stub.AddRequest(request("r", sink, 8, 4))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "instance a is CORDONED" in (info.value.details() or "")
        active = llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_ACTIVE)
        await node.stub.SetInstanceState(active)
        await node.stub.AddRequest(request("r", sink, 8, 4))
    finally:
        await node.close()
