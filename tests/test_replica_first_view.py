"""A new leader's first dispatches wait, briefly, for every registered instance's first report of its term.

Before: a replica that had just won the election knew the registry but no load (a follower keeps none), so its first
requests went to whichever llumlets' report streams reached it first, a busy one as readily as an idle one, while the
others were still reconnecting. Now Dispatch waits until every registered instance has reported in this term, at most
``FIRST_VIEW_WAIT_S`` into it and never past the caller's deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from pyllumnix.control_plane.scheduler import replica as replica_module
from pyllumnix.control_plane.scheduler.service import SchedulerServicer
from pyllumnix.protos.llumnix.v1 import common_pb2, scheduler_pb2
from tests.test_replica_leadership import DEADLINE_S, leading, make_replica


def load(instance_id: str, free_blocks: int) -> common_pb2.InstanceLoad:
    return common_pb2.InstanceLoad(
        instance_id=instance_id,
        seq=1,
        state=common_pb2.INSTANCE_STATE_ACTIVE,
        total_blocks=100,
        free_blocks=free_blocks,
        block_size=16,
    )


class Context:
    """The part of a grpc ServicerContext the Dispatch handler uses on success."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


async def test_the_first_dispatches_of_a_term_wait_for_every_instances_first_report() -> None:
    replica, election = make_replica(("busy", "idle-1", "idle-2"), [])
    async with leading(replica, election):
        assert replica.report(load("busy", 10))  # the busy llumlet's stream reopened first
        assert replica.view_pending()
        replica.cluster.fold(time.monotonic())
        assert replica.dispatch("early", 0, 16, 16)[0] == "busy", "without the wait: the only instance heard from"
        servicer = SchedulerServicer(replica)
        request = scheduler_pb2.DispatchRequest(request_id="r1", num_prompt_tokens=16, max_tokens=16)
        answer = asyncio.ensure_future(servicer.Dispatch(request, cast(Any, Context(DEADLINE_S))))
        await asyncio.sleep(0.05)
        assert not answer.done(), "it waits for the instances not heard from yet"
        assert replica.report(load("idle-1", 100)) and replica.report(load("idle-2", 100))
        reply = await asyncio.wait_for(answer, DEADLINE_S)
        assert reply.instance_id in ("idle-1", "idle-2")
        assert not replica.view_pending()  # and from now on no call waits


async def test_a_silent_instance_holds_the_first_dispatches_for_a_bounded_time_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance registered but silent (its process gone, its lease not expired yet) must not hold dispatch for
    longer than FIRST_VIEW_WAIT_S, nor a caller past its own deadline."""
    monkeypatch.setattr(replica_module, "FIRST_VIEW_WAIT_S", 0.2)
    replica, election = make_replica(("up", "silent"), [])
    async with leading(replica, election):
        assert replica.report(load("up", 100))
        servicer = SchedulerServicer(replica)
        request = scheduler_pb2.DispatchRequest(request_id="r1", num_prompt_tokens=16, max_tokens=16)
        began = time.monotonic()
        reply = await asyncio.wait_for(servicer.Dispatch(request, cast(Any, Context(0.08))), DEADLINE_S)
        assert reply.instance_id == "up" and time.monotonic() - began < 0.2, "the caller's deadline bounds it"
        await asyncio.sleep(0.2)
        assert not replica.view_pending(), "the term's bound"


async def test_a_deposed_replica_does_not_hold_dispatches_it_cannot_serve() -> None:
    """Dispatches reaching a replica that lost its term within FIRST_VIEW_WAIT_S get NotLeader at once (the frontend
    then goes to the new leader), not after the old term's wait."""
    replica, election = make_replica(("up", "silent"), [])
    async with leading(replica, election):
        assert replica.view_pending()
        election.leadership.step_down()
        assert not replica.view_pending()
