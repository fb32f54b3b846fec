"""UCX transport over ``ucxx``'s core API: worker-address endpoints, error handling off, tag send / worker-level tag
receive, and a UCX worker driven by the asyncio event loop without ever spinning.

Why this shape (see PLATFORM.md, "UCX"): listener endpoints force UCX peer error handling, and UCX then only uses
``tcp`` (~1 GiB/s on one host). Endpoints made from the peer's *worker address* with error handling off use shared
memory (``sm``: posix/sysv FIFOs, CMA rendezvous) at memcpy-class speed. The price: a send to a dead peer never fails
by itself, so every operation here is bounded by an application timeout and peer death is otherwise the caller's to
detect (the registry lease).

Tags, not active messages: the receiver posts a tag receive on its *worker* straight into the expected buffer, so it
needs no endpoint back to the sender and the bytes land without a copy (rendezvous for large chunks). The 64-bit tag
is a hash of the receiving endpoint's nonce and the key; the published address is ``ucx://<nonce>@<worker address
hex>``.

Progress (``UcxProgress``). ucxx's own asyncio layer (``ucxx.core`` / ``UCXPY_PROGRESS_MODE``) is not used, because
in 0.52 it makes every idle process that ever took part in a transfer spin a core:

- its ``blocking`` mode arms the worker once at start and never again (ucx-py re-created the arm task on each wake-up;
  ucxx's reader callback lost that line). UCX drains a worker's wake-up fds (the shared-memory transport's signal
  socket) only in ``ucp_worker_arm``, so after the first message the epoll fd stays readable for good and the event
  loop calls the reader back-to-back forever;
- without its notifier thread (``thread`` modes only) every request is awaited with ``wait_yield``, a ``while not
  completed: await asyncio.sleep(0)`` loop, so each outstanding receive (a posted window slot, a receive parked after a
  timeout) spins the loop too.

Here one ``UcxProgress`` per transport owns its worker: the event loop watches the worker's epoll fd; every wake-up,
and every newly posted request, runs one pass that progresses the worker, completes the asyncio futures of finished
requests, and re-arms the worker (``ucp_worker_arm`` drains the fds; ``BUSY`` means more to progress first). Idle,
nothing runs. While requests are in flight a timer also progresses every ``RESCUE_INTERVAL_S`` (a lost wake-up would
otherwise stall a transfer); it stops when none are.

UCX reads its configuration when the process's UCX context is created (first ``start``); ``configure_ucx_env`` sets
defaults there, each overridable by the environment:

- ``UCX_TLS``: ``sm,self,tcp`` (shared memory on one host, TCP across hosts). Multi-node InfiniBand needs a system
  UCX built with verbs (``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true``; the PyPI libucx has no IB) and
  ``UCX_TLS=rc,sm,self``.
- ``UCX_RNDV_FRAG_MEM_TYPE``: ``host`` (ucxx defaults to ``cuda`` staging, pointless without a GPU).
- ``UCX_CMA_SEG_SIZE``: ``4M``. Same-host rendezvous is a CMA ``process_vm_readv`` done by the receiver's worker
  progress; 4 MiB segments measured ~10 % faster than UCX's 512K default for 16 MiB chunks.
- ``UCX_NET_DEVICES``: with ``UcxTransport(host=ADDR)`` (a llumlet's ``--host``), the one network interface that
  holds ADDR (``lo`` for a loopback address), so UCX's TCP transport listens there only and the worker address it
  publishes names no other interface: by default UCX listens on every interface and a peer on another host may pick
  an address that is not routable from it (each host's own loopback, a docker bridge), and the first chunk then
  waits for its deadline. A wildcard host leaves UCX's default (all interfaces).

Device memory (``UcxTransport(device="cuda:N")``): chunks are torch CUDA tensors (anything with
``__cuda_array_interface__``), sent and landed by UCX without touching host memory: ``cuda_ipc`` between processes on
one node (NVLink/PCIe peer copies; the processes must share an IPC namespace), GPUDirect RDMA over ``rc`` with a
system UCX built with verbs. The defaults then become ``UCX_TLS=cuda_ipc,cuda_copy,sm,self,tcp`` (``rc,`` first when
``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY`` is true) and UCX's own rendezvous fragment memory type. ``start`` makes the
device's CUDA context current on the event loop's thread, where every UCX call (and the ``cuda_ipc`` rkey unpacking,
UCX >= 1.20) happens. ucxx ignores CUDA streams: callers send only chunks whose producing kernel has finished (the
fusion pipeline waits for the gather's event). A device endpoint refuses host memory and a host endpoint device
memory, with a clear TransportError, rather than let UCX guess. The UCX context is per process: the first endpoint
started decides the configuration.

A timed-out operation cannot be cancelled individually through ucxx: its request and buffer stay referenced until the
peer completes it or the endpoint closes (bounded by the number of timeouts; keys are never reused). Closing the
transport cancels them all.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pyllumnix.data_plane.engine.device import import_torch, is_device_tensor, normalize_device
from pyllumnix.data_plane.transport.base import (
    DEFAULT_TIMEOUT_S,
    Bytes,
    Chunk,
    Expectation,
    ExpectingTransport,
    TransportClosed,
    TransportError,
    TransportTimeout,
    as_bytes_view,
    make_out_buffer,
)
from pyllumnix.infra.grpc_server import WILDCARD_HOSTS

UCX_ENV_DEFAULTS: dict[str, str] = {
    "UCX_TLS": "sm,self,tcp",
    "UCX_RNDV_FRAG_MEM_TYPE": "host",
    "UCX_CMA_SEG_SIZE": "4M",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}

RESCUE_INTERVAL_S = 0.1
"""While requests are in flight, the worker is also progressed this often (a safety net for a lost wake-up)."""

# Progress + arm rounds in one pass before yielding to the event loop (arm said BUSY each time: traffic is flowing).
_MAX_ROUNDS = 16


UCX_DEVICE_TLS = "cuda_ipc,cuda_copy,sm,self,tcp"
"""Same-node GPU-to-GPU over CUDA IPC, device<->host staging by cuda_copy, host chunks over sm/tcp."""


def default_ucx_tls(device: bool) -> str:
    """UCX_TLS default: host memory ``sm,self,tcp``; device memory adds ``cuda_ipc,cuda_copy``, and ``rc`` (GPUDirect
    RDMA) when a system UCX with verbs is preferred over the wheel's (which has none)."""
    if not device:
        return UCX_ENV_DEFAULTS["UCX_TLS"]
    system = os.environ.get("RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY", "").lower() in ("1", "true", "yes")
    return ("rc," if system else "") + UCX_DEVICE_TLS


_DEFAULTED: set[str] = set()
"""Variables ``configure_ucx_env`` set itself (not the user): a later call for device memory may replace them."""


def configure_ucx_env(tls: str | None = None, device: bool = False) -> None:
    """Sets UCX defaults before the UCX context exists; an explicit ``tls`` wins over the environment, and the
    environment over the defaults. Defaults set by an earlier host-memory call (``ucx_available`` makes one) are
    replaced by the device ones when a device endpoint configures UCX before the context exists."""
    defaults = dict(UCX_ENV_DEFAULTS, UCX_TLS=default_ucx_tls(device))
    if device:
        del defaults["UCX_RNDV_FRAG_MEM_TYPE"]  # host staging fragments would defeat device-to-device rendezvous
        if "UCX_RNDV_FRAG_MEM_TYPE" in _DEFAULTED:
            os.environ.pop("UCX_RNDV_FRAG_MEM_TYPE", None)
            _DEFAULTED.discard("UCX_RNDV_FRAG_MEM_TYPE")
    for name, value in defaults.items():
        if name not in os.environ or name in _DEFAULTED:
            os.environ[name] = value
            _DEFAULTED.add(name)
    if tls:
        os.environ["UCX_TLS"] = tls
        _DEFAULTED.discard("UCX_TLS")


_SIOCGIFADDR = 0x8915


def interface_of(host: str) -> str:
    """The name of the network interface that holds the IP address ``host`` (TransportError if none does): UCX
    selects network devices by interface name, not by address. Linux, IPv4 (each interface's primary address, read
    with the SIOCGIFADDR ioctl: no dependency for it)."""
    if host.startswith("127."):
        host = "127.0.0.1"  # the whole 127/8 is on the loopback interface
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(ifreq[20:24]) == host:
                return name
    raise TransportError(f"no network interface holds {host!r} (UCX binds interfaces by name; pass a local address)")


def restrict_ucx_to_host(host: str | None) -> None:
    """Sets ``UCX_NET_DEVICES`` to ``host``'s interface (an explicit environment value wins); a wildcard or no host
    leaves UCX's default, every interface."""
    if host is None or host in WILDCARD_HOSTS:
        return
    os.environ.setdefault("UCX_NET_DEVICES", interface_of(host))


def make_cuda_context_current(device: str) -> None:
    """Binds ``device``'s primary CUDA context to the calling thread (UCX's CUDA transports use the current one)."""
    torch = import_torch()
    torch.cuda.set_device(torch.device(device))
    torch.empty(1, device=device).fill_(0)  # forces the primary context into existence on this thread
    torch.cuda.synchronize(device)


def import_ucxx() -> ModuleType:
    """Imports ucxx's core (Cython) API; raises TransportError if it is missing or its native libraries fail."""
    try:
        from ucxx._lib import libucxx
    except Exception as e:  # ImportError, or OSError from the bundled libucx
        raise TransportError(f"ucxx unavailable: {e}") from e
    module: ModuleType = libucxx
    return module


@functools.cache
def _context(lib: ModuleType) -> Any:
    """The process's UCX context (one, as UCX intends: each transport gets its own worker on it)."""
    _CONTEXT_TLS.append(os.environ.get("UCX_TLS", ""))
    return lib.UCXContext(feature_flags=(lib.Feature.TAG, lib.Feature.WAKEUP))


_CONTEXT_TLS: list[str] = []
"""UCX_TLS when the process's context was created (it cannot change afterwards)."""


def _check_context_for_device() -> None:
    """A device endpoint in a process whose UCX context was made without CUDA transports cannot work."""
    if _CONTEXT_TLS and "cuda" not in _CONTEXT_TLS[0] and _CONTEXT_TLS[0] not in ("", "all"):
        raise TransportError(
            f"this process's UCX context was created with UCX_TLS={_CONTEXT_TLS[0]} (no CUDA transports); start "
            "device endpoints before host ones, or set UCX_TLS to include cuda_copy,cuda_ipc"
        )


def ucx_tag(nonce: str, key: str) -> int:
    """The 64-bit tag both sides derive for ``key`` at the endpoint with ``nonce``."""
    return int.from_bytes(hashlib.blake2b(f"{nonce}\0{key}".encode(), digest_size=8).digest(), "little")


def parse_ucx_address(address: str) -> tuple[str, bytes]:
    """``ucx://<nonce>@<hex>`` -> (nonce, worker address bytes)."""
    if not address.startswith("ucx://") or "@" not in address:
        raise TransportError(f"not a ucx address: {address[:40]!r}")
    nonce, _, hexaddr = address[len("ucx://") :].partition("@")
    try:
        return nonce, bytes.fromhex(hexaddr)
    except ValueError as e:
        raise TransportError(f"bad ucx address: {address[:40]!r}") from e


@dataclass
class _InFlight:
    """A posted UCX request, what it needs kept alive (buffer, endpoint) and the future its caller awaits."""

    request: Any
    future: asyncio.Future[None]
    keep: tuple[Any, ...]
    what: str


class UcxProgress:
    """Progresses one UCX worker from an asyncio event loop: on wake-ups and new requests only, never in a loop.

    The protocol ``ucp_worker_arm`` asks for: progress until arm succeeds (it returns BUSY while events wait), then
    sleep on the epoll fd. Every pass ends armed, and every request posted schedules a pass, so nothing in flight is
    ever left without a wake-up. Not thread-safe: all calls on the loop's thread."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, rescue_interval: float = RESCUE_INTERVAL_S):
        self._worker = worker
        self._loop = loop
        self._rescue_interval = rescue_interval
        self._inflight: list[_InFlight] = []
        self._pass: asyncio.Handle | None = None
        self._rescue: asyncio.TimerHandle | None = None
        self._closed = False
        worker.init_blocking_progress_mode()
        self._fd: int = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._on_wakeup)
        self.passes = 0  # progress passes run, for tests and diagnostics
        self.rescued = 0  # requests the rescue timer found completed (a wake-up that never came, or a starved loop)
        self.schedule()

    def submit(self, request: Any, what: str, *keep: Any) -> asyncio.Future[None]:
        """Tracks a posted request; the future completes (or fails with TransportError) when UCX finishes it. If the
        caller stops waiting, the request stays tracked (UCX may still write into ``keep``) until it ends or close."""
        if self._closed:
            raise TransportClosed("ucx endpoint closed")
        future: asyncio.Future[None] = self._loop.create_future()
        self._inflight.append(_InFlight(request, future, keep, what))
        self.schedule()
        return future

    def schedule(self) -> None:
        """Runs a progress pass soon (once, however often asked before it runs)."""
        if self._pass is None and not self._closed:
            self._pass = self._loop.call_soon(self._run)

    def _on_wakeup(self) -> None:
        self._run()

    def _run(self) -> None:
        if self._pass is not None:
            self._pass.cancel()
            self._pass = None
        if self._closed:
            return
        self.passes += 1
        for _ in range(_MAX_ROUNDS):
            self._worker.progress()
            self._complete()
            if self._worker.arm():
                break
        else:
            self.schedule()  # still busy: let other callbacks run, then continue
        self._set_rescue()

    def _complete(self) -> None:
        if not self._inflight:
            return
        still: list[_InFlight] = []
        for op in self._inflight:
            if not op.request.completed:
                still.append(op)
                continue
            if op.future.done():  # its caller gave up (timeout) or closed
                continue
            try:
                op.request.check_error()
            except Exception as e:
                op.future.set_exception(TransportError(f"{op.what}: {e}"))
            else:
                op.future.set_result(None)
        self._inflight = still

    def _set_rescue(self) -> None:
        waiting = any(not op.future.done() for op in self._inflight)
        if waiting and self._rescue is None:
            self._rescue = self._loop.call_later(self._rescue_interval, self._on_rescue)
        elif not waiting and self._rescue is not None:
            self._rescue.cancel()
            self._rescue = None

    def _on_rescue(self) -> None:
        self._rescue = None
        before = sum(not op.future.done() for op in self._inflight)
        self._run()
        self.rescued += before - sum(not op.future.done() for op in self._inflight)

    @property
    def inflight(self) -> int:
        """Requests UCX has not finished (including those whose caller gave up)."""
        return len(self._inflight)

    def close(self) -> None:
        """Stops watching the worker; requests still in flight fail with TransportClosed (the caller then cancels them
        in UCX and drops the worker)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        for handle in (self._pass, self._rescue):
            if handle is not None:
                handle.cancel()
        self._pass = self._rescue = None
        for op in self._inflight:
            if not op.future.done():
                op.future.set_exception(TransportClosed(f"{op.what}: endpoint closed"))


class UcxTransport(ExpectingTransport):
    kind = "ucx"

    def __init__(
        self,
        tls: str | None = None,
        rescue_interval: float = RESCUE_INTERVAL_S,
        device: str | None = None,
        host: str | None = None,
    ) -> None:
        """``device`` (``cuda[:N]``): chunks are device memory on that GPU (DeviceUnavailableError without one);
        None or ``cpu``: host memory. ``host``: the local address whose interface alone UCX's TCP transport uses
        (``UCX_NET_DEVICES``; the process's first started endpoint decides it)."""
        super().__init__()
        self._host = host
        self.device: str | None = None if device in (None, "cpu") else normalize_device(str(device))
        self._tls = tls
        self._rescue_interval = rescue_interval
        self._lib: ModuleType | None = None
        self._worker: Any = None
        self._progress: UcxProgress | None = None
        self._nonce = secrets.token_hex(6)
        self._address: str | None = None
        self._endpoints: dict[bytes, Any] = {}
        self._receives: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> str:
        if self._address is None:
            configure_ucx_env(self._tls, device=self.device is not None)
            restrict_ucx_to_host(self._host)
            lib = import_ucxx()
            try:
                if self.device is not None:
                    _check_context_for_device()
                    make_cuda_context_current(self.device)
                worker = lib.UCXWorker(_context(lib))
                progress = UcxProgress(worker, asyncio.get_running_loop(), self._rescue_interval)
                worker_address = worker.address.tobytes()
            except Exception as e:
                raise TransportError(f"ucx start failed: {e}") from e
            self._lib, self._worker, self._progress = lib, worker, progress
            self._address = f"ucx://{self._nonce}@{worker_address.hex()}"
        return self._address

    async def close(self) -> None:
        if self._address is None:
            return
        self._address = None
        self._fail_pending()
        endpoints, self._endpoints = self._endpoints, {}
        worker, self._worker = self._worker, None
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.close()
        try:
            worker.cancel_inflight_requests(period=10**8, max_attempts=1)
        except Exception:
            pass
        for ep in endpoints.values():
            try:
                ep.close_blocking(period=10**8, max_attempts=1)
            except Exception:
                pass

    @property
    def address(self) -> str:
        if self._address is None:
            raise TransportClosed("ucx endpoint not started")
        return self._address

    @property
    def progress(self) -> UcxProgress:
        if self._progress is None or self._address is None:
            raise TransportClosed("ucx endpoint not started")
        return self._progress

    def _started(self) -> tuple[ModuleType, UcxProgress]:
        if self._lib is None or self._progress is None or self._address is None:
            raise TransportClosed("ucx endpoint not started")
        return self._lib, self._progress

    def _check_memory(self, what: str, buf: object) -> None:
        """A device endpoint carries device memory only, a host endpoint host memory only."""
        on_device = is_device_tensor(buf)
        if self.device is not None and not on_device:
            raise TransportError(
                f"{what}: host memory given to a device UCX endpoint ({self.device}); stage it on the device, "
                "or use a host endpoint"
            )
        if self.device is None and on_device:
            raise TransportError(
                f"{what}: device memory given to a host-memory UCX endpoint; create it with device=... "
                "(or stage through host memory)"
            )

    def _device_out(self, nbytes: int, out: Any) -> Any:
        """The flat uint8 device tensor a device receive lands in (``out`` viewed, or a new one)."""
        torch = import_torch()
        if out is None:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if not out.is_contiguous():
            raise TransportError("out buffer must be contiguous")
        flat = out.reshape(-1).view(torch.uint8)
        if int(flat.numel()) != nbytes:
            raise TransportError(f"out buffer holds {int(flat.numel())} bytes, expected {nbytes}")
        return flat

    # --- receiving ---
    def expect(self, key: str, nbytes: int, out: Bytes | None = None) -> None:
        lib, progress = self._started()
        if key in self._expected:
            raise TransportError(f"{key!r} already expected")
        if out is not None:
            self._check_memory(f"expect {key!r}", out)
        buffer = make_out_buffer(nbytes, out) if self.device is None else self._device_out(nbytes, out)
        exp = Expectation(key, nbytes, buffer)
        from ucxx._lib.arr import Array

        request = self._worker.tag_recv(Array(exp.buffer), lib.UCXXTag(ucx_tag(self._nonce, key)))
        done = progress.submit(request, f"receive {key!r}", exp.buffer)
        done.add_done_callback(lambda f: _settle(exp, f))
        self._expected[key] = exp
        self._receives[key] = done

    def _forget(self, key: str) -> None:
        """A receive that did not complete stays posted in UCX (ucxx cannot cancel one request); its buffer stays
        referenced by the progress driver until a matching send lands or the transport closes."""
        done = self._receives.pop(key, None)
        if done is not None and not done.done():
            done.cancel()

    # --- sending ---
    def _endpoint(self, lib: ModuleType, worker_address: bytes) -> Any:
        ep = self._endpoints.get(worker_address)
        if ep is None:
            address = lib.UCXAddress.create_from_buffer(worker_address)
            ep = lib.UCXEndpoint.create_from_worker_address(self._worker, address, False)
            self._endpoints[worker_address] = ep
        return ep

    async def send(self, peer: str, key: str, chunk: Chunk, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        lib, progress = self._started()
        nonce, worker_address = parse_ucx_address(peer)
        self._check_memory(f"send {key!r}", chunk)
        view: Any = as_bytes_view(chunk) if self.device is None else self._device_out(_device_nbytes(chunk), chunk)
        from ucxx._lib.arr import Array

        try:
            ep = self._endpoint(lib, worker_address)
            request = ep.tag_send(Array(view), lib.UCXXTag(ucx_tag(nonce, key)))
        except Exception as e:
            self._endpoints.pop(worker_address, None)
            raise TransportError(f"send {key!r}: {e}") from e
        done = progress.submit(request, f"send {key!r}", view, ep)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError as e:
            # Without error handling the endpoint cannot tell us more; forget it so a later send reconnects.
            self._endpoints.pop(worker_address, None)
            raise TransportTimeout(f"send {key!r}: not done within {timeout:.3g}s (peer dead or not receiving)") from e


def _device_nbytes(chunk: Any) -> int:
    return int(chunk.numel() * chunk.element_size())


def _settle(exp: Expectation, done: asyncio.Future[None]) -> None:
    """Completes an expectation from its UCX receive's outcome."""
    if exp.future.done() or done.cancelled():
        return
    error = done.exception()
    if error is not None:
        exp.future.set_exception(error)
    else:
        exp.future.set_result(exp.buffer)
