"""Counts the load-report messages of one sim llumlet decoding 30 requests, one engine step per report tick (ticks
run back to back, no gRPC): what the reporter on PYTHONPATH sends, full loads and keep-alives per second at 20 Hz,
and how often it builds the snapshot (``Llumlet.load_pb``) and that build's mean thread CPU.

    PYTHONPATH=<tree> .venv/bin/python docs/bench-peers/tokpath-reports-count.py
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

from pyllumnix.data_plane.engine.base import Phase
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.reporter import LoadReporter
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import common_pb2

TICKS = 300


async def main() -> None:
    engine = SimEngine("tiny", total_blocks=2000, payload=False)
    llumlet = Llumlet(engine, "i-1")
    for i in range(30):
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id=f"r{i}",
                prompt_token_ids=list(range(1, 30 + 3 * i)),
                sampling=common_pb2.SamplingParams(max_tokens=380, ignore_eos=True),
                frontend_address="127.0.0.1:1",
            )
        )
    engine.step(0.0)
    version, load_pb = llumlet.load_version, llumlet.load_pb
    ticks = builds = 0
    build_s = 0.0

    def tick() -> Any:  # the reporter reads the version once per tick: one engine step per 50 ms tick
        nonlocal ticks
        ticks += 1
        engine.step(float(ticks))
        return version()

    def counting() -> common_pb2.InstanceLoad:
        nonlocal builds, build_s
        builds += 1
        started = time.thread_time()
        pb = load_pb()
        build_s += time.thread_time() - started
        return pb

    llumlet.load_version = tick  # type: ignore[method-assign]
    llumlet.load_pb = counting  # type: ignore[method-assign]
    stream = LoadReporter(llumlet, cast(Any, object()), KeyLayout("c"), 0.0)._reports()
    fulls = keepalives = 0
    while ticks < TICKS:
        message = await anext(stream)
        if message.WhichOneof("report") == "load":
            fulls += 1
        else:
            keepalives += 1
    await stream.aclose()
    running = sum(1 for r in engine.load().requests if r.phase is Phase.RUNNING)
    print(
        json.dumps(
            {
                "ticks": ticks,
                "full_loads": fulls,
                "keepalives": keepalives,
                "full_loads_per_s_at_20hz": round(fulls / ticks * 20, 2),
                "messages_per_s_at_20hz": round((fulls + keepalives) / ticks * 20, 2),
                "running_at_end": running,
                "builds": builds,
                "builds_per_s_at_20hz": round(builds / ticks * 20, 2),
                "build_ms_mean": round(build_s / max(builds, 1) * 1e3, 3),
            }
        )
    )


asyncio.run(main())
