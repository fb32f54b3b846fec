"""One gRPC channel per peer address, reused across requests (channels are expensive; calls on them are cheap).

A channel whose peer went away retries its connection with gRPC's exponential backoff (by default from 1 s up to
120 s), failing every call at once with UNAVAILABLE meanwhile: a llumlet restarted on the same port would be refused
for as long as the backoff lasts. So the backoff is kept short (RECONNECT_BACKOFF_MS), and a caller that got
UNAVAILABLE ``discard``s the channel: the next call dials afresh. A discarded channel is closed with a grace period,
so calls still in flight on it finish.
"""

from __future__ import annotations

import asyncio

import grpc

from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import llumlet_pb2_grpc

# (initial, max) reconnect backoff of the pool's channels, in ms.
RECONNECT_BACKOFF_MS = (100, 1000)
# Seconds a discarded channel stays open for the calls still on it.
DISCARD_GRACE_S = 5.0

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
)


class ChannelPool:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Discarded channels still closing (with a grace period for their calls), until they are closed.
        self._retired: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self.discarded = 0
        # address -> (its channel, a llumlet stub on it): a stub builds a callable per method of the service, which
        # costs more than the call it is made for (AddRequest once per request).
        self._llumlet_stubs: dict[str, tuple[grpc.aio.Channel, llumlet_pb2_grpc.LlumletServiceStub]] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, CHANNEL_OPTIONS, peer="llumlet")
        return channel

    def llumlet(self, address: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        """A stub on ``channel(address)``, the same object while that channel lives."""
        channel = self.channel(address)
        cached = self._llumlet_stubs.get(address)
        if cached is not None and cached[0] is channel:
            return cached[1]
        stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
        self._llumlet_stubs[address] = (channel, stub)
        return stub

    def discard(self, address: str, channel: grpc.aio.Channel | None = None) -> None:
        """Forgets the channel to ``address`` (only if it is still ``channel``, when given: one that failed, not a
        fresh one another caller opened since) and closes it once its calls had DISCARD_GRACE_S to finish."""
        current = self._channels.get(address)
        if current is None or (channel is not None and current is not channel):
            return
        del self._channels[address]
        self._llumlet_stubs.pop(address, None)
        self.discarded += 1
        task = asyncio.get_running_loop().create_task(current.close(grace=DISCARD_GRACE_S))
        self._retired[current] = task
        task.add_done_callback(lambda _: self._retired.pop(current, None))

    async def close(self) -> None:
        """Closes every channel now, discarded ones too (their grace ends with the pool)."""
        channels, self._channels = self._channels, {}
        retired, self._retired = self._retired, {}
        self._llumlet_stubs.clear()
        for channel in [*channels.values(), *retired]:
            await channel.close()
        for task in retired.values():
            task.cancel()
        await asyncio.gather(*retired.values(), return_exceptions=True)
