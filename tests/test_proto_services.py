"""Every v1 service round-trips through a real grpc.aio server with health checking and (asked for) reflection."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pyllumnix.infra.grpc_server import start_server
from pyllumnix.infra.security import runtime
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    config_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

LOAD = common_pb2.InstanceLoad(instance_id="i-1", seq=7, total_blocks=100, free_blocks=40, num_running=3)


class Scheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    async def Dispatch(self, request: scheduler_pb2.DispatchRequest, context: Any) -> scheduler_pb2.DispatchResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        return scheduler_pb2.DispatchResponse(instance_id=f"for-{request.request_id}", grpc_address="h:1")

    async def ReportLoad(
        self, request_iterator: AsyncIterator[scheduler_pb2.ReportLoadRequest], context: Any
    ) -> scheduler_pb2.ReportLoadResponse:
        n = 0
        async for report in request_iterator:
            assert report.load.instance_id == "i-1"
            n += 1
        return scheduler_pb2.ReportLoadResponse(reports_accepted=n)


class Llumlet(llumlet_pb2_grpc.LlumletServiceServicer):
    async def AddRequest(self, request: llumlet_pb2.AddRequestRequest, context: Any) -> llumlet_pb2.AddRequestResponse:
        return llumlet_pb2.AddRequestResponse(instance_id=request.request.request_id + "@i-1")

    async def StreamLoad(
        self, request: llumlet_pb2.StreamLoadRequest, context: Any
    ) -> AsyncIterator[llumlet_pb2.StreamLoadResponse]:
        for seq in range(3):
            load = common_pb2.InstanceLoad()
            load.CopyFrom(LOAD)
            load.seq = seq
            yield llumlet_pb2.StreamLoadResponse(load=load)

    async def PreAllocate(
        self, request: llumlet_pb2.PreAllocateRequest, context: Any
    ) -> llumlet_pb2.PreAllocateResponse:
        return llumlet_pb2.PreAllocateResponse(block_ids=list(range(request.num_blocks)), data_plane_address="dp")


class Frontend(frontend_pb2_grpc.FrontendServiceServicer):
    async def Generate(
        self, request: frontend_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[frontend_pb2.GenerateResponse]:
        for i, tok in enumerate(request.token_ids.ids):
            yield frontend_pb2.GenerateResponse(request_id=request.request_id, token_ids=[tok], first_token_index=i)


class Sink(frontend_pb2_grpc.OutputSinkServiceServicer):
    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: Any
    ) -> frontend_pb2.PushOutputsResponse:
        return frontend_pb2.PushOutputsResponse(unknown_request_ids=[o.request_id for o in request.outputs])


class Admin(admin_pb2_grpc.AdminServiceServicer):
    async def SetConfig(self, request: admin_pb2.SetConfigRequest, context: Any) -> admin_pb2.SetConfigResponse:
        return admin_pb2.SetConfigResponse(config=request.config, revision=request.expected_revision + 1)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    # Each fake implements only the calls it is asked here; the others keep the generated UNIMPLEMENTED answers.
    scheduler = Scheduler()  # type: ignore[abstract]
    llumlet = Llumlet()  # type: ignore[abstract]
    frontend = Frontend()  # type: ignore[abstract]
    admin = Admin()  # type: ignore[abstract]
    running = await start_server(
        [
            (scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, scheduler, "llumnix.v1.SchedulerService"),
            (llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, llumlet, "llumnix.v1.LlumletService"),
            (frontend_pb2_grpc.add_FrontendServiceServicer_to_server, frontend, "llumnix.v1.FrontendService"),
            (frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, Sink(), "llumnix.v1.OutputSinkService"),  # type: ignore[abstract]
            (admin_pb2_grpc.add_AdminServiceServicer_to_server, admin, "llumnix.v1.AdminService"),
        ],
        reflection_on=True,  # off by default (--reflection)
    )
    async with grpc.aio.insecure_channel(running.address) as ch:
        yield ch
    await running.stop(None)


SERVICES = [
    "llumnix.v1.SchedulerService",
    "llumnix.v1.LlumletService",
    "llumnix.v1.FrontendService",
    "llumnix.v1.OutputSinkService",
    "llumnix.v1.AdminService",
]


@pytest.mark.parametrize("service", SERVICES)
async def test_health_reports_serving(channel: grpc.aio.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2)
    names: set[str] = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    assert set(SERVICES) <= names
    assert "grpc.health.v1.Health" in names


async def listed_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2)
    names: set[str] = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    return names


async def test_reflection_is_never_served_on_a_public_port() -> None:
    """REVIEW18: ``--reflection`` also opened reflection on the frontend's public port, which has no role check (the
    role table allows reflection to admins only): the schema went to anyone who could connect."""
    settings = dataclasses.replace(runtime.INSECURE, reflection=True)
    binding = (frontend_pb2_grpc.add_FrontendServiceServicer_to_server, Frontend(), "llumnix.v1.FrontendService")  # type: ignore[abstract]
    local = grpc.LocalConnectionType.LOCAL_TCP
    public = await start_server([binding], security=settings, credentials=grpc.local_server_credentials(local))
    internal = await start_server([binding], security=settings)
    try:
        async with grpc.aio.secure_channel(public.address, grpc.local_channel_credentials(local)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await listed_services(ch)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(internal.address) as ch:
            assert "llumnix.v1.FrontendService" in await listed_services(ch)
    finally:
        await public.stop(None)
        await internal.stop(None)


async def test_scheduler_dispatch_and_report_load(channel: grpc.aio.Channel) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    reply = await stub.Dispatch(scheduler_pb2.DispatchRequest(request_id="r1", num_prompt_tokens=5), timeout=2)
    assert (reply.instance_id, reply.grpc_address) == ("for-r1", "h:1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Dispatch(scheduler_pb2.DispatchRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def reports() -> AsyncIterator[scheduler_pb2.ReportLoadRequest]:
        for _ in range(4):
            yield scheduler_pb2.ReportLoadRequest(load=LOAD)

    summary = await stub.ReportLoad(reports(), timeout=2)
    assert summary.reports_accepted == 4


async def test_llumlet_add_stream_and_preallocate(channel: grpc.aio.Channel) -> None:
    stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
    req = common_pb2.EngineRequest(
        request_id="r2", prompt_token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=4, seed=9)
    )
    reply = await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=req), timeout=2)
    assert reply.instance_id == "r2@i-1"
    seqs = [msg.load.seq async for msg in stub.StreamLoad(llumlet_pb2.StreamLoadRequest(interval_ms=1), timeout=2)]
    assert seqs == [0, 1, 2]
    pre = await stub.PreAllocate(llumlet_pb2.PreAllocateRequest(migration_id="m", num_blocks=3), timeout=2)
    assert list(pre.block_ids) == [0, 1, 2]


async def test_frontend_generate_streams(channel: grpc.aio.Channel) -> None:
    stub = frontend_pb2_grpc.FrontendServiceStub(channel)
    request = frontend_pb2.GenerateRequest(request_id="g", token_ids=frontend_pb2.TokenIds(ids=[5, 6, 7]))
    got = [(m.first_token_index, list(m.token_ids)) async for m in stub.Generate(request, timeout=2)]
    assert got == [(0, [5]), (1, [6]), (2, [7])]


async def test_output_sink_push(channel: grpc.aio.Channel) -> None:
    stub = frontend_pb2_grpc.OutputSinkServiceStub(channel)
    outputs = [common_pb2.RequestOutput(request_id="x", token_ids=[1], first_token_index=0)]
    reply = await stub.PushOutputs(frontend_pb2.PushOutputsRequest(instance_id="i", outputs=outputs), timeout=2)
    assert list(reply.unknown_request_ids) == ["x"]


async def test_admin_set_config_round_trips_nested_fields(channel: grpc.aio.Channel) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    config = config_pb2.ClusterConfig(
        migration=config_pb2.MigrationConfig(migrate_out_threshold=2.5, selection=common_pb2.MIGRATION_SELECTION_LR),
        dispatch=config_pb2.DispatchConfig(policy=config_pb2.DISPATCH_POLICY_INFAAS_PP),
    )
    request = admin_pb2.SetConfigRequest(config=config, expected_revision=41)
    request.update_mask.paths.append("migration.migrate_out_threshold")
    reply = await stub.SetConfig(request, timeout=2)
    assert reply.revision == 42
    assert reply.config == config
    assert reply.config.migration.HasField("migrate_out_threshold")
