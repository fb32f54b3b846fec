"""The llumlet's load report, built in place (#20: no per-request message built apart and copied in), says exactly
what the per-request conversion says, with each request's frontend (none for a request this llumlet does not own)."""

from __future__ import annotations

import time

from pyllumnix.data_plane.engine.profile import get_profile
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.protos.llumnix.v1 import common_pb2


async def test_load_pb_matches_the_per_request_conversion_and_names_each_owners_frontend() -> None:
    engine = SimEngine(get_profile("tiny"), payload=False)
    llumlet = Llumlet(engine, "i")
    for i in range(5):
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id=f"r{i}",
                prompt_token_ids=list(range(1, 20 + 7 * i)),
                sampling=common_pb2.SamplingParams(max_tokens=50, ignore_eos=True),
                frontend_address=f"127.0.0.1:{5000 + i % 2}",
                priority=common_pb2.PRIORITY_HIGH if i == 3 else common_pb2.PRIORITY_NORMAL,
                arrival_time=100.0 + i,
            )
        )
    for _ in range(4):
        engine.step(time.time())
    del llumlet.owners["r4"]  # e.g. its owner left: its entry names no frontend
    pb = llumlet.load_pb()
    snap = engine.load()
    expected = [convert.request_load_to_pb(r) for r in snap.requests]
    for r in expected:
        owner = llumlet.owners.get(r.request_id)
        r.frontend_address = owner.frontend_address if owner is not None else ""
    assert list(pb.requests) == expected
    assert [r.frontend_address for r in pb.requests] == ["127.0.0.1:5000", "127.0.0.1:5001"] * 2 + [""]
    assert pb.summary == convert._summary(snap) and pb.summary.num_running_high + pb.summary.num_waiting_high == 1
    assert (pb.instance_id, pb.free_blocks, pb.num_running, pb.num_waiting) == (
        "i",
        snap.free_blocks,
        snap.num_running,
        snap.num_waiting,
    )
    bare = convert.load_to_pb(snap, "i", 1, 0.0)
    assert [r.frontend_address for r in bare.requests] == [""] * 5, "no lookup: no frontend"
