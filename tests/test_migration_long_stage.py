"""A stage whose bytes keep arriving for longer than the destination's pending timeout is not "a silent source".

Found with ``llumnix bench migration`` beside a CPU hog: an 8k-token stage 0 (4 GiB) outlived the destination's
pending timeout (10 s) while its chunks kept landing; the reaper, which only counted control calls as signs of life,
freed the reservation mid-transfer, so the source's next UCX send matched no posted receive and sat until the stage
deadline (49.5 s) with both processes alive. Here: two in-process llumlets, a stage of three one-block chunks each
costing 0.2 s on the wire (the in-process transport's cost model), a 0.4 s pending timeout."""

from __future__ import annotations

from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings
from pyllumnix.protos.llumnix.v1 import llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import (
    Delay,
    make_node,
    migrate,
    request,
    settle,
    unmigrated_tokens,
    wait_tokens,
)

BLOCK_BYTES = 16 * 2048  # the tiny profile: 16 tokens a block, 2 KiB a token
PENDING_TIMEOUT_S = 0.4


async def test_stage_longer_than_pending_timeout_commits_while_bytes_flow(sink: RecordingSink) -> None:
    settings = MigrationSettings(
        pending_timeout_s=PENDING_TIMEOUT_S, transfer_timeout_s=30, chunk_bytes=BLOCK_BYTES, verify_crc=True
    )
    a = await make_node("a", delay=Delay(0.2), settings=settings)
    b = await make_node("b", settings=settings)
    try:
        # 3 blocks: one stage (at most 4 blocks go in the stop-and-copy stage at once), 3 chunks of 0.2 s
        await a.stub.AddRequest(request("r", sink, 48, 460))
        await wait_tokens(sink, "r", 1)
        result = (await a.stub.MigrateOut(migrate(a, b, "r"))).results[0]
        assert result.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert result.total_ms > PENDING_TIMEOUT_S * 1000  # the stage did outlive the pending timeout
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(48, 460)
        assert sink.raw_indices("r") == list(range(460))
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()
