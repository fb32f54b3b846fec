"""One-kernel gather/scatter of KV blocks against a per-(block, layer) reference, for vLLM-shaped KV buffers.

Each layout carves every layer out of one int8 buffer as vLLM 0.32 does; the reference reads each (block, layer,
kernel block) page on its own, so it shares no code with the fused or per-layer paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pyllumnix.data_plane.engine.kv_layout import (  # noqa: E402
    BlockMover,
    KvLayout,
    KvLayoutError,
    KvLayoutMismatch,
    block_axis_and_split,
    check_compatible,
    check_peer_layout,
    host_bytes_layout,
)

L, N, BS, H, D = 3, 10, 4, 2, 8
F32 = torch.float32


def _buffer(nbytes: int) -> Any:
    return torch.zeros(nbytes, dtype=torch.int8)


def _layer_major(shape: tuple[int, ...], perm: tuple[int, ...] | None = None) -> Callable[[], list[Any]]:
    """Per layer a contiguous ``shape`` tensor (physical order; ``perm`` gives the logical view) back to back."""

    def make() -> list[Any]:
        numel = 1
        for d in shape:
            numel *= d
        buf = _buffer(L * numel * 4).view(F32)
        layers = [buf[i * numel : (i + 1) * numel].view(shape) for i in range(L)]
        return [t.permute(perm) if perm else t for t in layers]

    return make


def _block_major(page: tuple[int, ...], perm: tuple[int, ...] | None = None) -> Callable[[], list[Any]]:
    """Physical ``[N, L, *page]``: a block's pages of all layers are adjacent; each layer is a strided view."""

    def make() -> list[Any]:
        numel = N * L
        for d in page:
            numel *= d
        phys = _buffer(numel * 4).view(F32).view(N, L, *page)
        layers = [phys[:, i] for i in range(L)]
        return [t.permute(perm) if perm else t for t in layers]

    return make


LAYOUTS: dict[str, Callable[[], list[Any]]] = {
    # vLLM CPU backend: [blocks, kv_heads, block_size, 2*head_dim]
    "cpu-NHB2D": _layer_major((N, H, BS, 2 * D)),
    # FlashAttention NHD: [2, blocks, block_size, kv_heads, head_dim]
    "flash-2NBHD": _layer_major((2, N, BS, H, D)),
    # FlashAttention with the HND stride order: physical [2, N, H, BS, D], logical [2, N, BS, H, D]
    "flash-HND-strided": _layer_major((2, N, H, BS, D), (0, 1, 3, 2, 4)),
    # FlashInfer: [blocks, 2, block_size, kv_heads, head_dim]
    "flashinfer-N2BHD": _layer_major((N, 2, BS, H, D)),
    # MLA: one latent per token [blocks, block_size, dim]
    "mla-NBD": _layer_major((N, BS, 2 * D)),
    # cross-layer block-major buffer, per-layer [N, 2, BS, H, D] views
    "block-major": _block_major((2, BS, H, D)),
    # block-major buffer viewed K/V-first per layer: logical [2, N, BS, H, D]
    "block-major-kv-first": _block_major((2, BS, H, D), (1, 0, 2, 3, 4)),
}


def _kernel_split(k: int) -> Callable[[], list[Any]]:
    """Kernel block size BS/k: each manager block is k consecutive kernel blocks on the block axis."""
    return _layer_major((2, N * k, BS // k, H, D))


def _fill(layers: list[Any], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in layers:
        t.copy_(torch.randn(t.shape, generator=g))


def _reference_read(layers: list[Any], ids: list[int]) -> Any:
    """Bytes of each block: for each layer, each kernel block's page in logical order (page by page)."""
    rows = []
    for b in ids:
        parts = []
        for t in layers:
            axis, k = block_axis_and_split([int(d) for d in t.shape], N)
            moved = t.movedim(axis, 0)
            for j in range(k):
                parts.append(moved[b * k + j].contiguous().view(torch.uint8).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


CASES = {**LAYOUTS, "kernel-split-2": _kernel_split(2), "kernel-split-4": _kernel_split(4)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gather_matches_reference(name: str) -> None:
    layers = CASES[name]()
    _fill(layers, 1)
    mover = BlockMover(layers, N, block_size=BS)
    assert mover.fused, "layers carved from one buffer must take the one-kernel path"
    ids = [7, 2, 9, 0, 4]
    expected = _reference_read(layers, ids)
    assert mover.block_bytes == expected.shape[1]
    out = torch.full((len(ids), mover.block_bytes), 255, dtype=torch.uint8)
    mover.gather(mover.index(ids), out)
    assert torch.equal(out, expected)
    out2 = torch.zeros_like(out)
    mover.gather_per_layer(mover.index(ids), out2)
    assert torch.equal(out2, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scatter_writes_only_the_target_blocks(name: str) -> None:
    src_layers = CASES[name]()
    _fill(src_layers, 2)
    src = BlockMover(src_layers, N)
    data = torch.empty((4, src.block_bytes), dtype=torch.uint8)
    src.gather(src.index([1, 3, 5, 8]), data)
    for per_layer in (False, True):
        dst_layers = CASES[name]()
        dst = BlockMover(dst_layers, N)
        ids = [6, 0, 2, 9]
        (dst.scatter_per_layer if per_layer else dst.scatter)(dst.index(ids), data)
        assert torch.equal(_reference_read(dst_layers, ids), data)
        untouched = [b for b in range(N) if b not in ids]
        assert not _reference_read(dst_layers, untouched).any(), "scatter wrote outside its blocks"


def test_separate_storages_fall_back_per_layer() -> None:
    layers = [torch.randn(N, H, BS, 2 * D) for _ in range(L)]
    mover = BlockMover(layers, N)
    assert not mover.fused
    out = torch.empty((2, mover.block_bytes), dtype=torch.uint8)
    mover.gather(mover.index([3, 1]), out)
    assert torch.equal(out, _reference_read(layers, [3, 1]))
    mover.scatter(mover.index([0, 2]), out)
    assert torch.equal(_reference_read(layers, [0, 2]), out)


def test_uneven_layer_offsets_fall_back() -> None:
    buf = torch.zeros(N * 64 * 4, dtype=F32)
    layers = [buf[0 : N * 64].view(N, 64), buf[N * 64 : 2 * N * 64].view(N, 64), buf[3 * N * 64 :].view(N, 64)]
    assert not BlockMover(layers, N).fused


def test_page_contiguity_is_reported() -> None:
    assert BlockMover(LAYOUTS["cpu-NHB2D"](), N).page_contiguous
    assert not BlockMover(LAYOUTS["flash-2NBHD"](), N).page_contiguous  # K and V pages are N blocks apart
    assert not BlockMover(LAYOUTS["flash-HND-strided"](), N).page_contiguous


def test_layout_descriptor_is_physical_order_independent() -> None:
    nhd = BlockMover(LAYOUTS["flash-2NBHD"](), N, block_size=BS).layout
    hnd = BlockMover(LAYOUTS["flash-HND-strided"](), N, block_size=BS).layout
    check_compatible(nhd, hnd)  # same logical page: byte-compatible
    cpu = BlockMover(LAYOUTS["cpu-NHB2D"](), N, block_size=BS).layout
    assert cpu.page_bytes == nhd.page_bytes
    with pytest.raises(KvLayoutMismatch, match="page layout"):
        check_compatible(cpu, nhd)


def test_mismatches_name_every_difference() -> None:
    a = KvLayout("page[2,4,2,8]", 512, "float32", 3, 16)
    b = KvLayout("page[2,4,2,8]", 256, "float16", 3, 32)
    with pytest.raises(KvLayoutMismatch) as e:
        check_compatible(a, b)
    text, _, both = str(e.value).partition(" (here ")
    assert "dtype" in text and "page bytes" in text and "block size" in text and "layers" not in text
    assert a.encode() in both and b.encode() in both  # the error names both layouts in full
    with pytest.raises(KvLayoutMismatch, match="page layout"):
        check_compatible(host_bytes_layout(1536, 16), a)


def test_kernel_split_and_device_kind_are_part_of_the_layout() -> None:
    whole = BlockMover(LAYOUTS["cpu-NHB2D"](), N, block_size=BS).layout
    split = BlockMover(_kernel_split(2)(), N, block_size=BS).layout
    assert (whole.kernel_split, split.kernel_split) == (1, 2) and whole.device == "cpu"
    with pytest.raises(KvLayoutMismatch, match="kernel blocks per block: 1 here vs 2"):
        check_compatible(whole, split)
    gpu = KvLayout(whole.name, whole.page_bytes, whole.dtype, whole.num_layers, BS, 1, "cuda")
    with pytest.raises(KvLayoutMismatch, match="device: 'cpu' here vs 'cuda' at the peer"):
        check_compatible(whole, gpu)


def test_descriptor_round_trips_through_text() -> None:
    a = KvLayout("page[2,4,2,8]", 512, "bfloat16", 32, 16)
    assert KvLayout.decode(a.encode()) == a
    b = KvLayout("page[4,2,4,2,8]", 1024, "float16", 2, 16, 4, "cuda")
    assert KvLayout.decode(b.encode()) == b
    with pytest.raises(KvLayoutError):
        KvLayout.decode("page[2];page=x")


def test_bad_buffers_are_refused() -> None:
    mover = BlockMover(LAYOUTS["cpu-NHB2D"](), N)
    ids = mover.index([1, 2])
    with pytest.raises(KvLayoutError, match="is not uint8"):
        mover.gather(ids, torch.empty((3, mover.block_bytes), dtype=torch.uint8))
    with pytest.raises(KvLayoutError, match="is not uint8"):
        mover.scatter(ids, torch.empty((2, mover.block_bytes // 4), dtype=F32))
    with pytest.raises(KvLayoutError, match="no block axis"):
        BlockMover([torch.zeros(3, 5, 7)], N)


def test_peer_layout_check_of_the_handshake_text() -> None:
    local = KvLayout("page[2,4,2,8]", 512, "float32", 3, 16)
    check_peer_layout(local, local.encode())
    with pytest.raises(KvLayoutMismatch, match="no KV layout descriptor"):
        check_peer_layout(local, "")
    with pytest.raises(KvLayoutMismatch, match="bad KV layout"):
        check_peer_layout(local, "garbage;x")
    with pytest.raises(KvLayoutMismatch, match="dtype"):
        check_peer_layout(local, KvLayout("page[2,4,2,8]", 512, "bfloat16", 3, 16).encode())


def test_block_copier_on_the_cpu_is_synchronous() -> None:
    from pyllumnix.data_plane.engine.kv_layout import BlockCopier

    src_layers, dst_layers = LAYOUTS["block-major"](), LAYOUTS["flash-2NBHD"]()
    _fill(src_layers, 4)
    src, dst = BlockCopier(BlockMover(src_layers, N)), BlockCopier(BlockMover(dst_layers, N))
    assert not src.asynchronous
    buf = torch.empty((3, src.mover.block_bytes), dtype=torch.uint8)
    ready = src.gather_async([4, 1, 8], buf)
    assert ready.done()
    src.mark_step()  # a no-op without CUDA
    dst.scatter_async([0, 2, 3], buf).wait()
    # different physical layouts, same logical page: the bytes carry over
    assert torch.equal(_reference_read(dst_layers, [0, 2, 3]), _reference_read(src_layers, [4, 1, 8]))
