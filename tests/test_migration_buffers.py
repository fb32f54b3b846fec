"""REVIEW19-2: a stage's chunk buffers went back to the coordinator's pool whatever happened. After a failure, a late
byte of the failed transfer (a TCP frame already being read, a posted UCX receive) or a gather still running in its
thread may still write into them, so a healthy migration reusing them failed its CRC (or, unchecked, took corrupt KV).
Now they return to the pool only after a success."""

from __future__ import annotations

import pytest

from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator, MigrationSettings
from pyllumnix.data_plane.transport import TransportError, make_transport


async def test_a_failed_stage_does_not_give_its_buffers_back_and_a_successful_one_does() -> None:
    source = make_transport("inproc")
    peer = make_transport("inproc")
    await source.start()
    await peer.start()
    settings = MigrationSettings(transfer_timeout_s=0.5, stall_timeout_s=0.5)
    engine = SimEngine("tiny", payload=False)
    coordinator = MigrationCoordinator(Llumlet(engine, "src"), source, settings)
    engine.add_request(RequestSpec("r", tuple(range(1, 40)), Sampling(8, ignore_eos=True)), 0.0)
    engine.step(0.0)  # the prompt's blocks are in use now
    blocks = engine.block_ids("r")[:2]
    try:
        assert coordinator._send_pool == []
        with pytest.raises(TransportError):  # nobody expects this stage: the send times out
            await coordinator._send_stage("m-failed/0", "inproc://nobody", blocks)
        assert coordinator._send_pool == [], "buffers of a failed stage went back to the pool"
        block_bytes = coordinator.llumlet.engine.block_bytes
        peer.expect("m-ok/0/0", 2 * block_bytes)
        await coordinator._send_stage("m-ok/0", peer.address, blocks)
        assert len(coordinator._send_pool) == 1
    finally:
        await source.close()
        await peer.close()
