"""The drill's load: streams over the frontend's gRPC Generate with known prompts and seeds, and HTTP probes.

Every stream is one catalog entry (prompt token ids, seed, max_tokens): the sim engine's tokens are a deterministic
function of them, so each finished stream can be compared token for token with the reference run of its entry. The
drill talks to the frontend with plain grpc.aio stubs rather than the client library, so it sees exactly what a
client sees (every message, the final status, a dropped connection) with no retry in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc

from pyllumnix.infra import wire
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc
from pyllumnix.tools.drill.credentials import PLAINTEXT, Credentials
from pyllumnix.tools.drill.report import ProbeRecord, RequestRecord

Clock = Callable[[], float]


@dataclass(frozen=True)
class RequestSpec:
    catalog: str
    index: int
    prompt: tuple[int, ...]
    max_tokens: int
    seed: int


def make_catalog(
    name: str, size: int, seed: int, *, prompt_len: tuple[int, int], max_tokens: tuple[int, int], vocab: int = 32000
) -> list[RequestSpec]:
    """``size`` distinct requests drawn from ``seed`` (the same arguments always give the same catalog)."""
    rng = random.Random(f"{name}:{seed}")
    specs = []
    for i in range(size):
        n = rng.randint(*prompt_len)
        prompt = tuple(rng.randrange(1, vocab) for _ in range(n))
        specs.append(RequestSpec(name, i, prompt, rng.randint(*max_tokens), rng.randrange(1, 2**31)))
    return specs


class StreamClient:
    """Generate streams against one frontend over a few channels (one HTTP/2 connection carries at most so many)."""

    def __init__(
        self, address: str, clock: Clock, *, deadline: float, channels: int = 4, credentials: Credentials = PLAINTEXT
    ) -> None:
        self.address = address
        self.clock = clock
        self.deadline = deadline
        self.credentials = credentials
        self._channels = [credentials.channel(address, peer="frontend") for _ in range(channels)]
        self._stubs = [frontend_pb2_grpc.FrontendServiceStub(ch) for ch in self._channels]
        self._next = itertools.count()
        self.tag = uuid.uuid4().hex[:6]

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def stream(self, spec: RequestSpec, label: str) -> RequestRecord:
        """Runs one stream to its end or to the deadline; never raises for what the server does."""
        n = next(self._next)
        request_id = f"drill-{self.tag}-{label}-{n}"
        sampling = common_pb2.SamplingParams(max_tokens=spec.max_tokens, seed=spec.seed)
        request = frontend_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
        request.token_ids.ids.extend(spec.prompt)
        rec = RequestRecord(request_id, spec.catalog, spec.index, sent_at=self.clock())
        # The gRPC deadline is a backstop a little past the drill's own; the drill's timeout is what marks "hung".
        call = self._stubs[n % len(self._stubs)].Generate(
            request, timeout=self.deadline + 30, metadata=self.credentials.call_metadata()
        )
        last = rec.sent_at
        try:
            async with asyncio.timeout(self.deadline):
                async for msg in call:
                    now = self.clock()
                    self._accept(rec, msg, now, last)
                    last = now
            rec.status = "OK"
        except TimeoutError:
            rec.deadline_hit = True
            call.cancel()
        except grpc.aio.AioRpcError as exc:
            rec.status = exc.code().name
            rec.retry_after = _metadata(exc.trailing_metadata(), "retry-after")
            details = exc.details() or ""
            rec.error = f"{rec.error}; {details}" if rec.error and details not in rec.error else details or rec.error
        rec.ended_at = self.clock()
        return rec

    @staticmethod
    def _accept(rec: RequestRecord, msg: frontend_pb2.GenerateResponse, now: float, last: float) -> None:
        if msg.token_ids:
            if rec.first_token_at is None:
                rec.first_token_at = now
            else:
                rec.max_token_gap_s = max(rec.max_token_gap_s, now - last)
            if msg.first_token_index != len(rec.token_ids):
                rec.index_errors += 1
            rec.token_ids.extend(msg.token_ids)
        if msg.instance_id and (not rec.instances or rec.instances[-1] != msg.instance_id):
            rec.instances.append(msg.instance_id)
        if msg.finished:
            rec.finish_reason = wire.finish_label(msg.finish_reason) or "unspecified"


def _metadata(metadata: Any, key: str) -> str | None:
    """One value of a call's (trailing) metadata, None when absent."""
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


class OpenLoop:
    """Sends streams at ``rate`` per second (round robin over ``specs``) until stopped; keeps every record."""

    def __init__(self, client: StreamClient, specs: list[RequestSpec], rate: float, label: str) -> None:
        self.client = client
        self.specs = specs
        self.rate = rate
        self.label = label
        self._tasks: list[asyncio.Task[RequestRecord]] = []
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        start = time.monotonic()
        for i in itertools.count():
            spec = self.specs[i % len(self.specs)]
            self._tasks.append(asyncio.create_task(self.client.stream(spec, self.label)))
            delay = start + (i + 1) / self.rate - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(delay, 0.0))
            if self._stop.is_set():
                return

    def add(self, task: asyncio.Task[RequestRecord]) -> None:
        self._tasks.append(task)

    async def finish(self) -> list[RequestRecord]:
        """Stops sending and waits for every stream (each ends by the client's deadline at the latest)."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        return list(await asyncio.gather(*self._tasks))

    def in_flight(self) -> int:
        return sum(1 for t in self._tasks if not t.done())


async def burst(client: StreamClient, specs: list[RequestSpec], n: int) -> list[asyncio.Task[RequestRecord]]:
    """``n`` streams started at once (the tasks; the caller gathers them)."""
    return [asyncio.create_task(client.stream(specs[i % len(specs)], "burst")) for i in range(n)]


async def run_all(client: StreamClient, specs: list[RequestSpec], label: str) -> list[RequestRecord]:
    return list(await asyncio.gather(*(client.stream(s, label) for s in specs)))


class HttpProber:
    """Small non-streaming completions over the OpenAI HTTP API while a fault is active: each must succeed or be
    refused with a status (503 must carry Retry-After)."""

    def __init__(
        self,
        base_url: str,
        clock: Clock,
        *,
        interval: float = 0.5,
        timeout: float = 30.0,
        credentials: Credentials = PLAINTEXT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.records: list[ProbeRecord] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[ProbeRecord]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.records

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stop.is_set():
                task = asyncio.create_task(self._probe(session))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
            if self._inflight:
                await asyncio.gather(*self._inflight)

    async def _probe(self, session: aiohttp.ClientSession) -> None:
        body = {"prompt": [11, 22, 33, 44], "max_tokens": 4, "seed": 7}
        sent = self.clock()
        try:
            async with session.post(
                f"{self.base_url}/v1/completions",
                data=json.dumps(body),
                headers=self.credentials.http_headers,
                ssl=self.credentials.ssl_context() or True,
            ) as resp:
                text = await resp.text()
                error = "" if resp.status == 200 else text[:300]
                self.records.append(
                    ProbeRecord(sent, resp.status, resp.headers.get("Retry-After"), self.clock() - sent, error)
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.records.append(ProbeRecord(sent, 0, None, self.clock() - sent, f"{type(exc).__name__}: {exc}"))


async def probe_generate(address: str, spec: RequestSpec, timeout: float, credentials: Credentials = PLAINTEXT) -> bool:
    """One stream to the end: True when it finished (used to tell when full service is back)."""
    client = StreamClient(address, time.monotonic, deadline=timeout, channels=1, credentials=credentials)
    try:
        rec = await client.stream(spec, "probe")
    finally:
        await client.close()
    return rec.status == "OK" and rec.finish_reason in ("stop", "length")
