"""REVIEW17-1: a destination that refuses every migration (ABORTED_BY_DESTINATION: a wedged transport, an identity
mismatch, a timeout) without filling up stays the freest instance, so the pairing paired the most loaded source (a
draining one sorts first) with it every round, and the drain never tried the destination that would have taken its
requests. Now a refusal puts the destination in a back-off (1 s, doubling to 30 s; a commit into it ends it) during
which it is no destination (``pair_instances(..., avoid=)``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, cast

from pyllumnix.control_plane.scheduler.replica import REFUSED_BACKOFF_FIRST_S, SchedulerReplica
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2
from tests.test_replica_leadership import make_replica, wait_until

REFUSED = llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
COMMITTED = llumlet_pb2.MIGRATION_OUTCOME_COMMITTED


class Source:
    """The draining source's stub: every order into ``refusing`` is refused by it, every other one commits."""

    def __init__(self, refusing: str) -> None:
        self.refusing = refusing
        self.orders: list[str] = []

    async def MigrateOut(self, request: llumlet_pb2.MigrateOutRequest, **_: Any) -> llumlet_pb2.MigrateOutResponse:
        dst = request.destination_instance_id
        self.orders.append(dst)
        result = llumlet_pb2.MigrationResult(
            request_id=f"r{len(self.orders)}",
            source_instance_id="s",
            destination_instance_id=dst,
            outcome=REFUSED if dst == self.refusing else COMMITTED,
        )
        return llumlet_pb2.MigrateOutResponse(results=[result])


def draining_cluster(source: Source) -> SchedulerReplica:
    replica, election = make_replica(("s", "d1", "d2"), [])
    replica.leadership = cast(Any, election.leadership)
    replica.core.reconfigure(dataclasses.replace(replica.core.config, pairing_interval_ms=20))
    replica._llumlet = lambda iid: cast(Any, source)  # type: ignore[method-assign, assignment]
    loads = [
        ("s", common_pb2.INSTANCE_STATE_DRAINING, 500, 5),
        ("d1", common_pb2.INSTANCE_STATE_ACTIVE, 1000, 0),  # the freest: refuses everything
        ("d2", common_pb2.INSTANCE_STATE_ACTIVE, 900, 1),  # would take the requests
    ]
    for iid, state, free, running in loads:
        load = common_pb2.InstanceLoad(
            instance_id=iid, seq=1, state=state, total_blocks=1000, free_blocks=free, num_running=running
        )
        assert replica.report(load)
    return replica


async def test_a_refusing_destination_is_backed_off_and_the_drain_goes_to_the_next_freest() -> None:
    source = Source(refusing="d1")
    replica = draining_cluster(source)
    loop = asyncio.create_task(replica._pairing_loop())
    try:
        # Old: d1, d1, d1, ... every round (d2 never ordered).
        await wait_until(lambda: "d2" in source.orders)
        assert source.orders[0] == "d1" and source.orders.index("d2") == 1, source.orders
        _, backoff = replica._refused["d1"]
        assert backoff == REFUSED_BACKOFF_FIRST_S
        # While d1 is backed off, every order goes to d2 (d2's commits do not end d1's back-off).
        await wait_until(lambda: len(source.orders) >= 4)
        assert "d1" in replica._refused
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


def test_a_commit_ends_the_back_off_and_refusals_in_a_row_double_it() -> None:
    replica, _ = make_replica(("d",), [])
    refused = [llumlet_pb2.MigrationResult(outcome=REFUSED)]
    backoffs = []
    for _ in range(7):
        replica._note_outcome("d", refused)
        backoffs.append(replica._refused["d"][1])
    assert backoffs == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert replica._refusing(0.0) == frozenset({"d"})
    replica._note_outcome("d", [llumlet_pb2.MigrationResult(outcome=COMMITTED)])
    assert "d" not in replica._refused and replica._refusing(0.0) == frozenset()
