"""F3 (review 7): an order its source answers with nothing started (none of its movable requests fits the room; the
pure pairing cannot see that from the views) is not sent again until the source's or the destination's load changes
(a new seq), and a round of only such orders lets the pairing loop wait for a change like a round without pairs.

Before, the same order went out every pairing period for as long as the pair lasted: a MigrateOut RPC, a selection under
the source's engine lock, and a loop that never idled. Fake llumlet stubs (``FakeLlumlet``) answer at once, empty;
counted in MigrateOut calls, not in time (a slow machine only sends fewer in the old loop, never more in the new)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.protos.llumnix.v1 import llumlet_pb2
from tests.test_replica_leadership import FakeLlumlet, active_load, make_replica, wait_until
from tests.test_scheduler_idle import counting, quiet_periods

ORDER = MigrateOrder("s", "d", Selection.SR, 250)


def leader(ids: tuple[str, ...], log: list[str]) -> SchedulerReplica:
    """A leading replica whose llumlet stubs answer every MigrateOut at once, with nothing started."""
    replica, election = make_replica(ids, log)
    replica.leadership = cast(Any, election.leadership)  # orders carry the term
    for iid in ids:
        assert replica.report(active_load(iid))
        cast(FakeLlumlet, replica._llumlet(iid)).release.set()
    return replica


def sent(log: list[str]) -> int:
    return log.count("migrate-out s")


async def test_an_order_answered_with_nothing_is_sent_again_only_after_a_load_changes() -> None:
    log: list[str] = []
    replica = leader(("s", "d"), log)
    rounds = counting(replica, [ORDER])
    loop = asyncio.create_task(replica._pairing_loop())
    try:
        await wait_until(lambda: sent(log) >= 1 and not replica._order_in_flight)
        await quiet_periods(replica)
        # Old: one order per period (~20 here), and a round every period.
        assert sent(log) == 1, f"{sent(log)} identical orders over unchanged loads"
        idle_rounds = len(rounds)
        await quiet_periods(replica)
        assert len(rounds) == idle_rounds, "the loop kept running rounds over unchanged loads"
        assert replica.pairing_decisions["defrag", "nothing_fits"] >= 1
        # A new load of either instance: the order goes out once more (the source may hold a fitting request now).
        assert replica.report(active_load("s", seq=2))
        await wait_until(lambda: sent(log) >= 2)
        assert replica.report(active_load("d", seq=2))
        await wait_until(lambda: sent(log) >= 3)
        await quiet_periods(replica)
        assert sent(log) == 3
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_another_order_for_the_pair_is_sent_and_a_started_migration_is_not_remembered() -> None:
    """A larger room is a different question for the source; an order that started a migration is not futile."""
    log: list[str] = []
    replica = leader(("s", "d"), log)
    orders = [ORDER]
    rounds = counting(replica, orders)
    loop = asyncio.create_task(replica._pairing_loop())
    try:
        await wait_until(lambda: sent(log) >= 1 and not replica._order_in_flight)
        orders[0] = MigrateOrder("s", "d", Selection.SR, 400)
        replica.cluster.changed.set()  # what the fold of a dispatch or report does
        await wait_until(lambda: sent(log) >= 2)
        await wait_until(lambda: replica._futile_orders.get(("s", "d"), (None,))[0] == orders[0])

        async def started(request: Any, *, timeout: float, metadata: Any) -> llumlet_pb2.MigrateOutResponse:
            log.append("migrate-out s")
            return llumlet_pb2.MigrateOutResponse(migration_ids=["m1"])

        cast(Any, replica._llumlet("s")).MigrateOut = started
        assert replica.report(active_load("s", seq=2))
        await wait_until(lambda: sent(log) >= 4)  # not remembered: sent again the next round (its source is free)
        assert ("s", "d") not in replica._futile_orders
        assert len(rounds) >= 4
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
