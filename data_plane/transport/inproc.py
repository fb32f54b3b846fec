"""In-process transport: endpoints find each other in a per-process registry; no network.

For unit tests and the simulator. A chunk is copied once into the receiver's buffer (the sender may reuse its buffer
as soon as ``send`` returns, as with the real transports). An optional cost model (seconds per transfer, from its byte
count) lets the simulator charge a modelled network time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import numpy as np

from pyllumnix.data_plane.transport.base import (
    DEFAULT_TIMEOUT_S,
    BufferingTransport,
    Bytes,
    Chunk,
    Expectation,
    TransportClosed,
    TransportError,
    TransportTimeout,
    as_bytes_view,
    make_out_buffer,
)

_REGISTRY: dict[str, InprocTransport] = {}
_IDS = itertools.count()


class InprocTransport(BufferingTransport):
    kind = "inproc"

    def __init__(self, name: str | None = None, cost_fn: Callable[[int], float] | None = None) -> None:
        self._name = name
        self._cost_fn = cost_fn
        self._address: str | None = None
        super().__init__()

    async def start(self) -> str:
        if self._address is None:
            address = f"inproc://{self._name or f'ep{next(_IDS)}'}"
            if address in _REGISTRY:
                raise TransportError(f"address {address} already in use")
            _REGISTRY[address] = self
            self._address = address
        return self._address

    async def close(self) -> None:
        if self._address is not None:
            _REGISTRY.pop(self._address, None)
            self._address = None
        self._fail_pending()

    @property
    def address(self) -> str:
        if self._address is None:
            raise TransportClosed("inproc endpoint not started")
        return self._address

    async def send(self, peer: str, key: str, chunk: Chunk, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if self._address is None:
            raise TransportClosed("inproc endpoint not started")
        view = as_bytes_view(chunk)
        if self._cost_fn is not None:
            delay = self._cost_fn(view.nbytes)
            if delay > timeout:
                await asyncio.sleep(timeout)
                raise TransportTimeout(f"send {key!r}: modelled cost {delay:.3g}s exceeds {timeout:.3g}s")
            await asyncio.sleep(delay)
        target = _REGISTRY.get(peer)
        if target is None:
            raise TransportError(f"no inproc endpoint at {peer}")
        target._deliver(key, view, sender=self._address)

    def _deliver(self, key: str, view: memoryview, sender: str = "") -> None:
        exp = self._expected.get(key)
        if exp is None:
            claim = self._claim_early(key, view.nbytes, sender)  # counted before the copy is allocated
            if claim is not None:
                self._keep_early(key, np.frombuffer(view, dtype=np.uint8).copy(), sender, claim)
            return
        if exp.future.done():
            return
        if view.nbytes != exp.nbytes:
            exp.future.set_exception(TransportError(f"{key!r}: got {view.nbytes} bytes, expected {exp.nbytes}"))
            return
        exp.buffer[:] = np.frombuffer(view, dtype=np.uint8)
        exp.future.set_result(exp.buffer)

    def expect(self, key: str, nbytes: int, out: Bytes | None = None) -> None:
        if self._address is None:
            raise TransportClosed("inproc endpoint not started")
        if key in self._expected:
            raise TransportError(f"{key!r} already expected")
        exp = Expectation(key, nbytes, make_out_buffer(nbytes, out))
        self._expected[key] = exp
        early = self._take_early(key)
        if early is not None:
            self._deliver(key, early.data)
