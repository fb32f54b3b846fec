"""The frontend's routing: the leader path, the registry bypass (fewest in flight) and the fallback between them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pyllumnix.clients.errors import InvalidArgumentError, NoLeaderError, UnavailableError
from pyllumnix.control_plane.frontend.dispatch import Dispatcher
from pyllumnix.control_plane.frontend.routing import (
    BypassDispatcher,
    EtcdRegistrySource,
    FallbackDispatcher,
    LeaderDispatcher,
    StaticRegistrySource,
)
from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_clients_fakes import Replica, dead_address, serve_replica, stop_all


def info(instance_id: str, address: str = "") -> common_pb2.InstanceInfo:
    return common_pb2.InstanceInfo(instance_id=instance_id, grpc_address=address or f"{instance_id}:7000")


async def test_bypass_picks_fewest_in_flight_with_id_tie_break() -> None:
    registry = StaticRegistrySource([info("b"), info("a"), info("c")])
    bypass = BypassDispatcher(registry)
    picks = [(await bypass.dispatch(f"r{i}", 1, 10, 10))[0] for i in range(4)]
    assert picks == ["a", "b", "c", "a"]
    bypass.release("b")
    assert (await bypass.dispatch("r5", 1, 10, 10))[0] == "b"
    assert bypass.in_flight == {"a": 2, "b": 1, "c": 1}
    # An instance whose registry entry is gone is never chosen, however idle.
    registry.set([info("a"), info("c"), common_pb2.InstanceInfo(instance_id="no-address")])
    for _ in range(2):
        bypass.release("a")
    assert (await bypass.dispatch("r6", 1, 10, 10))[0] == "a"
    assert (await bypass.dispatch("r7", 1, 10, 10)) == ("a", "a:7000")
    assert (await bypass.dispatch("r8", 1, 10, 10))[0] == "c"


async def test_bypass_rejects_bad_requests_and_empty_registry() -> None:
    bypass = BypassDispatcher(StaticRegistrySource())
    with pytest.raises(InvalidArgumentError):
        await bypass.dispatch("", 1, 10, 10)
    with pytest.raises(UnavailableError, match="no instance"):
        await bypass.dispatch("r", 1, 10, 10)


async def test_leader_dispatcher_follows_redirect() -> None:
    leader = Replica("s-0", leader=True)
    s0, _ = await serve_replica(leader)
    follower = Replica("s-1", leader=False, leader_address=s0.address)
    s1, _ = await serve_replica(follower)
    dispatcher = LeaderDispatcher([dead_address(), s1.address])
    try:
        assert isinstance(dispatcher, Dispatcher)
        assert await dispatcher.dispatch("r1", 1, 10, 10) == ("via-s-0", "leader-pick:1")
        assert (follower.calls["Dispatch"], leader.calls["Dispatch"]) == (1, 1)
    finally:
        await dispatcher.close()
        await stop_all([s0, s1])


async def test_fallback_uses_bypass_when_no_leader_is_reachable() -> None:
    bypass = BypassDispatcher(StaticRegistrySource([info("i-1"), info("i-2")]))
    now = [0.0]
    fallback = FallbackDispatcher(
        LeaderDispatcher([dead_address(), dead_address()]), bypass, leader_timeout=1.0, clock=lambda: now[0]
    )
    assert await fallback.dispatch("r1", 1, 8, 8) == ("i-1", "i-1:7000")
    assert fallback.mode == "bypass" and fallback.bypassed == 1
    assert (await fallback.dispatch("r2", 1, 8, 8))[0] == "i-2"
    fallback.release("i-1")
    assert (await fallback.dispatch("r3", 1, 8, 8))[0] == "i-1"
    now[0] = 5.0
    assert fallback.mode == "leader"


async def test_fallback_on_follower_without_leader_and_on_slow_leader() -> None:
    lonely = Replica("s-7", leader=False, leader_address="")
    s_lonely, _ = await serve_replica(lonely)
    slow = Replica("s-8", leader=True)
    s_slow, _ = await serve_replica(slow, dispatch_delay=5.0)
    try:
        bypass = BypassDispatcher(StaticRegistrySource([info("i-1")]))
        with pytest.raises(NoLeaderError):
            await LeaderDispatcher([s_lonely.address]).dispatch("r0", 1, 1, 1)
        no_leader = FallbackDispatcher(LeaderDispatcher([s_lonely.address]), bypass, leader_timeout=1.0)
        assert (await no_leader.dispatch("r1", 1, 8, 8))[0] == "i-1"
        hung = FallbackDispatcher(LeaderDispatcher([s_slow.address]), bypass, leader_timeout=0.2)
        assert (await hung.dispatch("r2", 1, 8, 8))[0] == "i-1"
        assert hung.bypassed == 1
    finally:
        await stop_all([s_lonely, s_slow])


async def test_fallback_counts_leader_placements_in_the_bypass() -> None:
    leader = Replica("s-0", leader=True)
    s0, _ = await serve_replica(leader)
    try:
        bypass = BypassDispatcher(StaticRegistrySource([info("via-s-0"), info("z")]))
        fallback = FallbackDispatcher(LeaderDispatcher([s0.address]), bypass)
        assert (await fallback.dispatch("r1", 1, 8, 8))[0] == "via-s-0"
        assert bypass.in_flight == {"via-s-0": 1}
        # The leader goes away: the bypass avoids the instance the leader just loaded.
        await s0.stop(None)
        assert (await fallback.dispatch("r2", 1, 8, 8))[0] == "z"
        fallback.release("via-s-0")
        assert bypass.in_flight == {"z": 1}
    finally:
        await s0.stop(None)


@dataclass(frozen=True)
class _Snap:
    entries: dict[str, bytes]
    revision: int = 1


class _Lister:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.fail = False
        self.reads = 0

    async def list(self) -> _Snap:
        self.reads += 1
        if self.fail:
            raise EtcdUnavailableError("range", ["127.0.0.1:1"], 1.0, "connection refused")
        return _Snap(dict(self.entries))


async def test_etcd_registry_source_parses_caches_and_tolerates_a_blip() -> None:
    lister = _Lister()
    lister.entries = {"a": info("a").SerializeToString(), "bad": b"\xff\xff\xff", "b": info("").SerializeToString()}
    source = EtcdRegistrySource(lister, max_age=0.0, stale_for=60.0)
    got = await source.instances()
    assert [(i.instance_id, i.grpc_address) for i in got] == [("a", "a:7000"), ("b", ":7000")]
    lister.fail = True
    assert len(await source.instances()) == 2  # stale but recent
    assert lister.reads == 2
    fresh = EtcdRegistrySource(lister)
    # The etcd client's own exception never escapes: it is "unavailable" like any other (HTTP 503, not 500).
    with pytest.raises(UnavailableError, match="registry unreadable"):
        await fresh.instances()


async def test_bypass_avoids_an_instance_that_refused_for_a_while() -> None:
    now = [0.0]
    bypass = BypassDispatcher(StaticRegistrySource([info("a"), info("b")]), refusal_cooldown=2.0, clock=lambda: now[0])
    fallback = FallbackDispatcher(LeaderDispatcher([dead_address()]), bypass, clock=lambda: now[0])
    fallback.refused("a")
    assert (await bypass.dispatch("r1", 1, 1, 1))[0] == "b"
    assert (await bypass.dispatch("r2", 1, 1, 1))[0] == "b"  # "a" is still avoided although idle
    bypass.refused("b")
    assert (await bypass.dispatch("r3", 1, 1, 1))[0] == "a"  # everyone refused: the least loaded
    now[0] = 3.0
    assert (await bypass.dispatch("r4", 1, 1, 1))[0] == "a"  # cooldown over: fewest in flight again


async def test_readiness_leader_first_then_bypass_and_why_not() -> None:
    server, _ = await serve_replica(Replica("a"))
    try:
        leader = LeaderDispatcher([server.address])
        answer = await FallbackDispatcher(leader, BypassDispatcher(StaticRegistrySource())).readiness()
        await leader.close()
        assert answer.ready and "scheduler leader: 1 ACTIVE" in answer.reason
    finally:
        await stop_all([server])
    registry = StaticRegistrySource()
    address = dead_address()
    dead = LeaderDispatcher([address], timeout=0.3)
    fallback = FallbackDispatcher(dead, BypassDispatcher(registry))
    answer = await fallback.readiness()
    assert not answer.ready and "scheduler leader" in answer.reason and "registry lists no instance" in answer.reason
    # The reason is public (/health needs no key): no address in it, was the error's whole text; the log gets that.
    port = address.rsplit(":", 1)[1]
    assert port not in answer.reason and port in answer.detail, answer
    registry.set([info("a")])
    answer = await fallback.readiness()
    assert answer.ready and answer.reason == "bypass: 1 registered instance(s)"
    await dead.close()
    lister = _Lister()
    lister.fail = True
    answer = await BypassDispatcher(EtcdRegistrySource(lister)).readiness()
    assert not answer.ready and answer.reason == "bypass: the registry cannot be read (UNAVAILABLE)", answer
    assert "etcd unavailable" in answer.detail and "127.0.0.1:1" not in answer.reason


async def test_a_fallback_dispatch_spawns_no_task() -> None:
    """The leader's deadline is asyncio.timeout around the call, not wait_for (which wraps the call in a task: one
    more task and loop iteration per request); a leader slower than the deadline still falls back to the bypass."""
    import asyncio
    from typing import Any

    class Leader:
        delay = 0.0

        async def dispatch(self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int) -> Any:
            await asyncio.sleep(self.delay)
            return "via-leader", "via-leader:7000"

    leader = Leader()
    fallback = FallbackDispatcher(
        leader, BypassDispatcher(StaticRegistrySource([info("z")])), leader_timeout=0.2, retry_leader_after=0.0
    )
    loop = asyncio.get_running_loop()
    tasks: list[object] = []
    create_task = loop.create_task

    def counting(coro: Any, **kw: Any) -> Any:
        tasks.append(coro)
        return create_task(coro, **kw)

    loop.create_task = counting  # type: ignore[method-assign]
    try:
        assert (await fallback.dispatch("r1", 1, 8, 8))[0] == "via-leader"
        assert tasks == []
        leader.delay = 1.0
        assert (await fallback.dispatch("r2", 1, 8, 8))[0] == "z"
    finally:
        del loop.create_task
