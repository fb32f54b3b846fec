"""An admin order the leader relays to a llumlet that does not answer ends ABORTED, naming the instance (attack 9 B6).

Why: the leader did answer, so the admin caller (llmctl, a client library) must not read a dead source's transport
error (UNAVAILABLE "Socket closed") as "cannot reach the cluster"; a llumlet's own refusal keeps its status.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.scheduler.replica import SchedulerReplica, SchedulingError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2


class Leading:
    """The part of a leadership a replica reads to give orders."""

    revision = 7
    is_leader = True


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leader_with(source_address: str) -> SchedulerReplica:
    replica = SchedulerReplica(cast(Any, object()), KeyLayout("c1"), "s0", "127.0.0.1:1")
    replica.leadership = cast(Any, Leading())
    replica.cluster.upsert(common_pb2.InstanceInfo(instance_id="a", grpc_address=source_address))
    replica.cluster.upsert(common_pb2.InstanceInfo(instance_id="b", grpc_address="127.0.0.1:2"))
    replica.report(common_pb2.InstanceLoad(instance_id="a", seq=1, requests=[common_pb2.RequestLoad(request_id="r1")]))
    return replica


async def test_a_source_that_does_not_answer_aborts_the_order_and_is_named() -> None:
    replica = leader_with(f"127.0.0.1:{closed_port()}")  # nothing listens: the llumlet is gone
    with pytest.raises(SchedulingError) as migrate:
        await replica.migrate_request("r1", "b")
    assert migrate.value.code == grpc.StatusCode.ABORTED
    assert "instance a could not carry out MigrateOut (UNAVAILABLE" in str(migrate.value)
    with pytest.raises(SchedulingError) as state:
        await replica.set_instance_state("a", InstanceState.CORDONED)
    assert state.value.code == grpc.StatusCode.ABORTED
    assert "instance a could not carry out SetInstanceState" in str(state.value)


class Refusing:
    async def MigrateOut(self, request: Any, *, timeout: float, metadata: Any) -> Any:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), details="stale leader"
        )


async def test_a_llumlets_own_refusal_keeps_its_status() -> None:
    replica = leader_with("127.0.0.1:3")
    replica._llumlet = lambda instance_id: cast(Any, Refusing())  # type: ignore[method-assign]
    with pytest.raises(SchedulingError) as info:
        await replica.migrate_request("r1", "b")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and str(info.value) == "stale leader"
