"""How a watch treats a stream that breaks under it, against a real grpc.aio server speaking etcd's Watch API.

A member killed mid-stream can end the watch stream with INTERNAL "Internal error from Core" from grpc itself; the
watch must reconnect and resume (seen once in CI as a scheduler stepping down: "cannot watch the election key"). A
status that is the caller's to see (here INVALID_ARGUMENT) must still surface as an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.errors import EtcdRequestError
from pyllumnix.infra.etcd.watch import EventType, Watch
from pyllumnix.infra.grpc_server import RunningServer, start_server
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from pyllumnix.protos.third_party.etcd.api.mvccpb import kv_pb2


class FlakyWatch(rpc_pb2_grpc.WatchServicer):
    """Ends the first ``failures`` streams with ``code`` right after the create request; then serves one PUT."""

    def __init__(self, code: grpc.StatusCode, failures: int = 1) -> None:
        self.code = code
        self.failures = failures
        self.streams = 0
        self.start_revisions: list[int] = []

    async def Watch(
        self, request_iterator: AsyncIterator[rpc_pb2.WatchRequest], context: Any
    ) -> AsyncIterator[rpc_pb2.WatchResponse]:
        self.streams += 1
        create = (await anext(aiter(request_iterator))).create_request
        self.start_revisions.append(create.start_revision)
        if self.streams <= self.failures:
            await context.abort(self.code, "Internal error from Core")
        yield rpc_pb2.WatchResponse(created=True, header=rpc_pb2.ResponseHeader(revision=7))
        kv = kv_pb2.KeyValue(key=create.key, value=b"v", mod_revision=8)
        yield rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(revision=8), events=[kv_pb2.Event(kv=kv)])
        await asyncio.Event().wait()  # stays open until the client leaves


async def serve(servicer: FlakyWatch) -> RunningServer:
    return await start_server([(rpc_pb2_grpc.add_WatchServicer_to_server, servicer, "etcdserverpb.Watch")])


async def test_watch_reconnects_after_a_stream_broken_with_internal() -> None:
    servicer = FlakyWatch(grpc.StatusCode.INTERNAL)
    server = await serve(servicer)
    try:
        async with EtcdClient([server.address]) as client, Watch(client, b"k", start_revision=5) as watch:
            event = await asyncio.wait_for(anext(watch), 5)
            assert event.type is EventType.PUT and event.kv is not None and event.kv.key == b"k"
            assert watch.reconnects == 1 and servicer.streams == 2
            assert servicer.start_revisions == [5, 5]  # resumed from where it was, nothing skipped
    finally:
        await server.stop(None)


async def test_watch_surfaces_a_status_that_is_not_a_broken_stream() -> None:
    servicer = FlakyWatch(grpc.StatusCode.INVALID_ARGUMENT)
    server = await serve(servicer)
    try:
        async with EtcdClient([server.address]) as client, Watch(client, b"k") as watch:
            with pytest.raises(EtcdRequestError, match="INVALID_ARGUMENT"):
                await asyncio.wait_for(anext(watch), 5)
            assert servicer.streams == 1
    finally:
        await server.stop(None)
