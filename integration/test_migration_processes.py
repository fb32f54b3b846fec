"""Live migration between llumlet processes (TCP and UCX): a process killed mid-stage leaks nothing on the survivor,
the downtime measured between real processes is small and lands in the source's histogram, and under the
paper's micro-benchmark (two instances, one overloaded) migrations run continuously without a lost or duplicated
token."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from integration.cluster import add_request, dial, etcd_urls, get_load, leader_of
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.protos.llumnix.v1 import llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.launch import Component, Launcher
from pyllumnix.tools.recording_sink import RecordingSink

pytestmark = pytest.mark.integration

# 7B-sized KV (512 KiB per token), not prewarmed: a 4k-token request's stage 0 moves 2 GiB into fresh memory and
# takes seconds, long enough to kill a process in the middle of it.
BIG = ["--profile", "llama-7b-a10", "--transfer-timeout", "5", "--pending-timeout", "1"]
TRANSPORTS = ["tcp", "ucx"]
DOWNTIME_BOUND_MS = 500.0


async def start_big_migration(
    src: Component, dst: Component, sink: RecordingSink, rid: str
) -> asyncio.Task[llumlet_pb2.MigrateOutResponse]:
    """Starts a 4000-token request on ``src`` and its migration to ``dst``; the task ends with its result."""
    assert sink.server is not None
    await add_request(src.address, rid, sink.server.address, 4000, 150)
    while len(sink.tokens(rid)) < 2:
        await asyncio.sleep(0.01)

    async def run() -> llumlet_pb2.MigrateOutResponse:
        async with dial(src.address) as ch:
            reply: llumlet_pb2.MigrateOutResponse = await llumlet_pb2_grpc.LlumletServiceStub(ch).MigrateOut(
                llumlet_pb2.MigrateOutRequest(
                    destination_instance_id=dst.ready["instance_id"],
                    destination_grpc_address=dst.address,
                    request_id=rid,
                    wait=True,
                ),
                timeout=60,
            )
        return reply

    return asyncio.get_running_loop().create_task(run())


async def wait_reserved(comp: Component, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await get_load(comp.address)).reserved_blocks > 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the destination never reserved blocks")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_destination_killed_mid_stage_source_keeps_the_request(
    procs: Launcher, sink: RecordingSink, transport: str
) -> None:
    src = procs.start("src", "llumlet", "--instance-id", "src", *BIG, "--transport", transport)
    dst = procs.start("dst", "llumlet", "--instance-id", "dst", *BIG, "--transport", transport)
    migration = await start_big_migration(src, dst, sink, "r")
    await wait_reserved(dst)
    dst.kill()
    result = (await migration).results[0]
    # it died in stage 0 (nothing transferred, nothing committed), and the destination's death ended the migration
    assert result.outcome == llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, result
    assert result.stages == 0, result
    await sink.wait("r", timeout=60)
    assert sink.raw_indices("r") == list(range(150)), "every token once, from the source"
    assert {o.instance_id for o in sink.outputs["r"]} == {"src"}
    load = await get_load(src.address)
    assert load.free_blocks == load.total_blocks
    assert (load.migration_stats.aborted_by_destination, load.migration_stats.committed) == (1, 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_source_killed_mid_stage_destination_frees_its_reservation(
    procs: Launcher, sink: RecordingSink, transport: str
) -> None:
    src = procs.start("src", "llumlet", "--instance-id", "src", *BIG, "--transport", transport)
    dst = procs.start("dst", "llumlet", "--instance-id", "dst", *BIG, "--transport", transport)
    migration = await start_big_migration(src, dst, sink, "r")
    await wait_reserved(dst)
    src.kill()
    with pytest.raises(grpc.aio.AioRpcError):
        await migration
    t0 = time.monotonic()
    while (load := await get_load(dst.address)).reserved_blocks or load.free_blocks != load.total_blocks:
        # --pending-timeout 1: freed about 1 s after the source's last call, checked every 0.25 s
        assert time.monotonic() - t0 < 6, "reservation not freed after the source died"
        await asyncio.sleep(0.1)
    assert not load.migrating_in and load.num_running == 0 and load.num_waiting == 0


async def test_micro_benchmark_migrates_continuously_without_losing_tokens(
    etcd1: EmbeddedEtcd, procs: Launcher, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    """Paper Fig. 10's setting, scaled: two instances, one loaded with most requests, the scheduler migrating."""
    assert sink.server is not None
    endpoints = ",".join(etcd_urls(etcd1))
    common = ["--etcd", endpoints, "--cluster", etcd_cluster_name]
    scheduler = procs.start("s0", "scheduler", *common, "--replica-id", "s0")
    llumlets = [
        procs.start(
            f"l{i}",
            "llumlet",
            *common,
            "--instance-id",
            f"l{i}",
            "--profile",
            "tiny",
            "--total-blocks",
            "128",
            "--transport",
            "tcp",
        )
        for i in range(2)
    ]
    await leader_of([scheduler.address])
    n_requests, prompt, out = 24, 160, 200
    for i in range(n_requests):  # 60/40 would need a dispatcher; all on l0 is the harsher imbalance
        await add_request(llumlets[0].address, f"m{i}", sink.server.address, prompt, out)
        await asyncio.sleep(0.02)
    for i in range(n_requests):
        await sink.wait(f"m{i}", timeout=120)
        assert sink.raw_indices(f"m{i}") == list(range(out)), f"m{i}: a token lost or pushed twice"
    loads = [await get_load(c.address) for c in llumlets]
    migrated = loads[0].migration_stats.committed + loads[1].migration_stats.committed
    assert migrated >= 5, f"only {migrated} migrations"
    # Every block is free once the last token arrived, but for one race: a migration whose request finished while a
    # stage was being copied learns it at its next observation and only then tells the destination to free the
    # reservation, a round trip after the request's last output left the source. Hence a short bound (1 s), not the
    # destination's 5 s stall timeout, which is what a reservation the source forgot would need (a stage whose
    # request was preempted between its reservation and its copy did, before 8919e46).
    deadline = time.monotonic() + 1.0
    while not all(load.free_blocks == load.total_blocks for load in loads):
        held = [(load.instance_id, load.free_blocks, load.total_blocks, load.reserved_blocks) for load in loads]
        assert time.monotonic() < deadline, f"blocks not freed within 1 s of the last token: {held}"
        await asyncio.sleep(0.05)
        loads = [await get_load(c.address) for c in llumlets]
    moved = [i for i in range(n_requests) if len({o.instance_id for o in sink.outputs[f"m{i}"]}) > 1]
    assert len(moved) >= 5


def unmigrated_tokens(prompt: list[int], max_tokens: int, seed: int) -> list[int]:
    """The request's tokens on one engine, never migrated (the sim engine is deterministic)."""
    from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
    from pyllumnix.data_plane.engine.sim import SimEngine

    engine = SimEngine("tiny", payload=False)
    engine.add_request(RequestSpec("x", tuple(prompt), Sampling(max_tokens, seed=seed, ignore_eos=True)), 0.0)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step(0.0).outputs:
            tokens.extend(out.token_ids)
    return tokens


MAX_TOKENS = 400  # prompt 100 + 400 fits the tiny profile's max_model_len of 512


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
async def test_migrated_kv_bytes_and_tokens_match_across_processes(
    procs: Launcher, sink: RecordingSink, transport: str
) -> None:
    """The destinations run with --verify-kv: a commit goes through only if every block's bytes equal the source's
    (the sim engine's payload is a deterministic function of request and position). The downtime each migration
    reports is measured between real processes: above zero, below a generous bound, and the source's downtime
    histogram holds exactly these migrations."""
    assert sink.server is not None
    common = ["--profile", "tiny", "--transport", transport, "--verify-kv"]
    a = procs.start("a", "llumlet", "--instance-id", "a", *common)
    b = procs.start("b", "llumlet", "--instance-id", "b", *common)
    downtimes: list[float] = []
    async with dial(a.address) as ch:
        stub = llumlet_pb2_grpc.LlumletServiceStub(ch)
        for progress in (1, 40, 150):
            rid = f"r{progress}"
            # 400 tokens (~0.85 s on tiny): at 150 there is time left for MigrateOut's stages on a loaded host (with
            # 250, ~0.2 s was left, and the request could end first)
            await add_request(a.address, rid, sink.server.address, 100, MAX_TOKENS)
            while len(sink.tokens(rid)) < progress:
                await asyncio.sleep(0.002)
            reply = await stub.MigrateOut(
                llumlet_pb2.MigrateOutRequest(
                    destination_instance_id="b", destination_grpc_address=b.address, request_id=rid, wait=True
                ),
                timeout=30,
            )
            result = reply.results[0]
            assert result.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, result.reason
            assert result.bytes_sent > 0
            # stop-and-copy of at most 4 blocks of 32 KiB plus two RPCs: well under half a second even on a busy host
            assert 0 < result.downtime_ms < DOWNTIME_BOUND_MS, result
            assert result.total_ms >= result.downtime_ms
            downtimes.append(result.downtime_ms)
            await sink.wait(rid)
            prompt = [(i * 7 + len(rid)) % 200 + 1 for i in range(100)]
            assert sink.tokens(rid) == unmigrated_tokens(prompt, MAX_TOKENS, hash(rid) % 1000)
            assert sink.raw_indices(rid) == list(range(MAX_TOKENS))
            assert {o.instance_id for o in sink.outputs[rid]} == {"a", "b"}
    for comp in (a, b):
        load = await get_load(comp.address)
        assert load.free_blocks == load.total_blocks
    stats = (await get_load(a.address)).migration_stats
    assert (stats.committed, stats.aborted_by_source, stats.aborted_by_destination) == (3, 0, 0)
    assert list(stats.downtime_bucket_counts) == [
        sum(1 for d in downtimes if d <= le) for le in stats.downtime_bucket_le_ms
    ]
    assert stats.downtime_bucket_counts[-1] == 3 and stats.downtime_sum_ms == pytest.approx(sum(downtimes), rel=1e-6)
    assert (await get_load(b.address)).migration_stats.committed == 0, "counted where the migration went out"
