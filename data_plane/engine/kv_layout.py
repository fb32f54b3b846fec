"""KV block layouts: the descriptor both migration peers compare, and one-kernel gather/scatter of whole blocks.

Wire format. A block's bytes are its layers in order; each layer's page is that layer's slice for the block in the
layer tensor's *logical* order with the block axis removed (a block split into ``k`` kernel blocks contributes its
``k`` kernel pages in order). Two engines whose layouts have the same descriptor (logical page shape, page bytes,
dtype, layers, block size) exchange blocks byte for byte, whatever their physical strides (NHD vs HND, layer-major
vs block-major). Different descriptors would silently corrupt the KV, so ``check_compatible`` refuses them.

Fast path. vLLM 0.32 carves every layer's KV cache out of one buffer: block ``b`` of layer ``l`` starts at
``offset + l * layer_stride + b * block_stride``. When all layers share one storage, one shape and strides, and their
offsets step by one ``layer_stride``, a single strided view ``[blocks, layers, k, *page]`` makes a stage's gather one
``index_select`` (into a contiguous chunk) and its scatter one ``index_copy_``, instead of one copy per layer. Anything
else takes the per-layer path, which stays on the device too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyllumnix.data_plane.engine.device import READY, CudaReady, Ready

LAYOUT_HOST_BYTES = "bytes"
"""The layout of engines whose blocks are opaque host bytes (the simulated engine)."""


class KvLayoutMismatch(ValueError):
    """The two engines' KV blocks are not byte-compatible: migrating between them would corrupt the KV."""


class KvLayoutError(ValueError):
    """KV cache tensors this module cannot move (no block axis, mixed dtypes, ...)."""


@dataclass(frozen=True)
class KvLayout:
    """What must match for a block's bytes to mean the same on both engines."""

    # The logical page shape of one layer of one block, e.g. "page[2,16,2,32]" (see the module docstring).
    name: str
    # Bytes of one (layer, block) page; block_bytes = num_layers * page_bytes.
    page_bytes: int
    dtype: str
    num_layers: int = 1
    block_size: int = 0
    # Kernel blocks per manager block (vLLM may run attention on smaller blocks; the page name shows it too).
    kernel_split: int = 1
    # The KV memory's kind, ``cpu`` or ``cuda`` (not the index: peers on different GPUs are compatible). A device
    # engine and a host engine are refused: their migrations would take paths neither side set up.
    device: str = "cpu"

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.page_bytes

    def encode(self) -> str:
        """A compact text form for a handshake string field; ``decode`` reverses it."""
        return (
            f"{self.name};page={self.page_bytes};dtype={self.dtype};layers={self.num_layers};bs={self.block_size}"
            f";split={self.kernel_split};dev={self.device}"
        )

    @classmethod
    def decode(cls, text: str) -> KvLayout:
        name, _, rest = text.partition(";")
        fields: dict[str, str] = {}
        for part in rest.split(";") if rest else []:
            k, sep, v = part.partition("=")
            if not sep:
                raise KvLayoutError(f"bad KV layout descriptor {text!r}")
            fields[k] = v
        try:
            return cls(
                name,
                int(fields["page"]),
                fields["dtype"],
                int(fields["layers"]),
                int(fields["bs"]),
                int(fields.get("split", "1")),
                fields.get("dev", "cpu"),
            )
        except (KeyError, ValueError) as e:
            raise KvLayoutError(f"bad KV layout descriptor {text!r}: {e}") from e


def host_bytes_layout(block_bytes: int, block_size: int = 0) -> KvLayout:
    return KvLayout(LAYOUT_HOST_BYTES, block_bytes, "uint8", 1, block_size)


def check_compatible(local: KvLayout, remote: KvLayout) -> None:
    """Raises KvLayoutMismatch naming every difference; a migration between such engines must be refused before
    any block is reserved or sent."""
    diffs = [
        f"{what}: {a!r} here vs {b!r} at the peer"
        for what, a, b in (
            ("page layout", local.name, remote.name),
            ("page bytes", local.page_bytes, remote.page_bytes),
            ("dtype", local.dtype, remote.dtype),
            ("layers", local.num_layers, remote.num_layers),
            ("block size (tokens)", local.block_size, remote.block_size),
            ("kernel blocks per block", local.kernel_split, remote.kernel_split),
            ("device", local.device, remote.device),
        )
        if a != b
    ]
    if diffs:
        raise KvLayoutMismatch(
            f"KV cache layouts differ, blocks cannot migrate: {'; '.join(diffs)} "
            f"(here {local.encode()!r}, peer {remote.encode()!r})"
        )


def check_peer_layout(local: KvLayout, peer_encoded: str) -> None:
    """The destination's check in the pre-allocation handshake: ``peer_encoded`` is the source's
    ``KvLayout.encode()``. A peer that sent none is refused too (its blocks could mean anything)."""
    if not peer_encoded:
        raise KvLayoutMismatch(f"the peer sent no KV layout descriptor; this engine's is {local.encode()!r}")
    try:
        remote = KvLayout.decode(peer_encoded)
    except KvLayoutError as e:
        raise KvLayoutMismatch(str(e)) from e
    check_compatible(local, remote)


def block_axis_and_split(shape: Sequence[int], num_blocks: int) -> tuple[int, int]:
    """The axis of a layer tensor that indexes blocks (0, or 1 for K/V-first layouts) and how many kernel blocks
    make one manager block (vLLM may run attention with a smaller kernel block size: the axis then has
    ``num_blocks * k`` entries)."""
    for axis in (0, 1):
        if len(shape) > axis and shape[axis] >= num_blocks and shape[axis] % num_blocks == 0:
            return axis, shape[axis] // num_blocks
    raise KvLayoutError(f"unexpected KV cache layout {tuple(shape)}: no block axis of size {num_blocks} or a multiple")


class BlockMover:
    """Gathers manager blocks of every layer into a contiguous ``(n, block_bytes)`` uint8 buffer and scatters such a
    buffer back, on the tensors' own device. ``fused`` tells whether one kernel moves all layers."""

    def __init__(self, layers: Sequence[Any], num_blocks: int, block_size: int = 0) -> None:
        if not layers:
            raise KvLayoutError("no KV cache layers")
        import torch

        self._torch = torch
        first = layers[0]
        self.device = first.device
        self.dtype = first.dtype
        if any(t.dtype != first.dtype or t.device != first.device for t in layers):
            raise KvLayoutError("KV cache layers differ in dtype or device")
        self.num_blocks = num_blocks
        self._views: list[Any] = []  # per layer: logical [num_blocks, k, *page] view in the layer dtype
        for t in layers:
            axis, split = block_axis_and_split([int(d) for d in t.shape], num_blocks)
            self._views.append(t.movedim(axis, 0).unflatten(0, (num_blocks, split)))
        page_shape = tuple(int(d) for d in self._views[0].shape[1:])
        if any(tuple(int(d) for d in v.shape[1:]) != page_shape for v in self._views):
            raise KvLayoutError("KV cache layers differ in shape")
        self.page_shape = page_shape
        self.num_layers = len(layers)
        self.page_bytes = math.prod(page_shape) * int(first.element_size())
        self.block_bytes = self.page_bytes * self.num_layers
        dtype_name = str(first.dtype).removeprefix("torch.")
        self.layout = KvLayout(
            "page[" + ",".join(str(d) for d in page_shape) + "]",
            self.page_bytes,
            dtype_name,
            self.num_layers,
            block_size,
            int(self._views[0].shape[1]),
            self.device.type,
        )
        self.fused_view, self.page_contiguous = self._fuse()
        self.fused = self.fused_view is not None

    def _fuse(self) -> tuple[Any, bool]:
        """The ``[blocks, layers, k, *page]`` view over the shared buffer, or None when the layers do not form one
        (different storages, strides, or offsets not in arithmetic progression)."""
        views = self._views
        v0 = views[0]
        storage = v0.untyped_storage().data_ptr()
        strides = tuple(int(s) for s in v0.stride())
        offsets = [int(v.storage_offset()) for v in views]
        for v in views:
            if v.untyped_storage().data_ptr() != storage or tuple(int(s) for s in v.stride()) != strides:
                return None, False
        layer_stride = offsets[1] - offsets[0] if len(views) > 1 else 0
        if any(offsets[i] != offsets[0] + i * layer_stride for i in range(len(views))):
            return None, False
        size = (self.num_blocks, self.num_layers, *self.page_shape)
        stride = (strides[0], layer_stride, *strides[1:])
        fused = v0.as_strided(size, stride, offsets[0])
        # A (layer, block) page is contiguous when its own strides are the row-major ones of its shape.
        expected, contiguous = 1, True
        for dim, st in zip(reversed(self.page_shape), reversed(strides[1:]), strict=True):
            if dim > 1 and st != expected:
                contiguous = False
            expected *= dim
        return fused, contiguous

    # ------------------------------------------------------------------ helpers
    def index(self, block_ids: Sequence[int]) -> Any:
        """Block ids as an int64 tensor on the KV device (host -> device copy of a few bytes)."""
        torch = self._torch
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        return ids if self.device.type == "cpu" else ids.to(self.device, non_blocking=True)

    def _check(self, ids: Any, buf: Any) -> int:
        n = int(ids.numel())
        if tuple(buf.shape) != (n, self.block_bytes) or buf.dtype != self._torch.uint8:
            raise KvLayoutError(f"buffer {buf.dtype}{tuple(buf.shape)} is not uint8({n}, {self.block_bytes})")
        if buf.device != self.device:
            raise KvLayoutError(f"buffer on {buf.device}, KV cache on {self.device}")
        if not buf.is_contiguous():
            raise KvLayoutError("block buffer must be contiguous")
        return n

    # ------------------------------------------------------------------ kernels
    def gather(self, ids: Any, out: Any) -> None:
        """Copies blocks ``ids`` (an index tensor on the device) of every layer into ``out`` (uint8 (n, block_bytes),
        contiguous, on the device). Enqueued on the current stream."""
        n = self._check(ids, out)
        if n == 0:
            return
        torch = self._torch
        if self.fused_view is not None:
            torch.index_select(self.fused_view, 0, ids, out=out.view(self.dtype).view(n, *self.fused_view.shape[1:]))
            return
        self.gather_per_layer(ids, out)

    def gather_per_layer(self, ids: Any, out: Any) -> None:
        """The reference path: one ``index_select`` per layer."""
        n = self._check(ids, out)
        torch = self._torch
        off = 0
        for v in self._views:
            dst = out[:, off : off + self.page_bytes]
            sel = torch.index_select(v, 0, ids)
            dst.copy_(sel.view(torch.uint8).reshape(n, self.page_bytes))
            off += self.page_bytes

    def scatter(self, ids: Any, data: Any) -> None:
        """Writes ``data`` (uint8 (n, block_bytes), contiguous, on the device) into blocks ``ids`` of every layer.
        Enqueued on the current stream."""
        n = self._check(ids, data)
        if n == 0:
            return
        if self.fused_view is not None:
            self.fused_view.index_copy_(0, ids, data.view(self.dtype).view(n, *self.fused_view.shape[1:]))
            return
        self.scatter_per_layer(ids, data)

    def scatter_per_layer(self, ids: Any, data: Any) -> None:
        n = self._check(ids, data)
        off = 0
        for v in self._views:
            src = data[:, off : off + self.page_bytes].contiguous().view(self.dtype).view(n, *self.page_shape)
            v.index_copy_(0, ids, src)
            off += self.page_bytes


class BlockCopier:
    """Runs a BlockMover's kernels for migration: synchronously on the CPU; on CUDA on a side stream, each copy
    ordered after the engine's last step by an event (``mark_step``), so it overlaps the next step instead of
    queueing behind it on the default stream, and returning a ``Ready`` handle on its own event."""

    def __init__(self, mover: BlockMover) -> None:
        self.mover = mover
        self._torch = mover._torch
        self._stream: Any = None
        self._step_event: Any = None
        if mover.device.type == "cuda":
            torch = self._torch
            self._stream = torch.cuda.Stream(device=mover.device)
            self._step_event = torch.cuda.Event()
            self.mark_step()

    @property
    def asynchronous(self) -> bool:
        return self._stream is not None

    def mark_step(self) -> None:
        """Call after each engine step (on the engine's thread): later copies wait for the work enqueued so far."""
        if self._step_event is not None:
            self._step_event.record(self._torch.cuda.current_stream(self.mover.device))

    def _run(self, fn: Any, block_ids: Sequence[int], buf: Any) -> Ready:
        if self._stream is None:
            fn(self.mover.index(block_ids), buf)
            return READY
        torch = self._torch
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._step_event)
            fn(self.mover.index(block_ids), buf)
            done = torch.cuda.Event()
            done.record(self._stream)
        # The buffers were allocated on other streams: keep the caching allocator from reusing them early.
        buf.record_stream(self._stream)
        return CudaReady(done)

    def gather_async(self, block_ids: Sequence[int], out: Any) -> Ready:
        """Gathers into ``out`` (uint8 (n, block_bytes) on the KV device)."""
        return self._run(self.mover.gather, block_ids, out)

    def scatter_async(self, block_ids: Sequence[int], data: Any) -> Ready:
        """Scatters ``data`` into the blocks; the blocks must not be used (nor ``data`` reused) before the handle is
        done."""
        return self._run(self.mover.scatter, block_ids, data)
