"""The cluster config's migration knobs reach live migrations: the leader puts them on its MigrateOut orders, the
source applies them (0: its own flags) and passes the pending timeout to the destination in the handshake
(data_plane/llumlet/migration/order.py). Before, ``llmctl config set migration.max_stages`` (and the other three) was
stored and echoed but nothing live read it."""

from __future__ import annotations

import re
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings
from pyllumnix.data_plane.llumlet.migration.order import handshake_settings, order_settings
from pyllumnix.protos.llumnix.v1 import common_pb2, config_pb2, llumlet_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_migration_paths import (
    OUTCOME,
    Hooks,
    assert_stream_exact,
    make_node,
    migrate,
    request,
    settle,
    unmigrated_tokens,
    until,
    wait_tokens,
)
from tests.test_replica_leadership import FakeLeadership, make_replica

KNOBS = ["migration.max_stages", "migration.last_stage_max_blocks", "migration.transfer_timeout_ms",
         "migration.pending_timeout_ms"]  # fmt: skip


class _Store:
    """The config store's ``put`` without etcd."""

    async def put(self, value: config_pb2.ClusterConfig, expected_revision: int | None = None) -> int:
        return 9


async def test_a_config_change_changes_what_a_live_migration_uses(sink: RecordingSink) -> None:
    """Both llumlets run with their flags' defaults (4 blocks / 3 stages, 10 s timeouts). The cluster config says 1
    block / 1 stage: the request, grown by two blocks during stage 0, does not converge and the migration gives up
    (with the llumlets' own limits it committed); the timeouts are in force on the source, and the destination took
    the pending timeout from the handshake."""
    a, b = await make_node("a"), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks
    blocks: list[int] = []

    async def note_blocks() -> None:
        blocks.append(len(a.engine.block_ids("r")))

    async def grow() -> None:
        await until(lambda: len(a.engine.block_ids("r")) >= blocks[0] + 2, "the request to grow by two blocks")

    hooks.actions[("before_stage", 0)] = note_blocks
    hooks.actions[("before_stage", 1)] = grow
    replica, _ = make_replica((), [])
    replica.leadership = cast(Any, FakeLeadership())
    replica.config_store = cast(Any, _Store())
    for node in (a, b):
        iid = node.llumlet.instance_id
        replica.cluster.upsert(common_pb2.InstanceInfo(instance_id=iid, grpc_address=node.server.address))
    stubs = {"a": a.stub, "b": b.stub}
    replica._llumlet = lambda instance_id: cast(Any, stubs[instance_id])  # type: ignore[method-assign]
    try:
        wanted = config_pb2.MigrationConfig(
            max_stages=1, last_stage_max_blocks=1, transfer_timeout_ms=5000, pending_timeout_ms=700
        )
        await replica.set_config(config_pb2.ClusterConfig(migration=wanted), KNOBS, 0)
        await a.stub.AddRequest(request("r", sink, 100, 400))
        await wait_tokens(sink, "r", 1)
        await replica._order_migration(MigrateOrder("a", "b", Selection.LR))
        hooks.assert_all_ran()
        result = a.coordinator.results[-1]
        assert result.outcome == OUTCOME.MIGRATION_OUTCOME_ABORTED_BY_SOURCE, result
        assert re.fullmatch(r"no convergence after 1 stages \(\d+ blocks still to copy\)", result.reason), result.reason
        assert a.coordinator.settings.transfer_timeout_s == 5.0
        assert (a.coordinator.settings.pending_timeout_s, b.coordinator.settings.pending_timeout_s) == (0.7, 0.7)
        await sink.wait("r", timeout=60)
        assert sink.tokens("r") == unmigrated_tokens(100, 400)
        assert_stream_exact(sink, "r")
        await settle(a, b)
        assert (a.free, b.free) == (a.engine.total_blocks, b.engine.total_blocks)
    finally:
        await a.close()
        await b.close()


async def test_an_order_with_a_timeout_out_of_range_is_refused(sink: RecordingSink) -> None:
    a, b = await make_node("a"), await make_node("b")
    try:
        await a.stub.AddRequest(request("r", sink, 20, 50))
        order = migrate(a, b, "r")
        order.transfer_timeout_ms = 50
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await a.stub.MigrateOut(order)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "transfer_timeout_ms must be 0 (keep the llumlet's) or in [100, 600000], got 50" in str(
            caught.value.details()
        )
        assert a.coordinator.settings.transfer_timeout_s == 10.0 and not a.coordinator.busy
        await sink.wait("r", timeout=60)
    finally:
        await a.close()
        await b.close()


def test_an_order_without_knobs_keeps_the_llumlets_own() -> None:
    """An older leader (or a benchmark's direct order) sends zeros: the flags hold, nothing is passed on."""
    own = MigrationSettings(pending_timeout_s=0.5, transfer_timeout_s=2.0)
    limits, settings = order_settings(llumlet_pb2.MigrateOutRequest(), own)
    assert limits == own.limits and settings is own and settings.cluster_pending_timeout_ms == 0
    limits, settings = order_settings(llumlet_pb2.MigrateOutRequest(max_stages=7, pending_timeout_ms=900), own)
    assert (limits.max_stages, limits.last_stage_max_blocks) == (7, own.limits.last_stage_max_blocks)
    assert (settings.pending_timeout_s, settings.transfer_timeout_s, settings.cluster_pending_timeout_ms) == (
        0.9,
        2.0,
        900,
    )
    assert handshake_settings(llumlet_pb2.PreAllocateRequest(), own) is own
    with pytest.raises(ValueError, match="pending_timeout_ms must be 0"):
        handshake_settings(llumlet_pb2.PreAllocateRequest(pending_timeout_ms=10**7), own)


def test_a_default_cluster_config_leaves_the_llumlets_own_timeouts() -> None:
    """The two timeouts default to 0 in the cluster config: a leader's orders then carry 0 and a llumlet started with
    ``--transfer-timeout 5 --pending-timeout 1`` (as the process tests do, or an operator for large vLLM caches)
    keeps them. Before, every order carried 10000 ms and silently overrode both flags."""
    replica, _ = make_replica((), [])
    order = llumlet_pb2.MigrateOutRequest()
    replica._carry_migration_knobs(order)
    assert (order.transfer_timeout_ms, order.pending_timeout_ms) == (0, 0)
    own = MigrationSettings(pending_timeout_s=1.0, transfer_timeout_s=5.0)
    _, settings = order_settings(order, own)
    assert (settings.transfer_timeout_s, settings.pending_timeout_s) == (5.0, 1.0)
