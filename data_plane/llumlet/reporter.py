"""Streams this llumlet's load to the scheduler leader, following leadership changes.

The leader is whoever the etcd election names; its election value is a serialized ``SchedulerReplica`` (replica id
and gRPC address). When the leader changes, or its stream breaks, the reporter re-targets the new leader.

Neither an etcd outage nor a leader blip stops it: the stream to the last known leader goes on while etcd is away,
a broken stream is reopened (after a short pause, whatever the error), and the leader watch is reopened with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.infra.etcd.client import EtcdClient, raise_if_cancelling
from pyllumnix.infra.etcd.election import Election
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import admin_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


def leader_address(value: bytes) -> str:
    """The gRPC address in an election value (a serialized SchedulerReplica)."""
    replica = admin_pb2.SchedulerReplica()
    replica.ParseFromString(value)
    return replica.grpc_address


class LoadReporter:
    def __init__(self, llumlet: Llumlet, client: EtcdClient, layout: KeyLayout, interval_s: float = 0.05) -> None:
        self.llumlet = llumlet
        self.election = Election(client, layout.election_prefix())
        self.interval_s = interval_s
        self.leader: str | None = None
        self.reports_sent = 0
        self.streams_ended = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="load-reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        """Runs one stream per leader; a new leader cancels the old stream."""
        stream: asyncio.Task[None] | None = None
        backoff = 0.5
        while True:
            try:
                async for info in self.election.observe():
                    backoff = 0.5
                    address = leader_address(info.value) if info is not None else None
                    if address == self.leader and stream is not None and not stream.done():
                        continue
                    if stream is not None:
                        stream.cancel()
                    self.leader = address
                    stream = None
                    if address:
                        log.info("%s reports load to leader %s", self.llumlet.instance_id, address)
                        stream = asyncio.get_running_loop().create_task(self._stream_to(address))
            except asyncio.CancelledError:
                if stream is not None:
                    stream.cancel()
                raise
            except Exception as exc:  # etcd unreachable for a while: keep trying (the current stream goes on)
                log.warning("leader watch failed (%s); retrying in %.1f s", exc, backoff)
            else:
                log.debug("leader watch ended; reopening in %.1f s", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _stream_to(self, address: str) -> None:
        while True:
            try:
                async with open_channel(address) as channel:
                    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                    await stub.ReportLoad(self._reports())
            except grpc.aio.AioRpcError as exc:
                raise_if_cancelling(exc)
                log.debug("load stream to %s ended: %s", address, exc.code().name)
            except Exception as exc:  # whatever broke this stream, the next one may work: never stop reporting
                log.warning("load stream to %s failed: %r", address, exc)
            else:
                log.debug("load stream to %s closed by the scheduler", address)
            self.streams_ended += 1
            await asyncio.sleep(self.interval_s * 4)

    async def _reports(self) -> AsyncIterator[scheduler_pb2.ReportLoadRequest]:
        while True:
            yield scheduler_pb2.ReportLoadRequest(load=self.llumlet.load_pb())
            self.reports_sent += 1
            await asyncio.sleep(self.interval_s)
