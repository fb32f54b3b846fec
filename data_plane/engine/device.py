"""Device-memory helpers for the KV data path: readiness handles, device names, and host staging buffers.

A GPU engine's block copies are asynchronous kernels; the data plane must not hand a buffer to a transport (ucxx
ignores CUDA streams) or reuse one before the kernel that fills or drains it has finished. Every asynchronous block
hook therefore returns a ``Ready`` handle: a host engine returns ``READY`` (already done), a CUDA engine one that
wraps the event recorded after its kernel. torch is imported lazily: the simulated engine and the control plane
never need it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt


class DeviceUnavailableError(RuntimeError):
    """A device was asked for that this host does not have (e.g. ``cuda`` without a GPU or a CUDA torch)."""


class Ready(Protocol):
    """Completion of an asynchronous block copy."""

    def done(self) -> bool:
        """True once the copy has finished (never blocks)."""
        ...

    def wait(self) -> None:
        """Blocks the calling thread until the copy has finished."""
        ...


class _Completed:
    """The handle of a copy that ran synchronously."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


READY: Ready = _Completed()


class CudaReady:
    """Wraps a CUDA event recorded after the copy's kernel on its stream."""

    def __init__(self, event: Any) -> None:
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()


def import_torch() -> Any:
    """torch, or DeviceUnavailableError when it is not installed (device buffers need it)."""
    try:
        import torch
    except ImportError as e:
        raise DeviceUnavailableError("device KV buffers need torch (pip install torch)") from e
    return torch


def normalize_device(device: str) -> str:
    """``cpu``, or ``cuda:N``; raises DeviceUnavailableError for a CUDA device this host cannot provide."""
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise DeviceUnavailableError(f"unsupported KV device {device!r} (cpu or cuda[:N])")
    torch = import_torch()
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} requested, but this host has no usable CUDA GPU "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else int(index)
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


def is_device_tensor(obj: object) -> bool:
    """True for memory a host transport cannot read directly (it exposes ``__cuda_array_interface__``)."""
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:  # torch raises for a CPU tensor on some versions instead of AttributeError
        return False


def is_torch_tensor(obj: object) -> bool:
    mod = type(obj).__module__
    return mod == "torch" or mod.startswith("torch.")


def device_of(buffer: object) -> str:
    """``cpu`` for numpy arrays and CPU tensors, ``cuda:N`` for CUDA tensors."""
    if is_torch_tensor(buffer):
        dev = buffer.device  # type: ignore[attr-defined]
        return "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index}"
    return "cpu"


def host_view(buffer: Any) -> npt.NDArray[np.uint8]:
    """A zero-copy uint8 numpy view of a host buffer (numpy array or CPU tensor); device memory is refused."""
    if isinstance(buffer, np.ndarray):
        return buffer.view(np.uint8) if buffer.dtype != np.uint8 else buffer
    if is_torch_tensor(buffer):
        if buffer.device.type != "cpu":
            raise ValueError(f"buffer on {device_of(buffer)} is not host memory")
        torch = import_torch()
        t = buffer if buffer.dtype == torch.uint8 else buffer.view(torch.uint8)
        array: npt.NDArray[np.uint8] = t.numpy()
        return array
    raise TypeError(f"not a host buffer: {type(buffer).__name__}")


def pinned_host_buffer(nbytes: int) -> Any:
    """A page-locked uint8 CPU tensor (fast, asynchronous host<->device copies); requires CUDA."""
    torch = import_torch()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def device_buffer(nbytes: int, device: str) -> Any:
    """A uint8 tensor of ``nbytes`` on ``device``, every byte written once (no first-touch cost mid-transfer)."""
    torch = import_torch()
    t = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t.fill_(1)
    return t
