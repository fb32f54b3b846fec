"""What the drill's stream client records from a real gRPC stream (a fake frontend in-process), and how those records
are judged: a clean stream, a stream with a repeated token index, an ERROR final message with its status, a stream
that ends OK with no final message, a server that never answers (the drill's deadline), a refusal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from pyllumnix.tools.drill.load import OpenLoop, RequestSpec, StreamClient, make_catalog
from pyllumnix.tools.drill.report import ERROR, FINISHED, HUNG, LOST, ErrorPolicy, classify
from pyllumnix.tools.drill.scenarios import AllowedErrors

TOKENS = [3, 1, 4, 1, 5]


class FakeFrontend(frontend_pb2_grpc.FrontendServiceServicer):
    """Behaves as the first prompt token says: 1 clean, 2 repeated index, 3 ERROR, 4 no final message, 5 silent,
    6 refused with RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.seen: list[frontend_pb2.GenerateRequest] = []

    async def Abort(
        self, request: frontend_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.AbortResponse:
        return frontend_pb2.AbortResponse()

    async def Generate(
        self, request: frontend_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[frontend_pb2.GenerateResponse]:
        self.seen.append(request)
        mode = request.token_ids.ids[0]
        rid = request.request_id
        if mode == 6:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the cluster is full", (("retry-after", "2"),))
        if mode == 5:
            await asyncio.sleep(30)
        yield frontend_pb2.GenerateResponse(request_id=rid, token_ids=TOKENS[:2], first_token_index=0, instance_id="a")
        if mode == 2:
            yield frontend_pb2.GenerateResponse(request_id=rid, token_ids=TOKENS[1:3], first_token_index=1)
        if mode == 3:
            yield frontend_pb2.GenerateResponse(
                request_id=rid, finished=True, finish_reason=common_pb2.FINISH_REASON_ERROR, instance_id="b"
            )
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("instance b was lost")
            return
        if mode == 4:
            return
        yield frontend_pb2.GenerateResponse(
            request_id=rid,
            token_ids=TOKENS[2:],
            first_token_index=2,
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            instance_id="b",
        )


@pytest.fixture
async def frontend() -> AsyncIterator[tuple[str, FakeFrontend]]:
    server = grpc.aio.server()
    fake = FakeFrontend()
    frontend_pb2_grpc.add_FrontendServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        await server.stop(0)


def spec(mode: int) -> RequestSpec:
    return RequestSpec("stream", mode, (mode, 9, 9), max_tokens=5, seed=42)


async def test_stream_records_and_their_verdicts(frontend: tuple[str, FakeFrontend]) -> None:
    address, fake = frontend
    client = StreamClient(address, time.monotonic, deadline=1.0, channels=2)
    try:
        clean, repeated, error, unfinished, silent, refused = await asyncio.gather(
            *(client.stream(spec(m), "t") for m in range(1, 7))
        )
    finally:
        await client.close()
    policy = ErrorPolicy()

    assert (clean.status, clean.finish_reason, clean.token_ids, clean.index_errors) == ("OK", "length", TOKENS, 0)
    assert clean.instances == ["a", "b"] and clean.first_token_at is not None and clean.ended_at is not None
    c = classify(clean, TOKENS, policy)
    assert (c.outcome, c.altered) == (FINISHED, False)

    assert repeated.index_errors >= 1  # the repeated message, and every message after it is off by one
    assert classify(repeated, TOKENS, policy).altered

    assert (error.status, error.finish_reason, error.error) == ("INTERNAL", "error", "instance b was lost")
    c = classify(error, TOKENS, ErrorPolicy(AllowedErrors.KILLED_INSTANCE, ("b",)))
    assert (c.outcome, c.allowed, c.altered) == (ERROR, True, False)

    assert (unfinished.status, unfinished.finish_reason) == ("OK", None)
    assert classify(unfinished, TOKENS, policy).outcome == LOST

    assert silent.deadline_hit and silent.status == ""
    assert classify(silent, TOKENS, policy).outcome == HUNG
    assert silent.ended_at is not None and silent.ended_at - silent.sent_at < 5

    assert (refused.status, refused.error, refused.first_token_at) == (
        "RESOURCE_EXHAUSTED",
        "the cluster is full",
        None,
    )
    assert classify(refused, TOKENS, ErrorPolicy(AllowedErrors.OVERLOAD_REJECT)).allowed

    # The request carries the catalog entry exactly: token ids, seed, max_tokens; ids are unique.
    first = next(r for r in fake.seen if r.token_ids.ids[0] == 1)
    assert list(first.token_ids.ids) == [1, 9, 9]
    assert (first.sampling.seed, first.sampling.max_tokens) == (42, 5)
    assert len({r.request_id for r in fake.seen}) == len(fake.seen) == 6


async def test_open_loop_sends_at_its_rate_and_waits_for_every_stream(frontend: tuple[str, FakeFrontend]) -> None:
    address, fake = frontend
    client = StreamClient(address, time.monotonic, deadline=5.0)
    load = OpenLoop(client, [spec(1), spec(2)], rate=20.0, label="t")
    try:
        load.start()
        await asyncio.sleep(0.5)
        records = await load.finish()
    finally:
        await client.close()
    assert 5 <= len(records) <= 15
    assert all(r.ended_at is not None for r in records)
    assert [r.index for r in records[:4]] == [1, 2, 1, 2]
    assert len(fake.seen) == len(records)


def test_catalog_is_deterministic_and_within_bounds() -> None:
    a = make_catalog("stream", 8, 3, prompt_len=(4, 6), max_tokens=(2, 3), vocab=50)
    assert a == make_catalog("stream", 8, 3, prompt_len=(4, 6), max_tokens=(2, 3), vocab=50)
    assert a != make_catalog("stream", 8, 4, prompt_len=(4, 6), max_tokens=(2, 3), vocab=50)
    assert a != make_catalog("burst", 8, 3, prompt_len=(4, 6), max_tokens=(2, 3), vocab=50)
    for s in a:
        assert 4 <= len(s.prompt) <= 6 and 2 <= s.max_tokens <= 3 and all(0 < t < 50 for t in s.prompt)
    assert [s.index for s in a] == list(range(8))
