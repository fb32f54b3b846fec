"""UCX migrations must leave no busy loop behind: idle llumlets that moved KV over UCX go back to (almost) no CPU.

With ucxx's own asyncio progress (0.52, ``UCXPY_PROGRESS_MODE=blocking``) every llumlet that took part in a UCX
migration spun at 50-100 % of a core while idle, for good. Real llumlet processes registered in a real etcd, real UCX;
the figure is CPU time the idle process consumed (utime + stime from /proc), which other load on the host does not
inflate the way it inflates wall-clock utilisation."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from integration.cluster import add_request, dial, etcd_urls, harness_leadership
from pyllumnix.data_plane.transport import ucx_available
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.protos.llumnix.v1 import llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.launch import Component, Launcher
from pyllumnix.tools.recording_sink import RecordingSink

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])"),
]

MIGRATIONS = 20
WINDOW_S = 3.0
MAX_IDLE_SHARE = 0.03  # of one core


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_shares(comps: list[Component], window: float = WINDOW_S) -> dict[str, float]:
    """Each process's CPU time over ``window`` seconds, as a share of one core."""
    before = {c.name: cpu_seconds(c.pid) for c in comps}
    await asyncio.sleep(window)
    return {c.name: (cpu_seconds(c.pid) - before[c.name]) / window for c in comps}


async def migrate(src: Component, dst: Component, sink: RecordingSink, rid: str, term: int) -> None:
    """One request migrated mid-decode from ``src`` to ``dst`` over the data plane, then aborted there."""
    assert sink.server is not None
    await add_request(src.address, rid, sink.server.address, 100, 400)
    while len(sink.tokens(rid)) < 2:
        await asyncio.sleep(0.005)
    async with dial(src.address) as ch:
        reply = await llumlet_pb2_grpc.LlumletServiceStub(ch).MigrateOut(
            llumlet_pb2.MigrateOutRequest(
                destination_instance_id=dst.ready["instance_id"],
                destination_grpc_address=dst.address,
                request_id=rid,
                wait=True,
            ),
            timeout=60,
            metadata=term_metadata(term),
        )
    result = reply.results[0]
    assert result.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, result.reason
    assert result.bytes_sent > 0
    async with dial(dst.address) as ch:
        try:
            await llumlet_pb2_grpc.LlumletServiceStub(ch).AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id=rid), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # it finished there already
                raise
    await sink.wait(rid, timeout=60)


async def test_idle_llumlets_use_no_cpu_after_ucx_migrations(
    etcd1: EmbeddedEtcd, procs: Launcher, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    common = ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", etcd_cluster_name]
    common += ["--profile", "tiny", "--transport", "ucx"]
    a = procs.start("a", "llumlet", "--instance-id", "a", *common)
    b = procs.start("b", "llumlet", "--instance-id", "b", *common)
    assert a.ready["transport"] == b.ready["transport"] == "ucx"
    baseline = await idle_shares([a, b])
    async with harness_leadership(etcd_urls(etcd1), etcd_cluster_name) as term:  # no scheduler runs: the harness leads
        for i in range(MIGRATIONS):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            await migrate(src, dst, sink, f"r{i}", term)
    await asyncio.sleep(1.0)  # the last load reports and lease renewals after the aborts
    shares = await idle_shares([a, b])
    print(f"idle share of one core: before {baseline}, after {MIGRATIONS} UCX migrations {shares}")
    assert all(share < MAX_IDLE_SHARE for share in shares.values()), (
        f"idle CPU after {MIGRATIONS} UCX migrations {shares} (share of one core over {WINDOW_S:g} s; "
        f"before any migration {baseline})"
    )
