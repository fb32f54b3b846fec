"""Two llumlets as real processes with a real etcd: registration, serving over gRPC, lease expiry after SIGKILL."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from integration.cluster import dial, etcd_urls, harness_etcd_client
from integration.procs import Processes
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.registry import InstanceRegistry
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink

pytestmark = pytest.mark.integration


LONG_TOKENS = 400


def engine_request(rid: str, sink: str, prompt_len: int = 20, max_tokens: int = 16) -> common_pb2.EngineRequest:
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=list(range(1, prompt_len + 1)),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=7),
        frontend_address=sink,
    )


async def wait_for(predicate_coro: object, timeout: float, what: str) -> float:
    """Polls an async predicate until true; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await predicate_coro():  # type: ignore[operator]
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s")


async def test_two_llumlets_register_serve_and_expire(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    common = [
        "--etcd",
        ",".join(etcd_urls(etcd1)),
        "--cluster",
        etcd_cluster_name,
        "--profile",
        "tiny",
        "--transport",
        "tcp",
        "--lease-ttl",
        "1",
    ]
    a = procs.start("llumlet-a", "llumlet", "--instance-id", "a", *common)
    b = procs.start("llumlet-b", "llumlet", "--instance-id", "b", *common)
    client = harness_etcd_client(etcd_urls(etcd1))
    registry = InstanceRegistry(client, KeyLayout(etcd_cluster_name))
    try:
        snap = await registry.list()
        assert set(snap.entries) == {"a", "b"}
        info = common_pb2.InstanceInfo()
        info.ParseFromString(snap.entries["a"])
        assert info.grpc_address == a.address and info.data_plane_address and info.total_blocks > 0

        assert sink.server is not None
        async with dial(a.address) as ch_a, dial(b.address) as ch_b:
            stubs = [llumlet_pb2_grpc.LlumletServiceStub(ch_a), llumlet_pb2_grpc.LlumletServiceStub(ch_b)]
            for i in range(6):
                req = engine_request(f"r{i}", sink.server.address, max_tokens=10 + i)
                await stubs[i % 2].AddRequest(llumlet_pb2.AddRequestRequest(request=req), timeout=5)
            for i in range(6):
                outs = await sink.wait(f"r{i}")
                assert sink.raw_indices(f"r{i}") == list(range(10 + i)), "each token exactly once, in order"
                assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert {o.instance_id for o in outs} == {"a" if i % 2 == 0 else "b"}
            for stub in stubs:  # every block is back once all requests finished
                load = (await stub.GetLoad(llumlet_pb2.GetLoadRequest(), timeout=5)).load
                assert load.free_blocks == load.total_blocks and load.num_running == 0

            # bad input is refused with the right status and disturbs nothing
            # 400 tokens (~0.85 s on tiny): still in the engine for the duplicate below (the sim engine forgets a
            # finished id, and 40 tokens could end first on a loaded host)
            long_req = engine_request("long", sink.server.address, max_tokens=LONG_TOKENS)
            await stubs[0].AddRequest(llumlet_pb2.AddRequestRequest(request=long_req), timeout=5)
            bad = [
                (engine_request("long", sink.server.address), grpc.StatusCode.ALREADY_EXISTS),
                (
                    engine_request("big", sink.server.address, prompt_len=500, max_tokens=100),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (engine_request("zero", sink.server.address, max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
                (engine_request("neg", sink.server.address, max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT),
            ]
            for req, code in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stubs[0].AddRequest(llumlet_pb2.AddRequestRequest(request=req), timeout=5)
                assert err.value.code() == code, req.request_id
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stubs[0].AbortRequest(llumlet_pb2.AbortRequestRequest(request_id="nope"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await sink.wait("long")
            assert sink.raw_indices("long") == list(range(LONG_TOKENS))

        # SIGKILL: no deregistration, the lease (TTL 1 s) expires and the entry disappears
        b.kill()

        async def b_gone() -> bool:
            return "b" not in (await registry.list()).entries

        took = await wait_for(b_gone, 5.0, "b's registry entry expiring")
        assert took < 4.0
        assert "a" in (await registry.list()).entries
        # clean shutdown deregisters at once
        assert a.terminate() == 0
        assert "a" not in (await registry.list()).entries
    finally:
        await client.close()
