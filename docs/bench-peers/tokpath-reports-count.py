"""Counts the load-report messages of one sim llumlet decoding 30 requests, one engine step per report tick (ticks
run back to back, no gRPC): what the reporter on PYTHONPATH sends, full loads and keep-alives per second at 20 Hz.

    PYTHONPATH=<tree> .venv/bin/python docs/bench-peers/tokpath-reports-count.py
"""

from __future__ import annotations

import asyncio
import json
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
    version = llumlet.load_version
    ticks = 0

    def tick() -> Any:  # the reporter reads the version once per tick: one engine step per 50 ms tick
        nonlocal ticks
        ticks += 1
        engine.step(float(ticks))
        return version()

    llumlet.load_version = tick  # type: ignore[method-assign]
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
            }
        )
    )


asyncio.run(main())
