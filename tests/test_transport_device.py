"""The fusion pipeline with torch chunk buffers and asynchronous engine hooks, over every transport; and the clear
errors for memory a transport cannot carry. On this CPU-only host the "device" is ``cpu`` (torch tensors, zero-copy
host views); CUDA itself is exercised by integration/gpu_check.sh."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pyllumnix.data_plane.engine.device import (  # noqa: E402
    READY,
    DeviceUnavailableError,
    Ready,
    normalize_device,
)
from pyllumnix.data_plane.engine.kv_layout import BlockMover  # noqa: E402
from pyllumnix.data_plane.transport import (  # noqa: E402
    TransportError,
    make_transport,
    receive_blocks,
    send_blocks,
    ucx_available,
)
from pyllumnix.data_plane.transport.fusion import ChunkBuffers  # noqa: E402

needs_ucx = pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")
KINDS = ["inproc", "tcp", pytest.param("ucx", marks=needs_ucx)]
N_BLOCKS = 64


class _Pending:
    """A readiness handle that is not done until waited on: shows the pipeline waits before using a buffer."""

    def __init__(self, log: list[str], what: str) -> None:
        self.log, self.what, self.finished = log, what, False

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.finished = True
        self.log.append(self.what)


class KvPool:
    """vLLM-shaped KV buffers (one buffer, layer-major, K/V first) behind the async engine hooks."""

    def __init__(self, seed: int | None) -> None:
        self.layers = [t for t in torch.zeros(3, 2, N_BLOCKS, 4, 2, 8).unbind(0)]
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            for t in self.layers:
                t.copy_(torch.randn(t.shape, generator=g))
        self.mover = BlockMover(self.layers, N_BLOCKS)
        self.block_bytes = self.mover.block_bytes
        self.log: list[str] = []
        self.buffers = ChunkBuffers(3, device="cpu")

    def read_async(self, ids: Sequence[int]) -> tuple[Any, Ready]:
        out = self.buffers.rotate(len(ids), self.block_bytes)
        self.mover.gather(self.mover.index(ids), out)
        return out, _Pending(self.log, f"gather {list(ids)[:1]}")

    def write_async(self, ids: Sequence[int], data: Any) -> Ready:
        assert isinstance(data, torch.Tensor) and data.device.type == "cpu"
        self.mover.scatter(self.mover.index(ids), data)
        return _Pending(self.log, f"scatter {list(ids)[:1]}")

    def read_host(self, ids: Sequence[int]) -> np.ndarray[Any, np.dtype[np.uint8]]:
        out = torch.empty((len(ids), self.block_bytes), dtype=torch.uint8)
        self.mover.gather_per_layer(self.mover.index(ids), out)
        array: np.ndarray[Any, np.dtype[np.uint8]] = out.numpy()
        return array


@pytest.mark.parametrize("kind", KINDS)
async def test_torch_chunk_buffers_round_trip(kind: str) -> None:
    src, dst = KvPool(seed=1), KvPool(seed=None)
    rng = np.random.default_rng(3)
    src_ids = [int(i) for i in rng.permutation(N_BLOCKS)[:37]]
    dst_ids = [int(i) for i in rng.permutation(N_BLOCKS)[:37]]
    a, b = make_transport(kind), make_transport(kind)
    await a.start()
    await b.start()
    recv_buffers = ChunkBuffers(3, device="cpu")
    try:
        chunk = 5 * src.block_bytes  # 8 chunks, the last one short
        recv = asyncio.create_task(
            receive_blocks(
                b, "d/0", dst_ids, dst.block_bytes, dst.write_async, chunk, timeout=20, checksum=True, window=3,
                buffers=recv_buffers,
            )
        )  # fmt: skip
        sent = await send_blocks(a, b.address, "d/0", src.read_async, src_ids, src.block_bytes, chunk, timeout=20,
                                 checksum=True)  # fmt: skip
        got = await recv
    finally:
        await a.close()
        await b.close()
    expected = src.read_host(src_ids)
    assert sent.n_chunks == got.n_chunks == 8
    assert sent.crc32 == got.crc32 == zlib.crc32(expected.tobytes())
    assert np.array_equal(dst.read_host(dst_ids), expected)
    untouched = [i for i in range(N_BLOCKS) if i not in dst_ids]
    assert not dst.read_host(untouched).any()
    assert len(src.log) == 8 and len(dst.log) == 8, "every gather and scatter handle must be waited on"
    assert isinstance(recv_buffers.get(0, 1, dst.block_bytes), torch.Tensor)  # the ring lives on the KV device


def test_chunk_buffers_live_on_the_device_and_are_reused() -> None:
    host = ChunkBuffers(2)
    assert isinstance(host.get(0, 4, 100), np.ndarray)
    dev = ChunkBuffers(2, device="cpu")
    first = dev.get(0, 4, 100)
    assert isinstance(first, torch.Tensor) and first.shape == (4, 100)
    assert dev.get(0, 3, 100).data_ptr() == first.data_ptr(), "a smaller chunk must reuse the slot"
    assert dev.get(2, 4, 100).data_ptr() == first.data_ptr()


def test_gpu_less_host_refuses_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(DeviceUnavailableError, match="no usable CUDA GPU"):
        normalize_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="no usable CUDA GPU"):
        ChunkBuffers(2, device="cuda:0")
    with pytest.raises(DeviceUnavailableError, match="unsupported KV device"):
        normalize_device("tpu")


@needs_ucx
def test_device_ucx_endpoint_needs_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    from pyllumnix.data_plane.transport.ucx import UcxTransport

    with pytest.raises(DeviceUnavailableError, match="no usable CUDA GPU"):
        UcxTransport(device="cuda")


class _FakeDeviceChunk:
    """Claims to be device memory (as a torch CUDA tensor does); no GPU is needed to see it refused."""

    __cuda_array_interface__ = {"shape": (16,), "typestr": "|u1", "data": (0, False), "version": 3}


@pytest.mark.parametrize("kind", KINDS)
async def test_host_transports_refuse_device_memory(kind: str) -> None:
    a, b = make_transport(kind), make_transport(kind)
    await a.start()
    await b.start()
    try:
        with pytest.raises(TransportError, match="device"):
            await a.send(b.address, "k", _FakeDeviceChunk(), timeout=5)  # type: ignore[arg-type]
        with pytest.raises(TransportError, match="not a host buffer"):
            await a.send(b.address, "k2", torch.zeros(4, dtype=torch.uint8), timeout=5)
    finally:
        await a.close()
        await b.close()


@needs_ucx
async def test_host_ucx_endpoint_refuses_device_out_buffer() -> None:
    a = make_transport("ucx")
    await a.start()
    try:
        with pytest.raises(TransportError, match="host-memory UCX endpoint"):
            a.expect("k", 16, out=_FakeDeviceChunk())  # type: ignore[arg-type]
    finally:
        await a.close()


@needs_ucx
async def test_device_ucx_endpoint_refuses_host_memory() -> None:
    """A device endpoint built without a GPU (its CUDA set-up bypassed) still checks memory before touching UCX."""
    from pyllumnix.data_plane.transport.ucx import UcxTransport

    t = UcxTransport()
    t.device = "cuda:0"
    with pytest.raises(TransportError, match="host memory given to a device UCX endpoint"):
        t._check_memory("send 'k'", np.zeros(4, dtype=np.uint8))
    with pytest.raises(TransportError, match="host memory given to a device UCX endpoint"):
        t._check_memory("send 'k'", torch.zeros(4, dtype=torch.uint8))


def test_ready_handle_of_host_copies() -> None:
    assert READY.done()
    READY.wait()


def test_device_ucx_defaults_replace_the_earlier_host_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyllumnix.data_plane.transport import ucx

    for name in ("UCX_TLS", "UCX_RNDV_FRAG_MEM_TYPE", "RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ucx, "_DEFAULTED", set())
    import os

    ucx.configure_ucx_env()  # what ucx_available() does first
    assert os.environ["UCX_TLS"] == "sm,self,tcp" and os.environ["UCX_RNDV_FRAG_MEM_TYPE"] == "host"
    ucx.configure_ucx_env(device=True)
    assert os.environ["UCX_TLS"] == "cuda_ipc,cuda_copy,sm,self,tcp"
    assert "UCX_RNDV_FRAG_MEM_TYPE" not in os.environ
    monkeypatch.setenv("RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY", "true")
    ucx.configure_ucx_env(device=True)
    assert os.environ["UCX_TLS"] == "rc,cuda_ipc,cuda_copy,sm,self,tcp"
    monkeypatch.setenv("UCX_TLS", "tcp")  # the user's choice is never replaced
    monkeypatch.setattr(ucx, "_DEFAULTED", set())
    ucx.configure_ucx_env(device=True)
    assert os.environ["UCX_TLS"] == "tcp"


def test_device_endpoint_after_a_host_only_ucx_context_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyllumnix.data_plane.transport import ucx

    monkeypatch.setattr(ucx, "_CONTEXT_TLS", ["sm,self,tcp"])
    with pytest.raises(TransportError, match="no CUDA transports"):
        ucx._check_context_for_device()
    monkeypatch.setattr(ucx, "_CONTEXT_TLS", ["cuda_ipc,cuda_copy,sm,self,tcp"])
    ucx._check_context_for_device()


async def test_sim_engine_default_hooks_take_torch_chunk_buffers() -> None:
    """The host sim engine keeps its numpy hooks; the default async hooks fill and drain CPU torch chunk buffers
    through their numpy views, so one fusion pipeline with device-side buffers serves every engine."""
    from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
    from pyllumnix.data_plane.engine.sim import SimEngine

    src, dst = SimEngine("tiny", total_blocks=64), SimEngine("tiny", total_blocks=64)
    assert src.kv_device == "cpu" and src.kv_layout().name == "bytes"
    src.add_request(RequestSpec("p", tuple(range(3, 80)), Sampling(max_tokens=5)), 0.0)
    for t in range(3):
        src.step(float(t))
    ids = src.block_ids("p")
    dst_ids = dst.reserve_blocks(len(ids))
    send_bufs, recv_bufs = ChunkBuffers(3, device="cpu"), ChunkBuffers(2, device="cpu")
    a, b = make_transport("inproc"), make_transport("inproc")
    await a.start()
    await b.start()
    try:

        def read(chunk_ids: Sequence[int]) -> tuple[Any, Ready]:
            return src.read_blocks_async(chunk_ids, send_bufs.rotate(len(chunk_ids), src.block_bytes))

        chunk = 2 * src.block_bytes
        recv = asyncio.create_task(
            receive_blocks(b, "s/0", dst_ids, dst.block_bytes, dst.write_blocks_async, chunk, buffers=recv_bufs)
        )
        await send_blocks(a, b.address, "s/0", read, ids, src.block_bytes, chunk)
        await recv
    finally:
        await a.close()
        await b.close()
    assert isinstance(send_bufs.get(0, 1, src.block_bytes), torch.Tensor)
    state = src.suspend("p")
    dst.commit_incoming(state, dst_ids, 0.0)  # the sim engine verifies the payload bytes on commit
    assert np.array_equal(dst.read_blocks(dst_ids), src.read_blocks(ids))
