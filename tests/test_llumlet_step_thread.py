"""A sim llumlet whose step writes a large KV payload keeps its event loop serving while the write runs.

The sim engine writes real bytes per token (``PayloadStore.fill``); at a 7B model's 512 KiB per token a long prefill
wrote hundreds of MiB, which took seconds of wall time in fresh memory. The llumlet ran the whole step in its event
loop, so nothing else ran meanwhile: lease keep-alives, load reports and AddRequest answers missed their deadlines
(12 lease losses in one 100-request run). The store now records in-order fills instead of writing them (payload.py),
so a prefill writes nothing until read; a large step's write still goes to a worker thread, for the fills the store
writes as arrays (into blocks a migration brought in). The event loop keeps ticking either way.

Real objects throughout: an in-process Llumlet with a SimEngine and a real output sink (gRPC). The bound compares the
event loop's worst tick delay with the prefill step's own measured duration, not with a fixed time, so a slow or
loaded host changes both alike.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from pyllumnix.data_plane.engine.payload import expected_block_bytes
from pyllumnix.data_plane.engine.profile import TINY, with_overrides
from pyllumnix.data_plane.engine.sim import SimEngine, SimStepPlan
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import THREAD_PAYLOAD_BYTES, Llumlet
from pyllumnix.protos.llumnix.v1 import common_pb2
from pyllumnix.tools.recording_sink import RecordingSink

BYTES_PER_TOKEN = 1 << 20  # 2x a 7B model's, so the prefill's write takes a clearly measurable time on any host
PROMPT_TOKENS = 480  # 480 MiB written by one step, into fresh memory
TICK_S = 0.005
WRITE_S = 0.5  # a large write's least duration in the probe below


def _request(rid: str, sink: RecordingSink, prompt_tokens: int, max_tokens: int) -> common_pb2.EngineRequest:
    assert sink.server is not None
    return common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=[(i % 200) + 1 for i in range(prompt_tokens)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=7, ignore_eos=True),
        frontend_address=sink.server.address,
    )


def _engine() -> SimEngine:
    return SimEngine(with_overrides(TINY, bytes_per_token=BYTES_PER_TOKEN), payload_spare_bytes=0)


class _WriteProbe(SimEngine):
    """Tells the test (thread-safely) when a large payload write starts and how long it took; a large write lasts
    at least ``WRITE_S``, as one into arrays would (the store's recorded fills take microseconds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(with_overrides(TINY, bytes_per_token=BYTES_PER_TOKEN), payload_spare_bytes=0)
        self.loop = loop
        self.started = asyncio.Event()
        self.write_s: list[float] = []
        self.write_started: list[float] = []  # time.monotonic() at each large write's start

    def write_step_payload(self, step: SimStepPlan) -> None:
        big = step.payload_bytes >= THREAD_PAYLOAD_BYTES
        t = time.monotonic()
        if big:
            self.write_started.append(t)
            self.loop.call_soon_threadsafe(self.started.set)
        super().write_step_payload(step)
        if big:
            time.sleep(max(0.0, WRITE_S - (time.monotonic() - t)))  # in the worker thread, as the real write runs
            self.write_s.append(time.monotonic() - t)


async def test_the_event_loop_keeps_ticking_while_a_large_prefill_payload_is_written(sink: RecordingSink) -> None:
    assert PROMPT_TOKENS * BYTES_PER_TOKEN >= 8 * THREAD_PAYLOAD_BYTES, "the prefill must be a large write"
    engine = _WriteProbe(asyncio.get_running_loop())
    llumlet = Llumlet(engine, "inst-big", heartbeat_s=None)
    step_s: list[float] = []  # each step's wall duration, as the llumlet measured it
    llumlet.after_step.append(lambda: step_s.append(llumlet.stats.last_step_duration))
    lags: list[float] = []
    reports: list[int] = []
    done = asyncio.Event()

    async def ticker() -> None:
        """Measures how late each short sleep wakes up, and reads the load (what the report loop does) each tick."""
        while not done.is_set():
            t = time.monotonic()
            await asyncio.sleep(TICK_S)
            lags.append(time.monotonic() - t - TICK_S)
            reports.append(len(llumlet.load_pb().requests))

    llumlet.start()
    tick = asyncio.get_running_loop().create_task(ticker())
    try:
        await asyncio.sleep(0.05)  # the ticker runs before the request arrives
        await llumlet.add_request(_request("big", sink, PROMPT_TOKENS, max_tokens=4))
        outs = await sink.wait("big", timeout=120)
        done.set()
        await tick
    finally:
        done.set()
        tick.cancel()
        await llumlet.stop()
    assert outs[-1].finished and outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(o.token_ids) for o in outs) == 4
    write_s = engine.write_s[0]  # the prefill's write, at least WRITE_S in the worker thread
    assert write_s >= WRITE_S and step_s[0] >= write_s, (write_s, step_s)
    max_lag = max(lags)
    # An inline write would stall the loop for the whole write, so the worst lag would be about WRITE_S. Threaded, the
    # loop only waits for the GIL between the write's releases (ms).
    assert max_lag < write_s / 4, f"event loop stalled {max_lag:.3f} s during a {write_s:.3f} s payload write"
    assert len(lags) >= 8, "the ticker kept running through the step"


async def test_add_request_answers_while_a_large_payload_is_written(sink: RecordingSink) -> None:
    """AddRequest only enqueues: it goes in during the write instead of waiting for the whole step (it used to wait
    for the engine lock, which the step holds, so a multi-second write meant a multi-second AddRequest)."""
    engine = _WriteProbe(asyncio.get_running_loop())
    llumlet = Llumlet(engine, "inst-add", heartbeat_s=None)
    llumlet.start()
    try:
        await llumlet.add_request(_request("big", sink, PROMPT_TOKENS, max_tokens=4))
        await asyncio.wait_for(engine.started.wait(), 60)
        # Timed from the write's start: a client whose AddRequest arrived then waited this long for its answer
        # (an event loop busy with the write would not even read it before the write ends).
        await llumlet.add_request(_request("small", sink, 8, max_tokens=3))
        add_s = time.monotonic() - engine.write_started[0]
        small = await sink.wait("small", timeout=60)
        big = await sink.wait("big", timeout=60)
    finally:
        await llumlet.stop()
    write_s = engine.write_s[0]  # the big prefill's (the small one's prefill is a large write too)
    assert add_s < write_s / 4, f"AddRequest took {add_s:.3f} s during a {write_s:.3f} s payload write"
    assert [sum(len(o.token_ids) for o in outs) for outs in (big, small)] == [4, 3]
    assert big[-1].finished and small[-1].finished
    assert not engine.request_ids() and engine.pool.num_free == engine.total_blocks, "no block leaked"


async def test_threaded_writes_give_the_same_tokens_and_bytes_as_the_inline_engine(sink: RecordingSink) -> None:
    """Same outputs, token for token, as the same engine stepped directly (whose step writes inline), and the
    threaded prefill write put the right bytes in every block."""
    engine, direct = _engine(), _engine()
    prompt = 40
    assert prompt * BYTES_PER_TOKEN >= THREAD_PAYLOAD_BYTES > BYTES_PER_TOKEN  # a threaded prefill, inline decodes
    llumlet = Llumlet(engine, "inst-same", heartbeat_s=None)
    payload_ok: list[bool] = []

    def after_prefill() -> None:
        if payload_ok:
            return
        ids = engine.block_ids("r")
        data = engine.read_blocks(ids)
        payload_ok.append(
            all(
                np.array_equal(
                    data[i],
                    expected_block_bytes("r", i, prompt, block_size=engine.block_size, bytes_per_token=BYTES_PER_TOKEN),
                )
                for i in range(len(ids))
            )
        )

    llumlet.after_step.append(after_prefill)
    llumlet.start()
    try:
        await llumlet.add_request(_request("r", sink, prompt, max_tokens=12))
        outs = await sink.wait("r", timeout=60)
    finally:
        await llumlet.stop()
    assert payload_ok == [True]
    direct.add_request(convert.spec_from_pb(_request("r", sink, prompt, max_tokens=12)), time.time())
    expected: list[int] = []
    while direct.has_work():
        for out in direct.step(time.time()).outputs:
            expected.extend(out.token_ids)
    got = [t for o in outs for t in o.token_ids]
    assert got == expected and len(got) == 12
