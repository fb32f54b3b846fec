"""One gRPC channel per peer address, reused across requests (channels are expensive; calls on them are cheap)."""

from __future__ import annotations

import grpc

from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import llumlet_pb2_grpc, scheduler_pb2_grpc


class ChannelPool:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
        return channel

    def llumlet(self, address: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        return llumlet_pb2_grpc.LlumletServiceStub(self.channel(address))

    def scheduler(self, address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channel(address))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
