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
max(0.3 s, 6 intervals) (``control_plane/scheduler/cluster.py``); a keep-alive every 3 intervals (3.5 at most while
busy, see below) leaves 2.5 more before that, so a healthy instance never looks stale. Each new stream (a new
leader, a reconnect) starts with a full snapshot, so no leader is ever asked to confirm a snapshot it never saw; if it
still holds another (a snapshot throttled or lost, the instance re-registered meanwhile), it ends the stream and the
next one starts full.

A decoding instance's load changes at most ticks only because its running requests' KV blocks grow (a request takes
a block every ``block_size`` tokens, so with ~30 requests one crosses a boundary nearly every step): before, that sent
a full snapshot at ~2/3 of all ticks, more messages than the instance's output stream and most of the leader's report
work. Such a change (``LoadKey.growth`` only: running requests' blocks and block demand grew, free blocks fell by
exactly the blocks they took) now goes out at most every ``GROWTH_REPORT_EVERY`` intervals, in place of the keep-alive
that would be due then; every other change (an admission, a finish, a preemption, the queue, a migration, the state)
still goes out at the next tick, with the growth so far. ``report_action`` is the whole rule. The snapshot itself
(~0.3 ms at 30 requests) is built only at ticks where that rule could send it: the llumlet's load version says
whether anything but growth changed since the last build (``LoadVersion.rest``), so growth alone waits for its tick.

A quiet instance (no request, no migration, nothing reserved: ``load_is_quiet``, the leader's own test) keeps alive
only every ``QUIET_KEEPALIVE_EVERY`` (20) intervals, 1 s at 50 ms (``control_plane/scheduler/cluster.py`` has the
leader's side and the bound it keeps): an idle llumlet spent about half its CPU on 6.7 keep-alives a second. The
period follows the last full load this stream sent, which is what the leader holds, so both ends agree on it. While
quiet the stream does not tick at all: it sleeps on the llumlet's ``load_changed`` signal until a keep-alive is due, so
work sent to a quiet instance (a request, a reservation) changes its load and goes out at once. A busy stream ticks
at the llumlet's own changes too: at the first one once an interval has passed since its last tick (every engine
step ends with one), so a stepping instance reads its load in the event loop's wake-up for the step, not in 20 of
its own a second; a timer ticks when no change comes (``BUSY_TICK_GRACE``, ``BUSY_MESSAGE_GRACE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc

from pyllumnix.data_plane.llumlet.llumlet import Llumlet, LoadVersion
from pyllumnix.infra.etcd.client import EtcdClient, raise_if_cancelling
from pyllumnix.infra.etcd.election import Election
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.framed import FramedCall
from pyllumnix.infra.load_cadence import QUIET_KEEPALIVE_EVERY, load_is_quiet
from pyllumnix.infra.security.runtime import open_channel, open_framed
from pyllumnix.protos.llumnix.v1 import admin_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

# An unchanged instance confirms its load every this many report intervals (see the module docstring for why 3).
LOAD_KEEPALIVE_EVERY = 3
# A report that keeps failing to build is warned about at most once per this many seconds (20 Hz ticks).
REPORT_WARN_EVERY_S = 10.0


# A change that is only running requests' KV-block growth is sent at most every this many intervals. A request takes
# a block every block_size (16) decode steps, so in 3 intervals (150 ms, ~3-4 steps of ~40 ms) each running request
# grows by at most one block: the leader's freeness lags by at most one block per running request, which is what a
# 50 ms report resolution already allows. Equal to the keep-alive period on purpose: a steadily decoding instance
# then sends one message per keep-alive period, like an idle one (the full load in place of the keep-alive); a longer
# period (e.g. 4) would send a keep-alive at 3 and the full load at 4, more messages than 3.
GROWTH_REPORT_EVERY = LOAD_KEEPALIVE_EVERY
# While the last full load sent was quiet, the stream reads the load only when the llumlet signals a change
# (``Llumlet.load_changed``) or a keep-alive is due: an asyncio wake-up costs ~0.15 ms of CPU here, so 20 a second were
# ~3 ms/s of an idle llumlet's ~11. Work sent to it (a request, a reservation) is reported at once. A llumlet without
# the signal is read every this many intervals (100 ms at 50 ms): work is reported within 2 intervals, well inside
# the dispatch_stale_after (6 intervals) the leader gives a quiet instance it dispatched to.
QUIET_TICK_EVERY = 2


# A busy stream ticks at the first change the llumlet signals (an engine step's end, an add, ...) once an interval has
# passed since its last tick, so its ticks ride on the engine loop's own wake-ups; when none comes, a timer ticks this
# many intervals late at the latest (a change between steps is reported at most 2 intervals after the last tick).
BUSY_TICK_GRACE = 1.0
# ... and a keep-alive (or held-back growth) goes out at most this many intervals after it became due: 3.5 intervals
# between messages (175 ms at 50 ms) at worst, against the leader's 6 (``dispatch_stale_after``), where a timer per
# tick sent them at 3. In between, any tick at a step end that finds the message due sends it.
BUSY_MESSAGE_GRACE = 0.5


@dataclass(frozen=True, slots=True)
class LoadKey:
    """What must differ for a load to be sent again, in two parts. ``growth``: free blocks, the running-block sums
    and each running request's (blocks, demand), in request order; ``rest``: everything else but the seq, the
    timestamp and the requests' output-token counters (the leader's admin views may lag those by less than one KV
    block of tokens), serialized."""

    rest: bytes
    growth: tuple[int, ...]


class ReportAction(enum.Enum):
    FULL = "full"
    KEEP_ALIVE = "keep_alive"
    NOTHING = "nothing"


_RUNNING = common_pb2.REQUEST_PHASE_RUNNING


def load_key(load: common_pb2.InstanceLoad) -> LoadKey:
    """The change key of a load (see ``LoadKey``)."""
    key = common_pb2.InstanceLoad()
    key.CopyFrom(load)
    key.ClearField("seq")
    key.ClearField("timestamp")
    key.ClearField("free_blocks")
    key.summary.ClearField("running_blocks")
    key.summary.ClearField("running_high_blocks")
    growth = [load.free_blocks, load.summary.running_blocks, load.summary.running_high_blocks]
    for r in key.requests:
        r.ClearField("num_output_tokens")
        if r.phase == _RUNNING:
            growth += (r.num_blocks, r.demand_blocks)
            r.ClearField("num_blocks")
            r.ClearField("demand_blocks")
    return LoadKey(key.SerializeToString(deterministic=True), tuple(growth))


def load_change_key(load: common_pb2.InstanceLoad) -> bytes:
    """The whole change key as bytes: equal for two loads exactly when their ``load_key``s are."""
    key = load_key(load)
    return len(key.rest).to_bytes(4, "big") + key.rest + ",".join(map(str, key.growth)).encode()


def only_grew(sent: LoadKey, current: LoadKey) -> bool:
    """True if ``current`` differs from ``sent`` only by running requests' block growth: the same requests in the same
    phases (``rest`` equal), none holding or needing fewer blocks, and the free blocks fallen by exactly the blocks
    they took (a free-block change with another cause, e.g. a reservation released, is not growth)."""
    if sent.rest != current.rest or len(sent.growth) != len(current.growth):
        return False
    took = 0
    old, new = sent.growth, current.growth
    for i in range(3, len(new), 2):
        grown = new[i] - old[i]
        if grown < 0 or (grown == 0 and new[i + 1] < old[i + 1]):
            return False
        took += grown
    return old[0] - new[0] == took


def report_action(
    sent: LoadKey | None,
    current: LoadKey,
    ticks_since_full: float,
    ticks_since_sent: float,
    keepalive_every: int = LOAD_KEEPALIVE_EVERY,
) -> ReportAction:
    """What one report tick sends. ``sent``: the key of this stream's last full load (None: none yet);
    ``ticks_since_*``: intervals since this stream's last full load / last message, this tick included;
    ``keepalive_every``: the keep-alive period of the last full load (``QUIET_KEEPALIVE_EVERY`` if it was quiet)."""
    if sent is None:
        return ReportAction.FULL
    if current != sent and (ticks_since_full >= GROWTH_REPORT_EVERY or not only_grew(sent, current)):
        return ReportAction.FULL
    if ticks_since_sent >= keepalive_every:
        return ReportAction.KEEP_ALIVE
    return ReportAction.NOTHING


def leader_address(value: bytes) -> str:
    """The gRPC address in an election value (a serialized SchedulerReplica)."""
    return leader_addresses(value)[0]


def leader_addresses(value: bytes) -> tuple[str, str]:
    """(gRPC address, framed load-report address or "") in an election value (a serialized SchedulerReplica)."""
    replica = admin_pb2.SchedulerReplica()
    replica.ParseFromString(value)
    return replica.grpc_address, replica.report_address


class LoadReporter:
    def __init__(
        self,
        llumlet: Llumlet,
        client: EtcdClient,
        layout: KeyLayout,
        interval_s: float = 0.05,
        *,
        framed: bool = True,
    ) -> None:
        self.llumlet = llumlet
        self.election = Election(client, layout.election_prefix())
        self.interval_s = interval_s
        # Stream over the leader's framed report address when its election value names one (the same messages
        # without gRPC's per-message CPU); False: always gRPC's ReportLoad.
        self.framed = framed
        self.framed_streams = 0  # streams opened over frames
        self.grpc_streams = 0  # streams opened over gRPC (no framed address offered, or it could not be reached)
        self.leader: str | None = None
        self.reports_sent = 0  # full snapshots and keep-alives
        self.keepalives_sent = 0
        self.streams_ended = 0
        self.report_failures = 0  # ticks skipped because the load could not be read
        self.intervals = 0.0  # report intervals the streams' ticks covered (a quiet tick covers several)
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
        target: tuple[str | None, str] = (None, "")  # the addresses ``stream`` reports to
        backoff = 0.5
        while True:
            try:
                async for info in self.election.observe():
                    backoff = 0.5
                    address, framed = leader_addresses(info.value) if info is not None else (None, "")
                    # (a leader restarted on its gRPC port has a new framed one: a new stream for it too)
                    if (address, framed) == target and stream is not None and not stream.done():
                        continue
                    target = (address, framed)
                    if stream is not None:
                        stream.cancel()
                    self.leader = address
                    stream = None
                    if address:
                        log.info(
                            "%s reports load to leader %s%s",
                            self.llumlet.instance_id,
                            address,
                            f" (framed at {framed})" if framed and self.framed else "",
                        )
                        stream = asyncio.get_running_loop().create_task(self._stream_to(address, framed))
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

    async def _stream_to(self, address: str, framed_address: str = "") -> None:
        """Keeps one stream to ``address`` open, reopening it after a short pause whatever ended it; only the
        cancellation of this task (a new leader, ``stop``) ends it. Over ``framed_address`` when the leader offers it
        and it can be reached (else over gRPC from then on: a firewall may let only the gRPC port through)."""
        instance = self.llumlet.instance_id
        while True:
            try:
                if self.framed and framed_address:
                    try:
                        call = await self._open_framed(framed_address)
                    except Exception as exc:  # unreachable, refused, a bad address: gRPC carries the same stream
                        log.warning(
                            "%s: the leader's framed load stream at %s cannot be reached (%s); reporting over gRPC",
                            instance,
                            framed_address,
                            exc,
                        )
                        framed_address = ""
                        continue
                    await self._report_framed(call)
                else:
                    async with open_channel(address, peer="scheduler") as channel:
                        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                        self.grpc_streams += 1
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

    async def _open_framed(self, address: str) -> FramedCall[scheduler_pb2.ReportLoadResponse]:
        call = await open_framed(
            address, scheduler_pb2.ReportLoadResponse, peer="scheduler", timeout=max(1.0, self.interval_s * 20)
        )
        self.framed_streams += 1
        return call

    async def _report_framed(self, call: FramedCall[scheduler_pb2.ReportLoadResponse]) -> None:
        """One framed stream: the reports written as ``_reports`` makes them, until the scheduler ends the stream
        (its status raised as ``AioRpcError``, as on gRPC) or a write fails."""

        async def write_all() -> None:
            async for report in self._reports():
                await call.write(report)

        loop = asyncio.get_running_loop()
        writer = loop.create_task(write_all(), name="framed-load-writer")
        reader = loop.create_task(call.read(), name="framed-load-reader")
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done and isinstance(writer.exception(), ConnectionError):
                # The scheduler ended the stream: its status frame usually precedes the close the write ran into.
                await asyncio.wait({reader}, timeout=1.0)
            if reader.done():
                reader.result()  # a status raises; an answer or a clean close ends the stream
                return
            writer.result()
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            call.cancel()

    async def _reports(self) -> AsyncGenerator[scheduler_pb2.ReportLoadRequest, None]:
        """One stream's messages, as ``report_action`` decides each tick: a full snapshot first, whenever the load
        changed (block growth alone at most every ``GROWTH_REPORT_EVERY`` intervals), else a keep-alive every
        ``LOAD_KEEPALIVE_EVERY`` intervals (``QUIET_KEEPALIVE_EVERY`` while the last full load sent was quiet)."""
        sent_key: LoadKey | None = None
        sent_seq = 0
        keepalive_every = LOAD_KEEPALIVE_EVERY  # the period of the last full load sent (its quietness)
        # Intervals since this stream's last full load / last message (fractions after a quiet wait a change ended).
        since_full = since_sent = 0.0
        step = 1.0  # intervals since the previous tick
        # Set by the llumlet whenever its load may have changed; while the last full load sent was quiet the stream
        # sleeps on it (until the next keep-alive is due) instead of reading the load every few intervals. None: the
        # llumlet cannot signal, so a quiet stream reads every QUIET_TICK_EVERY intervals.
        changed: asyncio.Event | None = getattr(self.llumlet, "load_changed", None)
        # The llumlet's load version when ``key`` was last built: while it stays, the key cannot have changed, so the
        # snapshot is neither built nor compared (most ticks of a quiet instance). While only its ``growth`` moved,
        # the key only grew since (``only_grew``), which ``report_action`` holds back until growth is due: the build
        # waits for that tick too (most ticks of a steadily decoding instance). Same messages as building every tick.
        checked: LoadVersion | None = None
        load: common_pb2.InstanceLoad | None = None
        key: LoadKey | None = None
        while True:
            built = False
            if changed is not None and keepalive_every == QUIET_KEEPALIVE_EVERY:
                changed.clear()  # before reading: whatever changes from here on ends the next quiet wait
            try:
                version = self.llumlet.load_version()
                if (
                    version is None
                    or checked is None
                    or load is None
                    or version.rest != checked.rest
                    or (version.growth != checked.growth and since_full + step >= GROWTH_REPORT_EVERY)
                ):
                    built = True
                    load = self.llumlet.load_pb()
                    key = load_key(load)
                    checked = version
            except Exception as exc:  # raised into grpc's iterator it would cancel the call: skip this tick only
                self._report_failed(exc)
                await asyncio.sleep(self.interval_s)
                continue
            assert load is not None and key is not None
            since_full += step
            since_sent += step
            self.intervals += step
            action = report_action(sent_key, key, since_full, since_sent, keepalive_every)
            if action is ReportAction.FULL:
                if not built:  # built ticks ago and held back as growth only; unchanged since: the load as of now
                    load.timestamp = time.time()
                sent_key, sent_seq, since_full, since_sent = key, load.seq, 0.0, 0.0
                keepalive_every = QUIET_KEEPALIVE_EVERY if load_is_quiet(load) else LOAD_KEEPALIVE_EVERY
                yield scheduler_pb2.ReportLoadRequest(load=load)
                self.reports_sent += 1
            elif action is ReportAction.KEEP_ALIVE:
                since_sent = 0.0
                keep_alive = scheduler_pb2.LoadKeepAlive(instance_id=self.llumlet.instance_id, seq=sent_seq)
                yield scheduler_pb2.ReportLoadRequest(keep_alive=keep_alive)
                self.reports_sent += 1
                self.keepalives_sent += 1
            if keepalive_every != QUIET_KEEPALIVE_EVERY:
                if changed is not None and self.interval_s > 0:
                    step = await self._busy_wait(changed, since_sent, keepalive_every)
                else:
                    step = 1.0
                    await asyncio.sleep(self.interval_s)
            elif changed is not None:
                step = await self._quiet_wait(changed, QUIET_KEEPALIVE_EVERY - since_sent)
            else:
                step = QUIET_TICK_EVERY
                await asyncio.sleep(self.interval_s * step)

    async def _busy_wait(self, changed: asyncio.Event, since_sent: float, keepalive_every: int) -> float:
        """Waits for the next tick of a busy stream and returns the intervals that passed (>= 1): the first change
        the llumlet signals once an interval passed (every engine step signals at its end), or, when none comes, a
        timer ``BUSY_TICK_GRACE`` intervals later, and never past ``BUSY_MESSAGE_GRACE`` intervals after a message
        became due (the keep-alive deadline, so the leader's staleness bound keeps its margin). So a stepping
        instance reads its load right after a step, in the event loop's wake-up for that step, instead of in 20
        wake-ups of its own a second (each ~0.15 ms of CPU here), and its writes overlap the next step's work."""
        interval = self.interval_s
        started = time.monotonic()
        due = started + interval
        latest = min(
            due + BUSY_TICK_GRACE * interval,
            started + max(1.0, keepalive_every + BUSY_MESSAGE_GRACE - since_sent) * interval,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(latest - started):
                while True:
                    changed.clear()
                    await changed.wait()
                    if time.monotonic() >= due:
                        break
        return max(1.0, (time.monotonic() - started) / interval)

    async def _quiet_wait(self, changed: asyncio.Event, intervals: float) -> float:
        """Sleeps until ``intervals`` report intervals passed (the keep-alive is due) or the llumlet signals a change,
        whichever is first; returns the intervals that passed (all of them when the time ran out)."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, self.interval_s * intervals)):
                await changed.wait()
        except TimeoutError:
            return intervals
        return (time.monotonic() - started) / self.interval_s if self.interval_s > 0 else 0.0

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
