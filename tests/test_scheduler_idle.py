"""#20 idle cost of the leader: its pairing loop runs a round every ``pairing_interval_ms`` only while rounds find
pairs; a round that finds none waits for the cluster to change. Before, an idle leader ran (and woke for) a round 10
times a second for nothing. Counted in rounds (calls of the policy's ``pair``), not in time: a slow machine only runs
fewer rounds in the old loop, never more in the new one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, cast

from pyllumnix.control_plane.policy.config import Selection
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.control_plane.scheduler.config_wire import config_to_pb
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_replica_leadership import active_load, make_replica, wait_until

PERIODS = 20  # pairing periods (10 ms each in make_replica) watched for rounds that should not run


def counting(replica: SchedulerReplica, orders: list[MigrateOrder] | None = None) -> list[Any]:
    """Replaces the policy's pairing by one that records each round's snapshot and answers ``orders`` (or nothing)."""
    rounds: list[Any] = []

    def pair(snapshot: Any, avoid: Any = ()) -> list[MigrateOrder]:
        rounds.append(snapshot)
        return list(orders or [])

    replica.core.pair = pair  # type: ignore[method-assign]
    return rounds


def busy(replica: SchedulerReplica) -> int:
    return sum(n for (_, outcome), n in replica.pairing_decisions.items() if outcome == "source_busy")


async def quiet_periods(replica: SchedulerReplica, periods: int = PERIODS) -> None:
    await asyncio.sleep(periods * replica.core.config.pairing_interval_ms / 1000)


async def test_an_idle_leader_pairs_once_then_only_after_a_change() -> None:
    replica, _ = make_replica(("a", "b"), [])
    for iid in ("a", "b"):
        assert replica.report(active_load(iid))
    rounds = counting(replica)
    loop = asyncio.create_task(replica._pairing_loop())
    try:
        await wait_until(lambda: len(rounds) >= 1)
        await quiet_periods(replica)
        assert len(rounds) == 1, f"{len(rounds)} rounds over an unchanged cluster (before: one per period)"
        # Each kind of change wakes it for one round: a report (folded), a dispatch, an override, a config.
        load = active_load("a", seq=2)
        load.free_blocks = 50
        assert replica.report(load)
        await wait_until(lambda: len(rounds) >= 2)
        assert rounds[1].get("a").free_blocks == 50
        replica.cluster.record_dispatch("b", "r1", 1, common_pb2.PRIORITY_NORMAL, 0.0)
        await wait_until(lambda: len(rounds) >= 3)
        replica.cluster.set_override("a", InstanceState.CORDONED, 0.0)
        await wait_until(lambda: len(rounds) >= 4)
        replica.cluster.changed.set()  # what the config watch does on a new config
        await wait_until(lambda: len(rounds) >= 5)
        await quiet_periods(replica)
        assert len(rounds) == 5
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_a_leader_that_finds_pairs_keeps_its_period_and_an_order_ending_wakes_it() -> None:
    log: list[str] = []
    replica, election = make_replica(("a", "c"), log)
    replica.leadership = cast(Any, election.leadership)  # orders carry the term
    for iid in ("a", "c"):
        assert replica.report(active_load(iid))
    rounds = counting(replica, [MigrateOrder("a", "c", Selection.SR)])
    loop = asyncio.create_task(replica._pairing_loop())
    try:
        # The order waits for its migration's end (a busy source): the rounds go on, every period.
        await wait_until(lambda: len(rounds) >= 5)
        assert log == ["migrate-out a"] and busy(replica) >= 3
        # No pair any more: one round, then quiet until the order in flight ends (its source is free again).
        rounds_then = len(rounds)

        def no_pair(snapshot: Any, avoid: Any = ()) -> list[MigrateOrder]:
            rounds.append(snapshot)
            return []

        replica.core.pair = no_pair  # type: ignore[method-assign]
        await wait_until(lambda: len(rounds) >= rounds_then + 1)
        await quiet_periods(replica)
        settled = len(rounds)
        assert settled <= rounds_then + 2
        stub = replica._llumlet("a")
        stub.release.set()  # type: ignore[attr-defined]
        await wait_until(lambda: len(rounds) > settled)
        assert replica._order_in_flight == {}
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


class OneConfig:
    """A config store whose watch yields one stored config, then nothing."""

    def __init__(self, message: Any) -> None:
        self.message = message

    async def watch(self) -> Any:
        yield self.message, 5
        await asyncio.Event().wait()


async def test_a_new_config_wakes_an_idle_pairing_loop() -> None:
    replica, _ = make_replica(("a",), [])
    assert replica.report(active_load("a"))
    configs: list[Any] = []

    def pair(snapshot: Any, avoid: Any = ()) -> list[MigrateOrder]:
        configs.append(replica.core.config)
        return []

    replica.core.pair = pair  # type: ignore[method-assign]
    loop = asyncio.create_task(replica._pairing_loop())
    watch: asyncio.Task[None] | None = None
    try:
        await wait_until(lambda: len(configs) >= 1)
        await quiet_periods(replica)
        assert len(configs) == 1
        new = dataclasses.replace(replica.core.config, migrate_out_threshold=5.0)
        replica.config_store = OneConfig(config_to_pb(new))  # type: ignore[assignment]
        watch = asyncio.create_task(replica._watch_config())
        await wait_until(lambda: len(configs) >= 2)
        assert configs[-1].migrate_out_threshold == 5.0
    finally:
        for task in (loop, watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
