"""#17 end to end in a live migration: the coordinator's chunk buffers as torch tensors on the engine's KV device,
filled and drained through the engines' asynchronous hooks, over the in-process, TCP and UCX transports; KV layouts
that differ refused at the first pre-allocation with nothing reserved; a transport that cannot carry the chunks'
memory refused when the coordinator is made. On this CPU-only host the "device" is ``cpu`` (torch tensors); CUDA
itself is exercised by integration/gpu_check.sh.

Two real llumlets (real gRPC servers, sim engines with payload); the destination verifies every incoming KV block
against its deterministic content before installing (``verify_incoming``), so a commit proves the bytes arrived."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

torch = pytest.importorskip("torch")

from pyllumnix.data_plane.engine.device import Ready  # noqa: E402
from pyllumnix.data_plane.engine.kv_layout import KvLayout  # noqa: E402
from pyllumnix.data_plane.engine.sim import SimEngine  # noqa: E402
from pyllumnix.data_plane.llumlet.llumlet import Llumlet  # noqa: E402
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator, MigrationSettings  # noqa: E402
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer  # noqa: E402
from pyllumnix.data_plane.transport import Transport, make_transport, ucx_available  # noqa: E402
from pyllumnix.infra.grpc_server import RunningServer, start_server  # noqa: E402
from pyllumnix.protos.llumnix.v1 import llumlet_pb2, llumlet_pb2_grpc  # noqa: E402
from pyllumnix.tools.recording_sink import RecordingSink  # noqa: E402
from tests.test_migration_paths import request, unmigrated_tokens, wait_tokens  # noqa: E402

OUTCOME = llumlet_pb2.MigrationOutcome
needs_ucx = pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")
KINDS = ["inproc", "tcp", pytest.param("ucx", marks=needs_ucx)]


class CountingSim(SimEngine):
    """A sim engine that counts its asynchronous block hooks and the buffer types they get."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.async_reads: list[type] = []
        self.async_writes: list[type] = []

    def read_blocks_async(self, block_ids: Sequence[int], out: Any = None) -> tuple[Any, Ready]:
        self.async_reads.append(type(out))
        return super().read_blocks_async(block_ids, out)

    def write_blocks_async(self, block_ids: Sequence[int], data: Any) -> Ready:
        self.async_writes.append(type(data))
        return super().write_blocks_async(block_ids, data)


@dataclass
class Node:
    llumlet: Llumlet
    coordinator: MigrationCoordinator
    server: RunningServer
    transport: Transport
    engine: CountingSim
    stub: llumlet_pb2_grpc.LlumletServiceStub
    channel: grpc.aio.Channel

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await self.coordinator.close()
        await self.llumlet.stop()
        await self.transport.close()

    @property
    def free(self) -> int:
        return self.engine.load().free_blocks


def migrate(src: Node, dst: Node, rid: str) -> llumlet_pb2.MigrateOutRequest:
    return llumlet_pb2.MigrateOutRequest(
        destination_instance_id=dst.llumlet.instance_id,
        destination_grpc_address=dst.server.address,
        request_id=rid,
        wait=True,
    )


async def settle(*nodes: Node) -> None:
    """Waits until every engine is idle and no migration is in flight."""
    for _ in range(4000):
        if all(not n.engine.has_work() and not n.coordinator.busy for n in nodes):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("nodes did not settle")


async def make_node(name: str, kind: str, *, block_size: int | None = None, device: bool | None = True) -> Node:
    engine = CountingSim("tiny", block_size=block_size, verify_incoming=True)
    llumlet = Llumlet(engine, name)
    transport = make_transport(kind)
    await transport.start()
    # Small chunks: a stage travels as several chunks through the ring of device buffers.
    settings = MigrationSettings(verify_crc=True, device_buffers=device, chunk_bytes=3 * engine.block_bytes)
    coordinator = MigrationCoordinator(llumlet, transport, settings)
    server = await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, LlumletServicer(llumlet, coordinator), SERVICE_NAME)]
    )
    coordinator.prewarm()
    llumlet.start()
    coordinator.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Node(llumlet, coordinator, server, transport, engine, llumlet_pb2_grpc.LlumletServiceStub(channel), channel)


@pytest.mark.parametrize("kind", KINDS)
async def test_migration_through_torch_chunk_buffers_over_every_transport(sink: RecordingSink, kind: str) -> None:
    a, b = await make_node("a", kind), await make_node("b", kind)
    try:
        assert a.coordinator.chunk_device == b.coordinator.chunk_device == "cpu"
        base = (a.free, b.free)
        # Long enough to outlast a first UCX connection's set-up (seconds on the shared machine).
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 5)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert result.bytes_sent > 3 * a.engine.block_bytes, "several chunks went over the wire"
        # Every chunk was gathered and scattered by the asynchronous hooks into torch tensors (the device buffers).
        assert a.engine.async_reads and set(a.engine.async_reads) == {torch.Tensor}
        assert b.engine.async_writes and set(b.engine.async_writes) == {torch.Tensor}
        assert len(b.engine.async_writes) >= 2
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(100, 400)
        assert sink.raw_indices("r") == list(range(400)), "no token pushed twice, none missing"
        await settle(a, b)
        assert (a.free, b.free) == base, "every block came back"
    finally:
        await a.close()
        await b.close()


async def test_host_engine_keeps_host_chunk_buffers_by_default(sink: RecordingSink) -> None:
    """The simulated engine's path is unchanged (#17 acceptance): numpy chunks, the synchronous hooks."""
    a, b = await make_node("a", "inproc", device=None), await make_node("b", "inproc", device=None)
    try:
        assert a.coordinator.chunk_device is None and b.coordinator.chunk_device is None
        await a.stub.AddRequest(request("r", sink, 60, 120))
        await wait_tokens(sink, "r", 5)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert not a.engine.async_reads and not b.engine.async_writes
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(60, 120)
    finally:
        await a.close()
        await b.close()


async def test_mismatched_kv_layouts_are_refused_before_anything_is_reserved(sink: RecordingSink) -> None:
    a, b = await make_node("a", "inproc"), await make_node("b", "inproc", block_size=32)
    try:
        base = (a.free, b.free)
        await a.stub.AddRequest(request("r", sink, 100, 200))
        await wait_tokens(sink, "r", 5)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
        assert result.reason.startswith("pre-allocate: FAILED_PRECONDITION: KV cache layouts differ"), result.reason
        assert "block size (tokens): 32 here vs 16 at the peer" in result.reason
        # Both layouts in full, so an operator sees what to align.
        assert b.engine.kv_layout().encode() in result.reason and a.engine.kv_layout().encode() in result.reason
        assert result.stages == 0 and result.bytes_sent == 0
        assert not b.coordinator.busy and b.free == base[1], "nothing reserved, no slot held on the destination"
        assert not b.engine.async_writes and not a.engine.async_reads, "no block was read or sent"
        # The source keeps the request: it finishes there, every token once.
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(100, 200)
        assert {o.instance_id for o in sink.outputs["r"]} == {"a"}
        await settle(a, b)
        assert (a.free, b.free) == base
    finally:
        await a.close()
        await b.close()


async def test_a_peer_without_a_layout_descriptor_is_refused() -> None:
    b = await make_node("b", "inproc")
    try:
        pre = llumlet_pb2.PreAllocateRequest(migration_id="m1", source_instance_id="a", stage=0, num_blocks=2)
        pre.request.request.request_id = "r"
        pre.request.request.prompt_token_ids.extend([1, 2, 3])
        pre.request.request.sampling.max_tokens = 4
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await b.stub.PreAllocate(pre)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "the peer sent no KV layout descriptor" in (e.value.details() or "")
        assert not b.coordinator.busy and b.free == b.engine.total_blocks
    finally:
        await b.close()


class _DeviceTransportDouble:
    """Stands in for a UCX endpoint created with ``device=`` (which needs a GPU this host lacks): only the
    attribute the coordinator reads."""

    device = "cuda:0"
    address = "double"


def test_a_device_transport_with_host_chunks_is_refused_at_start_up() -> None:
    llumlet = Llumlet(SimEngine("tiny", payload=False), "x")
    with pytest.raises(ValueError, match=r"carries device memory on cuda:0, but .* chunks are host memory"):
        MigrationCoordinator(llumlet, _DeviceTransportDouble(), MigrationSettings(device_buffers=False))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"carries device memory on cuda:0, but .* chunks are on cpu"):
        MigrationCoordinator(llumlet, _DeviceTransportDouble(), MigrationSettings(device_buffers=True))  # type: ignore[arg-type]


def test_a_host_transport_for_device_chunks_is_fine() -> None:
    """TCP and in-process carry device chunks through host staging (fusion's ``_wire_send``); no refusal here."""
    llumlet = Llumlet(SimEngine("tiny", payload=False), "x")
    coordinator = MigrationCoordinator(llumlet, make_transport("inproc"), MigrationSettings(device_buffers=True))
    assert coordinator.chunk_device == "cpu"


class TorchKvSim(SimEngine):
    """A sim engine reporting a torch KV layout (as the vLLM adapter does): the coordinator must pick device buffers
    for it without being told."""

    def kv_layout(self) -> KvLayout:
        return KvLayout("page[2,16,2,64]", self.block_bytes, "bfloat16", 1, self.block_size)


def test_torch_kv_engines_get_device_chunk_buffers_by_default() -> None:
    torch_kv = MigrationCoordinator(Llumlet(TorchKvSim("tiny", payload=False), "x"), make_transport("inproc"))
    assert torch_kv.chunk_device == "cpu"
    host = MigrationCoordinator(Llumlet(SimEngine("tiny", payload=False), "y"), make_transport("inproc"))
    assert host.chunk_device is None
    torch_kv.prewarm()
    assert isinstance(torch_kv._send_pool[0].get(0, 1, torch_kv.llumlet.engine.block_bytes), torch.Tensor)
