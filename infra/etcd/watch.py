"""A key-range watch as an async iterator that survives member failures and compactions.

After a stream failure it reopens on the next endpoint from ``last revision + 1``, so no event is lost or repeated.
When that revision was compacted away (etcd cancels the watcher with ``compact_revision`` > 0), events in between
are gone for good: the watch then reads the whole range and emits one ``RESYNC`` event carrying the snapshot, from
which a consumer rebuilds its state, and follows on from the snapshot's revision.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import grpc

from pyllumnix.infra.etcd.client import (
    REQUIRE_LEADER,
    EtcdClient,
    KeyValue,
    RangeResult,
    describe,
    is_transient,
    raise_if_cancelling,
    to_bytes,
    translate,
)
from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.infra.etcd.keys import prefix_range_end
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2
from pyllumnix.protos.third_party.etcd.api.mvccpb import kv_pb2

log = logging.getLogger(__name__)

# Besides the transient codes, a watch stream torn down under it (its member killed mid-stream, a connection reset)
# ends with CANCELLED or with INTERNAL "Internal error from Core" from grpc itself: the watch reconnects (a read, safe
# to repeat) rather than failing. Anything else (bad range, auth) is the caller's to see.
STREAM_BROKEN_CODES = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL})


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"
    RESYNC = "resync"


@dataclass(frozen=True)
class WatchEvent:
    """A PUT/DELETE of ``kv`` at ``revision``, or a RESYNC whose ``snapshot`` is the whole range at ``revision``.

    A DELETE's ``kv`` has the key, an empty value and the deletion revision as ``mod_revision``.
    """

    type: EventType
    revision: int
    kv: KeyValue | None = None
    snapshot: tuple[KeyValue, ...] = ()


class Watch:
    """Watches ``[key, range_end)`` (``range_end`` empty: the single key).

    ``start_revision`` > 0 replays history from that revision; ``initial_snapshot`` first emits a RESYNC with the
    range's current contents and then follows changes after it (list-then-watch without a gap).
    """

    def __init__(
        self,
        client: EtcdClient,
        key: str | bytes,
        range_end: bytes = b"",
        *,
        start_revision: int = 0,
        initial_snapshot: bool = False,
    ) -> None:
        self.client = client
        self.key = to_bytes(key)
        self.range_end = range_end
        self.start_revision = start_revision
        self.initial_snapshot = initial_snapshot
        self.resyncs = 0
        self.reconnects = 0
        self._next_revision = start_revision
        self._closed = False
        self._call: Any = None
        self._gen = self._run()

    @property
    def next_revision(self) -> int:
        """The revision the watch resumes from after a failure (0: not known yet)."""
        return self._next_revision

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._gen.__anext__()

    def abort(self) -> None:
        """Ends the watch: cancels the open stream, so a reader blocked on it wakes up and the iteration stops.

        Cancelling the task that iterates is not enough on its own: grpc.aio does not always deliver a task's
        cancellation to a pending stream read, so whoever stops a watcher task calls this first.
        """
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    def _is_aborted(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        self.abort()
        if not getattr(self._gen, "ag_running", False):
            await self._gen.aclose()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _snapshot(self) -> RangeResult:
        """Reads the watched range, retrying through outages (a watch outlives any retry budget)."""
        while True:
            try:
                resp = await self.client.range(rpc_pb2.RangeRequest(key=self.key, range_end=self.range_end))
                return RangeResult([KeyValue.from_pb(kv) for kv in resp.kvs], resp.header.revision)
            except EtcdUnavailableError as exc:
                log.warning("watch %r: snapshot failed, retrying: %s", self.key, exc)
                await asyncio.sleep(0.2)

    async def _resync(self) -> WatchEvent:
        snap = await self._snapshot()
        self.resyncs += 1
        self._next_revision = snap.revision + 1
        return WatchEvent(EventType.RESYNC, snap.revision, snapshot=tuple(snap.kvs))

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        if self.initial_snapshot:
            yield await self._resync()
        backoff = 0.05
        while not self._is_aborted():
            index, stubs = self.client.pick()
            create = rpc_pb2.WatchCreateRequest(
                key=self.key, range_end=self.range_end, start_revision=self._next_revision, progress_notify=True
            )
            call = self._call = stubs.watch.Watch(metadata=REQUIRE_LEADER)
            resync = False
            try:
                await asyncio.wait_for(
                    call.write(rpc_pb2.WatchRequest(create_request=create)), self.client.call_timeout
                )
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("watch stream closed by the server")
                    if resp.compact_revision > 0:
                        log.info("watch %r: revision %d compacted, resyncing", self.key, self._next_revision)
                        resync = True
                        break
                    if resp.canceled:
                        raise ConnectionError(f"watch canceled by the server: {resp.cancel_reason}")
                    if resp.created:
                        if self._next_revision == 0:
                            self._next_revision = resp.header.revision + 1
                        backoff = 0.05
                        continue
                    if not resp.events:
                        # Progress notification: every event up to header.revision has been delivered.
                        self._next_revision = max(self._next_revision, resp.header.revision + 1)
                        continue
                    for ev in resp.events:
                        self._next_revision = ev.kv.mod_revision + 1
                        kind = EventType.PUT if ev.type == kv_pb2.Event.PUT else EventType.DELETE
                        yield WatchEvent(kind, ev.kv.mod_revision, KeyValue.from_pb(ev.kv))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._is_aborted() and (task is None or not task.cancelling()):
                    return  # abort() cancelled the stream
                raise
            except grpc.aio.AioRpcError as exc:
                if self._is_aborted():
                    return
                raise_if_cancelling(exc)
                if not is_transient(exc) and exc.code() not in STREAM_BROKEN_CODES:
                    raise translate("watch", exc) from exc
                log.debug("watch %r on %s failed: %s", self.key, stubs.address, describe(exc))
                self.client.failover(index)
            except (ConnectionError, TimeoutError, asyncio.InvalidStateError) as exc:
                # InvalidStateError: a write on a stream that the server already ended.
                log.debug("watch %r on %s failed: %s", self.key, stubs.address, exc)
                self.client.failover(index)
            finally:
                call.cancel()
                self._call = None
            if self._is_aborted():
                return
            if resync:
                yield await self._resync()
                continue
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


def watch_prefix(
    client: EtcdClient, prefix: str | bytes, *, start_revision: int = 0, initial_snapshot: bool = False
) -> Watch:
    """Watches every key under ``prefix``."""
    p = to_bytes(prefix)
    return Watch(client, p, prefix_range_end(p), start_revision=start_revision, initial_snapshot=initial_snapshot)
