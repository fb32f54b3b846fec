"""The README's priority claims against real processes (etcd, a scheduler, two sim llumlets, a frontend, all on
mutual TLS): a high-priority request (``"priority": "high"`` in the body, or the ``X-Llumnix-Priority`` header) is
dispatched with the priority headroom, so high-priority work concentrates on the instance that already holds some and
normal requests steer away from it even when it has the most free blocks; and a migration ordered out of that
instance never takes a high-priority request (the source reports nothing to migrate, or moves a normal one).

Automatic migration is switched off through the cluster config, so the only migrations are the test's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from google.protobuf import field_mask_pb2

from integration.cluster import add_request, dial, etcd_urls, get_load, http_headers, leader_of, list_instances, submit
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import admin_pb2, admin_pb2_grpc, common_pb2, config_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.launch import Launcher
from pyllumnix.tools.recording_sink import RecordingSink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BLOCK = 16
TOTAL = 1300  # both instances; the high headroom of each is TOTAL - 100 blocks (the default reserve)
# The 7B latency model (30 ms decode steps: a request of 2000 tokens stays put for a minute) with a small KV payload.
SIM = ["--profile", "llama-7b-a10", "--bytes-per-token", "8192", "--transport", "tcp", "--total-blocks", str(TOTAL)]
LONG = 2000  # max_tokens of every request the test keeps running; all are aborted at the end
HIGH, NORMAL = common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_NORMAL


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def running(address: str) -> dict[str, int]:
    """Running requests of a llumlet: id -> priority."""
    load = await get_load(address)
    return {r.request_id: r.priority for r in load.requests if r.phase == common_pb2.REQUEST_PHASE_RUNNING}


async def test_high_priority_concentrates_repels_normal_and_is_never_migrated(
    etcd1: EmbeddedEtcd, procs: Launcher, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    assert sink.server is not None
    common = ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", etcd_cluster_name]
    scheduler = procs.start("s0", "scheduler", *common, "--replica-id", "s0")
    leader = await leader_of([scheduler.address])
    async with dial(scheduler.address) as ch:
        await admin_pb2_grpc.AdminServiceStub(ch).SetConfig(
            admin_pb2.SetConfigRequest(
                config=config_pb2.ClusterConfig(migration=config_pb2.MigrationConfig(disable=True)),
                update_mask=field_mask_pb2.FieldMask(paths=["migration.disable"]),
            ),
            timeout=5,
        )
    l0 = procs.start("l0", "llumlet", *common, "--instance-id", "l0", *SIM)
    l1 = procs.start("l1", "llumlet", *common, "--instance-id", "l1", *SIM)
    frontend = procs.start(
        "fe",
        "frontend",
        *common,
        *("--scheduler", scheduler.address, "--http-port", "0", "--model", "llama-7b-a10", "--max-model-len", "8192"),
    )
    url = f"http://127.0.0.1:{frontend.ready['http_port']}"
    address = {"l0": l0.address, "l1": l1.address}

    async def registered() -> bool:
        return {i.info.instance_id for i in await list_instances(scheduler.address)} == {"l0", "l1"}

    await until(registered, "both instances registered")

    def leader_sees(check: Callable[[dict[str, common_pb2.InstanceLoad]], bool]) -> Callable[[], Awaitable[bool]]:
        """A probe of the leader's view (dispatch decides on it, not on the llumlets' live state)."""

        async def probe() -> bool:
            return check({i.info.instance_id: i.load for i in await list_instances(scheduler.address)})

        return probe

    # A normal request of 200 blocks on l1 (placed directly): l1 is now the instance with fewer free blocks.
    await add_request(l1.address, "n0", sink.server.address, 200 * BLOCK, LONG)
    await until(leader_sees(lambda s: s["l1"].summary.running_blocks >= 200), "the leader to see n0 running")

    headers = await http_headers(etcd_urls(etcd1), etcd_cluster_name)
    streams: list[aiohttp.ClientResponse] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), headers=headers) as session:

        async def stream(body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            """Starts a long streaming completion and returns after its first chunk (it is running then)."""
            resp = await session.post(
                f"{url}/v1/completions",
                json={"model": "llama-7b-a10", "max_tokens": LONG, "stream": True, **body},
                headers=extra or {},
            )
            assert resp.status == 200, await resp.text()
            streams.append(resp)
            await resp.content.readline()

        # 1. High priority from the body: it goes to the empty l0 (an instance with no work is the freest).
        await stream({"prompt": "high one " * 40, "priority": "high"})
        on0 = await running(l0.address)
        assert list(on0.values()) == [HIGH], on0
        h1 = next(iter(on0))
        assert await running(l1.address) == {"n0": NORMAL}
        await until(leader_sees(lambda s: s["l0"].summary.num_running_high == 1), "the leader to see h1")

        # 2. A normal request (gRPC Dispatch, then AddRequest where it said) goes to l1 although l0 has more free
        # blocks: l0 holds high-priority work, whose headroom makes it look loaded to normal requests.
        free = {iid: (await get_load(a)).free_blocks for iid, a in address.items()}
        assert free["l0"] > free["l1"] + 150, free  # a raw free-blocks policy would pick l0
        assert await submit(leader.leader_address, "n1", sink.server.address, 64, LONG, NORMAL) == "l1"
        # so does a normal request through the OpenAI API (no priority given: normal)
        await stream({"prompt": "normal one " * 20})
        assert set(await running(l1.address)) > {"n0", "n1"}
        assert list((await running(l0.address)).values()) == [HIGH]

        # 3. High priority from the header joins h1 on l0: it has paid the high headroom already, l1 would have to.
        await until(
            leader_sees(lambda s: s["l1"].num_running == 3 and s["l0"].num_running == 1),
            "the leader to see three requests on l1",
        )
        await stream({"prompt": "high two " * 40}, {"X-Llumnix-Priority": "high"})
        on0 = await running(l0.address)
        assert sorted(on0.values()) == [HIGH, HIGH] and h1 in on0, on0
        # and over gRPC Dispatch with PRIORITY_HIGH
        await until(leader_sees(lambda s: s["l0"].summary.num_running_high == 2), "the leader to see h2")
        assert await submit(leader.leader_address, "h3", sink.server.address, 64, LONG, HIGH) == "l0"
        await until(lambda: _has_tokens(sink, "h3"), "h3 to run")
        highs = set(await running(l0.address))
        assert len(highs) == 3

        # 4. A migration ordered out of l0 (no request named: the source selects) finds nothing it may move.
        # An order is admitted from the leader only (its certificate; etcd proves its term, attack 9 B3).
        now = await leader_of([scheduler.address])
        term = now.term
        async with open_channel(l0.address, peer=None, settings=procs.security("scheduler", now.leader_id)) as ch:
            stub = llumlet_pb2_grpc.LlumletServiceStub(ch)

            async def migrate_out(selection: int) -> llumlet_pb2.MigrateOutResponse:
                reply: llumlet_pb2.MigrateOutResponse = await stub.MigrateOut(
                    llumlet_pb2.MigrateOutRequest(
                        destination_instance_id="l1",
                        destination_grpc_address=l1.address,
                        selection=selection,  # type: ignore[arg-type]
                        max_requests=3,
                        wait=True,
                    ),
                    timeout=60,
                    metadata=term_metadata(term),
                )
                return reply

            for selection in (
                common_pb2.MIGRATION_SELECTION_SR,
                common_pb2.MIGRATION_SELECTION_LR,
                common_pb2.MIGRATION_SELECTION_LCR,
                common_pb2.MIGRATION_SELECTION_FCW,
            ):
                reply = await migrate_out(selection)
                moved = [r for r in reply.results if r.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED]
                assert moved == [], (selection, reply)
                assert not set(r.request_id for r in reply.results) & highs, reply
            assert set(await running(l0.address)) == highs

            # ... and with a normal request beside them, the source moves that one and only that one.
            await add_request(l0.address, "n2", sink.server.address, 64, LONG, NORMAL)
            await until(lambda: _has_tokens(sink, "n2"), "n2 to run")
            reply = await migrate_out(common_pb2.MIGRATION_SELECTION_LR)  # LR: the longest would be a high one
            assert [(r.request_id, r.outcome) for r in reply.results] == [
                ("n2", llumlet_pb2.MIGRATION_OUTCOME_COMMITTED)
            ], reply
        assert set(await running(l0.address)) == highs
        assert "n2" in await running(l1.address)

        # end: abort everything still running; the HTTP streams end
        for a in address.values():
            for rid in await running(a):
                async with dial(a) as ch:
                    await llumlet_pb2_grpc.LlumletServiceStub(ch).AbortRequest(
                        llumlet_pb2.AbortRequestRequest(request_id=rid), timeout=5
                    )
        for resp in streams:
            async for _ in resp.content:
                pass
            resp.release()
    for a in address.values():
        await until(lambda a=a: _idle(a), f"{a} idle after the aborts")  # type: ignore[misc]


async def _idle(address: str) -> bool:
    load = await get_load(address)
    return load.free_blocks == load.total_blocks


async def _has_tokens(sink: RecordingSink, rid: str) -> bool:
    return len(sink.tokens(rid)) > 0
