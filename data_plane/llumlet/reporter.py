"""Streams this llumlet's load to the scheduler leader, following leadership changes.

The leader is whoever the etcd election names; its election value is a serialized ``SchedulerReplica`` (replica id
and gRPC address). When the leader changes, or its stream breaks, the reporter re-targets the new leader.

Neither an etcd outage nor a leader blip stops it: the stream to the last known leader goes on while etcd is away,
a broken stream is reopened (after a short pause, whatever the error), and the leader watch is reopened with backoff.
A stream is "broken" also when grpc cancels the call under the reporter (``await ReportLoad`` raises CancelledError
though nobody cancelled this task): before, that ended the stream task silently and the leader, hearing nothing,
stopped dispatching to the instance for good. A report that fails to build (an engine bug or race in ``load_pb``) is
warned about (rate-limited) and its tick skipped: were it raised into grpc's request iterator, grpc would cancel the
call. Ticks that keep failing send nothing, not even keep-alives: an instance that cannot tell its load goes stale.

What it sends costs the leader O(changed): every interval the llumlet's load is read, but a full ``InstanceLoad`` goes
out only when something in it changed since the last one this stream carried (``load_change_key``: everything but the
seq, the timestamp and the requests' output-token counters, which move every step while the blocks a request holds
change only once per block). An unchanged instance sends a ``LoadKeepAlive`` (its id and the seq of that snapshot)
every ``LOAD_KEEPALIVE_EVERY`` intervals instead, which the leader takes as "alive, load as last reported" without
rebuilding anything. The leader stops dispatching to an instance silent for ``dispatch_stale_after`` =
max(0.3 s, 6 intervals) (``control_plane/scheduler/cluster.py``); a keep-alive every 3 intervals leaves two more
before that, so a quiet but healthy instance never looks stale. Each new stream (a new leader, a reconnect) starts
with a full snapshot, so no leader is ever asked to confirm a snapshot it never saw; if it still holds another (a
snapshot throttled or lost, the instance re-registered meanwhile), it ends the stream and the next one starts full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator

import grpc

from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.infra.etcd.client import EtcdClient, raise_if_cancelling
from pyllumnix.infra.etcd.election import Election
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import admin_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

# An unchanged instance confirms its load every this many report intervals (see the module docstring for why 3).
LOAD_KEEPALIVE_EVERY = 3
# A report that keeps failing to build is warned about at most once per this many seconds (20 Hz ticks).
REPORT_WARN_EVERY_S = 10.0


def load_change_key(load: common_pb2.InstanceLoad) -> bytes:
    """What must differ for a load to be sent again: the snapshot without its seq, timestamp and the requests'
    output-token counters (the leader's admin views may lag those by less than one KV block of tokens)."""
    key = common_pb2.InstanceLoad()
    key.CopyFrom(load)
    key.ClearField("seq")
    key.ClearField("timestamp")
    for r in key.requests:
        r.ClearField("num_output_tokens")
    return key.SerializeToString(deterministic=True)


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
        self.reports_sent = 0  # full snapshots and keep-alives
        self.keepalives_sent = 0
        self.streams_ended = 0
        self.report_failures = 0  # ticks skipped because the load could not be read
        self._failures_warned = 0  # report_failures at the last warning
        self._warned_at = -math.inf
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
        """Keeps one stream to ``address`` open, reopening it after a short pause whatever ended it; only the
        cancellation of this task (a new leader, ``stop``) ends it."""
        instance = self.llumlet.instance_id
        while True:
            try:
                async with open_channel(address) as channel:
                    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                    await stub.ReportLoad(self._reports())
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # ours: a new leader or stop
                # grpc cancelled the call itself (e.g. its request iterator failed): a broken stream, not an end.
                log.warning("%s: load stream to %s was cancelled under the reporter; reopening", instance, address)
            except grpc.aio.AioRpcError as exc:
                raise_if_cancelling(exc)
                log.debug("%s: load stream to %s ended: %s", instance, address, exc.code().name)
            except Exception as exc:  # whatever broke this stream, the next one may work: never stop reporting
                log.warning("%s: load stream to %s failed: %r", instance, address, exc)
            else:
                log.debug("load stream to %s closed by the scheduler", address)
            self.streams_ended += 1
            await asyncio.sleep(self.interval_s * 4)

    async def _reports(self) -> AsyncGenerator[scheduler_pb2.ReportLoadRequest, None]:
        """One stream's messages: a full snapshot first and whenever the load changed, else a keep-alive every
        ``LOAD_KEEPALIVE_EVERY`` intervals."""
        sent_key: bytes | None = None
        sent_seq = 0
        quiet = 0  # intervals since the last message of this stream
        # The llumlet's load version when ``sent_key`` was last found current: while it stays, the key cannot have
        # changed, so the snapshot is neither built nor compared (most ticks of a quiet or steadily decoding instance).
        checked: object = None
        while True:
            try:
                version = self.llumlet.load_version()
                if version is None or version != checked:
                    load = self.llumlet.load_pb()
                    key = load_change_key(load)
                    checked = version
            except Exception as exc:  # raised into grpc's iterator it would cancel the call: skip this tick only
                self._report_failed(exc)
                await asyncio.sleep(self.interval_s)
                continue
            quiet += 1
            if key != sent_key:
                sent_key, sent_seq, quiet = key, load.seq, 0
                yield scheduler_pb2.ReportLoadRequest(load=load)
                self.reports_sent += 1
            elif quiet >= LOAD_KEEPALIVE_EVERY:
                quiet = 0
                keep_alive = scheduler_pb2.LoadKeepAlive(instance_id=self.llumlet.instance_id, seq=sent_seq)
                yield scheduler_pb2.ReportLoadRequest(keep_alive=keep_alive)
                self.reports_sent += 1
                self.keepalives_sent += 1
            await asyncio.sleep(self.interval_s)

    def _report_failed(self, exc: Exception) -> None:
        """Counts a tick whose load could not be read; warns at most every ``REPORT_WARN_EVERY_S`` (at 20 Hz a
        persistent failure would otherwise log 20 lines a second)."""
        self.report_failures += 1
        now = time.monotonic()
        if now - self._warned_at < REPORT_WARN_EVERY_S:
            return
        skipped = self.report_failures - self._failures_warned - 1
        self._warned_at, self._failures_warned = now, self.report_failures
        log.warning(
            "%s: could not read its load for a report (%r); tick skipped%s",
            self.llumlet.instance_id,
            exc,
            f" ({skipped} more since the last warning)" if skipped else "",
            exc_info=exc,
        )
