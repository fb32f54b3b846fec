"""A llumlet survives blips: an etcd outage longer than its lease TTL, or a stall of its own process, costs it its
lease, not its life. It keeps serving and registers again with the same id and InstanceInfo (it used to exit with
code 3). Real etcd and llumlet processes; the test pauses only processes it started (SIGSTOP/SIGCONT by PID)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from integration.cluster import dial, etcd_server_tls, etcd_urls, harness_etcd_client, leader_of, list_instances
from integration.procs import Component, Processes
from pyllumnix.infra.etcd.client import EtcdClient, KeyValue
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink

pytestmark = pytest.mark.integration

# ~30 ms decode steps, no KV bytes: a request of a few hundred tokens lives for seconds.
LLUMLET_ARGS = ("--profile", "llama-7b-a10", "--no-payload", "--transport", "tcp")


@pytest.fixture
def own_etcd() -> Iterator[EmbeddedEtcd]:
    """An etcd this test alone uses (it gets paused)."""
    with EmbeddedEtcd(1, tls=etcd_server_tls()) as etcd:
        yield etcd


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOPs a process this test started; SIGCONT on the way out, also on failure."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await predicate():
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")


async def has_output(sink: RecordingSink, rid: str) -> bool:
    return bool(sink.outputs.get(rid))


async def add(address: str, sink: RecordingSink, rid: str, max_tokens: int) -> None:
    assert sink.server is not None
    request = common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=list(range(1, 33)),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=5, ignore_eos=True),
        frontend_address=sink.server.address,
    )
    async with dial(address) as channel:
        await llumlet_pb2_grpc.LlumletServiceStub(channel).AddRequest(
            llumlet_pb2.AddRequestRequest(request=request), timeout=5
        )


def start_llumlet(procs: Processes, etcd: EmbeddedEtcd, cluster: str, *extra: str) -> Component:
    return procs.start(
        "llumlet-a",
        "llumlet",
        "--instance-id",
        "a",
        "--etcd",
        ",".join(etcd_urls(etcd)),
        "--cluster",
        cluster,
        *LLUMLET_ARGS,
        *extra,
    )


async def entry(client: EtcdClient, cluster: str) -> KeyValue | None:
    return await client.get(KeyLayout(cluster).instance_key("a"))


async def test_an_etcd_outage_longer_than_the_lease_ttl_does_not_stop_a_llumlet(
    own_etcd: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    ttl, outage, tokens = 2, 5.0, 400
    scheduler = procs.start(
        "s0", "scheduler", "--etcd", ",".join(etcd_urls(own_etcd)), "--cluster", etcd_cluster_name, "--replica-id", "s0"
    )
    llumlet = start_llumlet(procs, own_etcd, etcd_cluster_name, "--lease-ttl", str(ttl))
    client = harness_etcd_client(etcd_urls(own_etcd))
    try:
        before = await entry(client, etcd_cluster_name)
        assert before is not None
        await add(llumlet.address, sink, "r", tokens)
        await until(lambda: has_output(sink, "r"), 10, "the first tokens")
        etcd_pid = own_etcd.members[0].process.pid  # type: ignore[union-attr]
        with paused(etcd_pid):
            at_start = len(sink.tokens("r"))
            await asyncio.sleep(outage)
            assert llumlet.alive(), "the llumlet must outlive its lease"
            assert len(sink.tokens("r")) > at_start, "it kept serving while etcd was away"
        assert llumlet.alive()

        async def registered_again() -> bool:
            kv = await entry(client, etcd_cluster_name)
            return kv is not None and kv.lease != before.lease

        await until(registered_again, 20, "re-registration under a new lease")
        after = await entry(client, etcd_cluster_name)
        assert after is not None and after.value == before.value, "same instance id, same InstanceInfo"
        await sink.wait("r", timeout=60)
        assert sink.raw_indices("r") == list(range(tokens)), "every token exactly once, in order"
        assert [o.finish_reason for o in sink.outputs["r"] if o.finished] == [common_pb2.FINISH_REASON_LENGTH]
        assert "re-registering under a new lease" in llumlet.log()

        # Its load reporter survived the blip too: the leader gets fresh reports from it.
        leader = (await leader_of([scheduler.address], timeout=20)).leader_address

        seen: dict[str, float] = {}

        async def reporting() -> bool:
            """A report or keep-alive of ``a`` later than the first seen: the leader's ``last_report_time`` moves on.
            (Not the load's seq: an idle llumlet's load does not change, so it sends keep-alives, not new loads.)"""
            status = {i.info.instance_id: i for i in await list_instances(leader)}
            if "a" not in status or status["a"].last_report_time == 0:
                return False
            first = seen.setdefault("first", status["a"].last_report_time)
            return status["a"].last_report_time > first + 0.5

        await until(reporting, 20, "load reports reaching the leader after the outage")

        assert llumlet.terminate() == 0
        assert await entry(client, etcd_cluster_name) is None, "a clean stop still deregisters at once"
    finally:
        await client.close()


async def test_a_llumlet_stalled_past_its_lease_comes_back_registered_with_its_stream_token_exact(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    ttl, stall, tokens = 2, 4.0, 300
    llumlet = start_llumlet(procs, etcd1, etcd_cluster_name, "--lease-ttl", str(ttl))
    client = harness_etcd_client(etcd_urls(etcd1))
    try:
        before = await entry(client, etcd_cluster_name)
        assert before is not None
        await add(llumlet.address, sink, "r", tokens)
        await until(lambda: has_output(sink, "r"), 10, "the first tokens")
        with paused(llumlet.proc.pid):

            async def expired() -> bool:
                return await entry(client, etcd_cluster_name) is None

            await until(expired, stall, "the stalled llumlet's lease expiring")
            await asyncio.sleep(max(0.0, stall - ttl))

        async def back() -> bool:
            kv = await entry(client, etcd_cluster_name)
            return kv is not None and kv.value == before.value

        await until(back, 20, "the llumlet registering again with the same InstanceInfo")
        await sink.wait("r", timeout=60)
        assert sink.raw_indices("r") == list(range(tokens)), "every token exactly once, in order"
        assert sink.outputs["r"][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert llumlet.alive()
    finally:
        await client.close()


async def test_a_short_stall_within_the_default_ttl_keeps_the_lease(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    """The default TTL (6 s, renewed every TTL/3) rides out a 3 s stall: the entry never vanishes (the old default,
    3 s renewed every second, lost it and the llumlet exited)."""
    llumlet = start_llumlet(procs, etcd1, etcd_cluster_name)
    client = harness_etcd_client(etcd_urls(etcd1))
    try:
        before = await entry(client, etcd_cluster_name)
        assert before is not None
        await asyncio.sleep(2.5)  # a renewal in (every 2 s at the default TTL)
        with paused(llumlet.proc.pid):
            await asyncio.sleep(3.0)
        for _ in range(20):  # 2 s after the stall: same lease, never removed
            kv = await entry(client, etcd_cluster_name)
            assert kv is not None and kv.lease == before.lease and kv.mod_revision == before.mod_revision
            await asyncio.sleep(0.1)
        await add(llumlet.address, sink, "after", 20)
        await sink.wait("after", timeout=30)
        assert sink.raw_indices("after") == list(range(20))
    finally:
        await client.close()
