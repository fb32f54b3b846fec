"""UCX transport over ``ucxx``: worker-address endpoints, error handling off, tag send / worker-level tag receive.

Why this shape (see PLATFORM.md, "UCX"): listener endpoints force UCX peer error handling, and UCX then only uses
``tcp`` (~1 GiB/s on one host). Endpoints made from the peer's *worker address* with ``endpoint_error_handling=False``
use shared memory (``sm``: posix/sysv FIFOs, CMA rendezvous) at memcpy-class speed. The price: a send to a dead peer
never fails by itself, so every operation here is bounded by an application timeout (``asyncio.wait_for``) and peer
death is otherwise the caller's to detect (the registry lease).

Tags, not active messages: the receiver posts a tag receive on its *worker* straight into the expected buffer
(``ucxx.recv``), so it needs no endpoint back to the sender and the bytes land without a copy (rendezvous for large
chunks). The 64-bit tag is a hash of the receiving endpoint's nonce and the key; the published address is
``ucx://<nonce>@<worker address hex>``, so several endpoints may share one process's UCX worker.

UCX reads its configuration when the process's UCX context is created (first ``start``); ``configure_ucx_env`` sets
defaults there, each overridable by the environment:

- ``UCX_TLS``: ``sm,self,tcp`` (shared memory on one host, TCP across hosts). Multi-node InfiniBand needs a system
  UCX built with verbs (``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true``; the PyPI libucx has no IB) and
  ``UCX_TLS=rc,sm,self``.
- ``UCXPY_PROGRESS_MODE``: ``blocking`` (progress driven by the event loop from the worker's epoll fd; fastest here).
- ``UCX_RNDV_FRAG_MEM_TYPE``: ``host`` (ucxx defaults to ``cuda`` staging, pointless without a GPU).
- ``UCX_CMA_SEG_SIZE``: ``4M``. Same-host rendezvous is a CMA ``process_vm_readv`` done by the receiver's worker
  progress, one segment per progress call (UCX's default is 512K). With ``blocking`` progress each call is one trip
  through the event loop, so a 16 MiB chunk took 32 trips; with 4 MiB segments a 16 MiB transfer measured ~10 %
  faster (interleaved A/B, 8 runs each: best 11.5-12.4 vs 10.2-11.2 GiB/s) while one call still blocks the loop
  for only ~0.3 ms (16M measured the same as 4M).

A timed-out operation cannot be cancelled individually in ucxx: its request and buffer are parked until the peer
completes it or the process ends (bounded by the number of timeouts; keys are never reused).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import Coroutine
from types import ModuleType
from typing import Any

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

UCX_ENV_DEFAULTS: dict[str, str] = {
    "UCX_TLS": "sm,self,tcp",
    "UCXPY_PROGRESS_MODE": "blocking",
    "UCX_RNDV_FRAG_MEM_TYPE": "host",
    "UCX_CMA_SEG_SIZE": "4M",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}

# Operations that timed out, kept alive with their buffers (ucxx cannot cancel one request).
_PARKED: set[asyncio.Task[Any]] = set()


def configure_ucx_env(tls: str | None = None, progress_mode: str | None = None) -> None:
    """Sets UCX defaults before the UCX context exists; explicit arguments win over the environment."""
    for name, value in UCX_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if tls:
        os.environ["UCX_TLS"] = tls
    if progress_mode:
        os.environ["UCXPY_PROGRESS_MODE"] = progress_mode


def import_ucxx() -> ModuleType:
    """Imports ucxx; raises TransportError if it is missing or its native libraries fail to load."""
    try:
        import ucxx
    except Exception as e:  # ImportError, or OSError from the bundled libucx
        raise TransportError(f"ucxx unavailable: {e}") from e
    module: ModuleType = ucxx
    return module


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


def _park(task: asyncio.Task[Any]) -> None:
    _PARKED.add(task)
    task.add_done_callback(_PARKED.discard)


class UcxTransport(ExpectingTransport):
    kind = "ucx"

    def __init__(self, tls: str | None = None, progress_mode: str | None = None) -> None:
        super().__init__()
        self._tls = tls
        self._progress_mode = progress_mode
        self._ucxx: ModuleType | None = None
        self._nonce = secrets.token_hex(6)
        self._address: str | None = None
        self._endpoints: dict[bytes, Any] = {}
        self._recv_tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> str:
        if self._address is None:
            configure_ucx_env(self._tls, self._progress_mode)
            ucxx = import_ucxx()
            try:
                ucxx.continuous_ucx_progress()  # progress on this event loop (worker-level receives need it)
                worker_address = ucxx.get_worker_address().tobytes()
            except Exception as e:
                raise TransportError(f"ucx start failed: {e}") from e
            self._ucxx = ucxx
            self._address = f"ucx://{self._nonce}@{worker_address.hex()}"
        return self._address

    async def close(self) -> None:
        self._address = None
        self._fail_pending()
        endpoints, self._endpoints = self._endpoints, {}
        for ep in endpoints.values():
            try:
                await asyncio.wait_for(ep.close(period=10**8), 1.0)
            except Exception:
                pass

    @property
    def address(self) -> str:
        if self._address is None:
            raise TransportClosed("ucx endpoint not started")
        return self._address

    def _lib(self) -> ModuleType:
        if self._ucxx is None or self._address is None:
            raise TransportClosed("ucx endpoint not started")
        return self._ucxx

    # --- receiving ---
    def expect(self, key: str, nbytes: int, out: Bytes | None = None) -> None:
        ucxx = self._lib()
        if key in self._expected:
            raise TransportError(f"{key!r} already expected")
        exp = Expectation(key, nbytes, make_out_buffer(nbytes, out))
        self._expected[key] = exp
        self._recv_tasks[key] = _spawn(self._post_recv(ucxx, exp, ucx_tag(self._nonce, key)))

    @staticmethod
    async def _post_recv(ucxx: ModuleType, exp: Expectation, tag: int) -> None:
        try:
            await ucxx.recv(exp.buffer, tag)
        except Exception as e:
            if not exp.future.done():
                exp.future.set_exception(TransportError(f"receive {exp.key!r}: {e}"))
        else:
            if not exp.future.done():
                exp.future.set_result(exp.buffer)

    def _forget(self, key: str) -> None:
        """A receive that did not complete stays posted in UCX: its task is parked, not cancelled (see _park)."""
        task = self._recv_tasks.pop(key, None)
        if task is not None and not task.done():
            _park(task)

    # --- sending ---
    async def _endpoint(self, worker_address: bytes) -> Any:
        ep = self._endpoints.get(worker_address)
        if ep is None:
            ucxx = self._lib()
            ep = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(worker_address), endpoint_error_handling=False
            )
            ep = self._endpoints.setdefault(worker_address, ep)
        return ep

    async def _send(self, worker_address: bytes, view: memoryview, tag: int) -> None:
        ep = await self._endpoint(worker_address)
        await ep.send(view, tag=tag, force_tag=True)

    async def send(self, peer: str, key: str, chunk: Chunk, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._lib()
        nonce, worker_address = parse_ucx_address(peer)
        view = as_bytes_view(chunk)
        task = _spawn(self._send(worker_address, view, ucx_tag(nonce, key)))
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError as e:
            _park(task)
            # Without error handling the endpoint cannot tell us more; forget it so a later send reconnects.
            self._endpoints.pop(worker_address, None)
            raise TransportTimeout(f"send {key!r}: not done within {timeout:.3g}s (peer dead or not receiving)") from e
        except TransportError:
            raise
        except Exception as e:
            self._endpoints.pop(worker_address, None)
            raise TransportError(f"send {key!r}: {e}") from e


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)
