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
from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationSettings
from pyllumnix.data_plane.llumlet.migration.order import incoming_pending_timeout_s, order_settings
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
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
    (with the llumlets' own limits it committed); the transfer timeout is in force on the source, and the
    destination took the pending timeout from the handshake for that migration only."""
    a, b = await make_node("a"), await make_node("b")
    hooks = Hooks()
    a.coordinator.hooks = hooks
    blocks: list[int] = []

    async def note_blocks() -> None:
        blocks.append(len(a.engine.block_ids("r")))

    entry_timeouts: list[float] = []

    async def grow() -> None:
        entry_timeouts.extend(i.pending_timeout_s for i in b.coordinator._incoming.values())
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
            max_stages=1, last_stage_max_blocks=1, transfer_timeout_ms=5000, pending_timeout_ms=2000
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
        assert a.coordinator.settings.cluster_pending_timeout_ms == 2000 and entry_timeouts == [2.0]
        assert b.coordinator.settings.pending_timeout_s == 10.0  # the destination's own stays
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
    # The pending timeout is only passed on: it is the destination's (its own reaper never reads an order's).
    assert (settings.pending_timeout_s, settings.transfer_timeout_s, settings.cluster_pending_timeout_ms) == (
        0.5,
        2.0,
        900,
    )
    assert incoming_pending_timeout_s(llumlet_pb2.PreAllocateRequest(), 0.5) == 0.5
    with pytest.raises(ValueError, match="pending_timeout_ms must be 0"):
        incoming_pending_timeout_s(llumlet_pb2.PreAllocateRequest(pending_timeout_ms=10**7), 0.5)


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


def test_a_default_cluster_config_leaves_the_llumlets_own_stage_bounds() -> None:
    """REVIEW10 M3: the stage bounds default to 0 in the cluster config as well, so a llumlet started with
    ``--last-stage-max-blocks 16 --max-stages 8`` keeps them. Before, every order carried the config's 4/3."""
    replica, _ = make_replica((), [])
    order = llumlet_pb2.MigrateOutRequest()
    replica._carry_migration_knobs(order)
    assert (order.last_stage_max_blocks, order.max_stages) == (0, 0)
    limits, _ = order_settings(order, MigrationSettings(limits=MigrationLimits(16, 8)))
    assert (limits.last_stage_max_blocks, limits.max_stages) == (16, 8)


async def test_a_cluster_timeout_put_back_to_0_gives_the_llumlets_flags_back(sink: RecordingSink) -> None:
    """REVIEW10 M1: ``llmctl config set migration.transfer_timeout_ms 20000`` and later back to 0: the next order
    carries 0 and the llumlet runs with its flags again. Before, each order's settings were derived from the last
    order's, so 20 s (and the passed-on pending timeout) stuck until a restart."""
    flags = MigrationSettings(pending_timeout_s=1.0, transfer_timeout_s=5.0, verify_crc=True)
    a, b = await make_node("a", settings=flags), await make_node("b")
    try:
        order = migrate(a, b)
        order.transfer_timeout_ms, order.pending_timeout_ms = 20000, 20000
        await a.stub.MigrateOut(order)  # nothing to move: answered at once, with the order's settings applied
        assert (a.coordinator.settings.transfer_timeout_s, a.coordinator.settings.cluster_pending_timeout_ms) == (
            20.0,
            20000,
        )
        await a.stub.MigrateOut(migrate(a, b))
        assert a.coordinator.settings == flags and a.coordinator.flag_settings == flags
    finally:
        await a.close()
        await b.close()


def test_a_peers_pending_timeout_is_clamped_around_the_destinations_flag() -> None:
    """The destination's operator chose its --pending-timeout: a peer may ask for a tenth of it up to ten times it."""
    ask = llumlet_pb2.PreAllocateRequest
    assert incoming_pending_timeout_s(ask(pending_timeout_ms=100), 10.0) == 1.0
    assert incoming_pending_timeout_s(ask(pending_timeout_ms=600_000), 10.0) == 100.0
    assert incoming_pending_timeout_s(ask(pending_timeout_ms=3000), 10.0) == 3.0


async def test_one_source_sets_the_pending_timeout_of_its_own_reservation_only(sink: RecordingSink) -> None:
    """REVIEW10 M2: a source passing a short pending timeout (a compromised peer, or one whose leader carried another
    value) gets it for its own migration only: the destination reaps that reservation after it, and keeps another
    source's (no timeout passed: the destination's flag) as long as its flag says. Before, the first PreAllocate
    set the destination's timeout for every incoming migration, for good: both were reaped."""
    b = await make_node("b", settings=MigrationSettings(pending_timeout_s=2.0, max_in=2, verify_crc=True))
    try:
        donor = SimEngine("tiny")
        for rid in ("r1", "r2"):
            donor.add_request(RequestSpec(rid, tuple(range(1, 41)), Sampling(20, seed=1, ignore_eos=True)), 0.0)
        donor.step(0.0)
        assert sink.server is not None

        def first_stage(mid: str, source: str, rid: str, pending_ms: int) -> llumlet_pb2.PreAllocateRequest:
            assert sink.server is not None
            return llumlet_pb2.PreAllocateRequest(
                migration_id=mid,
                source_instance_id=source,
                stage=0,
                num_blocks=1,
                request=convert.migration_state_to_pb(donor.export_state(rid), sink.server.address),
                kv_layout=b.engine.kv_layout().encode(),
                pending_timeout_ms=pending_ms,
            )

        await b.stub.PreAllocate(first_stage("m1", "x", "r1", 100))
        await b.stub.PreAllocate(first_stage("m2", "y", "r2", 0))
        await until(lambda: "m1" not in b.coordinator._incoming, "x's reservation to be reaped")
        assert "m2" in b.coordinator._incoming and b.engine.load().reserved_blocks == 1
        assert b.coordinator._incoming["m2"].pending_timeout_s == b.coordinator.settings.pending_timeout_s == 2.0
        await until(lambda: not b.coordinator._incoming, "y's reservation to be reaped after the flag's 2 s")
        assert b.engine.load().reserved_blocks == 0 and b.free == b.engine.total_blocks
    finally:
        await b.close()
