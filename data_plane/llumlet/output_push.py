"""Pushes request outputs to the frontends that own them, batched per engine step, in order per frontend.

Ordering matters across a migration: before a request's last stage commits on the destination, the source calls
``flush(frontend)`` so every token it produced reaches the frontend before the destination's first one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 2.0
PUSH_ATTEMPTS = 3


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


@dataclass
class _Sink:
    address: str
    channel: grpc.aio.Channel
    stub: frontend_pb2_grpc.OutputSinkServiceStub
    queue: list[common_pb2.RequestOutput] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class OutputPusher:
    """One sender task per frontend address; ``on_orphans`` gets request ids the frontend does not know (or that could
    not be delivered), so the llumlet can abort them and free their blocks."""

    def __init__(self, instance_id: str, on_orphans: Callable[[list[str]], None]) -> None:
        self._instance_id = instance_id
        self._on_orphans = on_orphans
        self._sinks: dict[str, _Sink] = {}
        self.pushed = 0

    def submit(self, frontend_address: str, outputs: list[common_pb2.RequestOutput]) -> None:
        if not outputs:
            return
        sink = self._sinks.get(frontend_address)
        if sink is None:
            channel = grpc.aio.insecure_channel(frontend_address)
            sink = _Sink(frontend_address, channel, frontend_pb2_grpc.OutputSinkServiceStub(channel))
            sink.idle.set()
            sink.task = asyncio.get_running_loop().create_task(self._run(sink), name=f"push-{frontend_address}")
            self._sinks[frontend_address] = sink
        sink.queue.extend(outputs)
        sink.idle.clear()
        sink.wake.set()

    async def flush(self, frontend_address: str, timeout: float = PUSH_TIMEOUT_S * PUSH_ATTEMPTS) -> None:
        sink = self._sinks.get(frontend_address)
        if sink is not None:
            await asyncio.wait_for(sink.idle.wait(), timeout)

    async def _run(self, sink: _Sink) -> None:
        while True:
            await sink.wake.wait()
            sink.wake.clear()
            while sink.queue:
                batch, sink.queue = sink.queue, []
                await self._send(sink, batch)
            sink.idle.set()

    async def _send(self, sink: _Sink, batch: list[common_pb2.RequestOutput]) -> None:
        request = frontend_pb2.PushOutputsRequest(instance_id=self._instance_id, outputs=batch)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                stop=stop_after_attempt(PUSH_ATTEMPTS),
                wait=wait_exponential(multiplier=0.05, max=0.5),
                reraise=True,
            ):
                with attempt:
                    reply = await sink.stub.PushOutputs(request, timeout=PUSH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("frontend %s unreachable (%s); aborting its requests", sink.address, exc.code().name)
            self._on_orphans(sorted({o.request_id for o in batch if not o.finished}))
            return
        self.pushed += len(batch)
        if reply.unknown_request_ids:
            self._on_orphans(list(reply.unknown_request_ids))

    async def close(self) -> None:
        for sink in self._sinks.values():
            if sink.task is not None:
                sink.task.cancel()
            await sink.channel.close()
        self._sinks.clear()
