"""A client that reuses a request id after its first request ended gets a served request, not an error.

A llumlet keeps a tombstone for an abort of an id it does not hold (``late_adds``: the abort may have overtaken its
AddRequest) and refuses the next AddRequest of that id (ABORTED). Such aborts also reach a llumlet for requests that
already left it (finished or migrated out just before the client's abort arrived), so a client reusing the id within
the tombstone's 60 s had its new request refused: the frontend answered INTERNAL ("ABORTED ... was aborted before it
arrived"). The frontend never aborts a request on an instance whose add it still awaits, so an ABORTED answer to a
live request is an earlier request's tombstone, which the refusal took: the frontend places the request again.
A duplicate *live* id is still refused (ALREADY_EXISTS).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.control_plane.frontend.dispatch import Placement
from pyllumnix.control_plane.frontend.service import FrontendGrpc, start_grpc
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc
from tests.test_frontend_fakes import MAX_MODEL_LEN, MODEL, TOKENIZER, StaticDispatcher

TIMEOUT_S = 20.0


@dataclass
class Cluster:
    llumlet: Llumlet
    servicer: LlumletServicer
    llumlet_server: RunningServer
    frontend: Frontend
    frontend_grpc: FrontendGrpc


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A real llumlet (simulated engine, tombstones and all) behind a real frontend."""
    llumlet = Llumlet(SimEngine("tiny"), "i-reuse")
    servicer = LlumletServicer(llumlet)
    server = await start_server([(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, SERVICE_NAME)])
    llumlet.start()
    frontend = Frontend(
        model=MODEL,
        max_model_len=MAX_MODEL_LEN,
        tokenizer=TOKENIZER,
        dispatcher=StaticDispatcher([Placement("i-reuse", server.address)]),
    )
    frontend_grpc = await start_grpc(frontend)
    try:
        yield Cluster(llumlet, servicer, server, frontend, frontend_grpc)
    finally:
        await frontend_grpc.stop(None)
        await frontend.close()
        await llumlet.stop()
        await server.stop(None)


async def generate(cluster: Cluster, request_id: str, max_tokens: int = 4) -> list[frontend_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(cluster.frontend_grpc.address) as channel:
        call = frontend_pb2_grpc.FrontendServiceStub(channel).Generate(
            frontend_pb2.GenerateRequest(
                request_id=request_id, text="a b c", sampling=common_pb2.SamplingParams(max_tokens=max_tokens)
            ),
            timeout=TIMEOUT_S,
        )
        return [reply async for reply in call]


async def late_abort(cluster: Cluster, request_id: str) -> None:
    """An abort of ``request_id`` reaching the llumlet after the request left it (as a client's abort racing the
    request's end or its migration does): NOT_FOUND, and it leaves a tombstone."""
    async with grpc.aio.insecure_channel(cluster.llumlet_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await llumlet_pb2_grpc.LlumletServiceStub(channel).AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id=request_id), timeout=TIMEOUT_S
            )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert request_id in cluster.servicer.tombstones


async def test_an_id_reused_after_its_request_ended_is_served(cluster: Cluster) -> None:
    """Old behaviour: the second request failed, INTERNAL ("ABORTED request job-1 was aborted before it arrived")."""
    first = await generate(cluster, "job-1")
    assert first[-1].finished and first[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    await late_abort(cluster, "job-1")
    again = await generate(cluster, "job-1")
    assert again[-1].finished and again[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in again) == 4, "every token of the reused id's request, once"
    assert "job-1" not in cluster.servicer.tombstones, "the refusal took the tombstone"
    assert cluster.servicer.late_adds_refused == 1, "the llumlet still refused the add it was told was aborted"
    assert cluster.llumlet.engine.request_ids() == [], "nothing left behind on the instance"


async def test_a_duplicate_live_id_is_still_refused(cluster: Cluster) -> None:
    """Reuse while the first request runs stays a clear ALREADY_EXISTS (HTTP 409), before any instance is asked."""
    async with grpc.aio.insecure_channel(cluster.frontend_grpc.address) as channel:
        stub = frontend_pb2_grpc.FrontendServiceStub(channel)
        long = stub.Generate(
            frontend_pb2.GenerateRequest(
                request_id="job-2", text="a", sampling=common_pb2.SamplingParams(max_tokens=200)
            ),
            timeout=TIMEOUT_S,
        )
        await long.read()  # it runs
        with pytest.raises(grpc.aio.AioRpcError) as err:
            dup = stub.Generate(
                frontend_pb2.GenerateRequest(
                    request_id="job-2", text="a", sampling=common_pb2.SamplingParams(max_tokens=2)
                ),
                timeout=TIMEOUT_S,
            )
            await dup.read()
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        long.cancel()
