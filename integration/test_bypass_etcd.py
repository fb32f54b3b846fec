"""Scheduler bypass with real processes: a real etcd, real llumlets and a real frontend, and NO scheduler at all. The
frontend dispatches from the etcd-backed instance registry (fewest requests in flight): requests spread over the
registered instances and finish token-exact; an instance that leaves the registry gets no more requests, and one
that joins gets them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from integration.cluster import client_tls, etcd_urls, harness_etcd_client
from integration.procs import Component, Processes
from pyllumnix.clients import AsyncLlumnixClient
from pyllumnix.clients.client import GenerationResult
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.registry import InstanceRegistry

pytestmark = pytest.mark.integration

N = 300  # tokens per request (~0.65 s on tiny): a burst's requests all run at once, also on a loaded host


def start_llumlet(procs: Processes, etcd: EmbeddedEtcd, cluster: str, iid: str) -> Component:
    return procs.start(
        iid,
        "llumlet",
        *("--etcd", ",".join(etcd_urls(etcd)), "--cluster", cluster, "--instance-id", iid),
        *("--profile", "tiny", "--transport", "tcp"),
    )


async def registered(etcd: EmbeddedEtcd, cluster: str) -> set[str]:
    client = harness_etcd_client(etcd_urls(etcd))
    try:
        return set((await InstanceRegistry(client, KeyLayout(cluster)).list()).entries)
    finally:
        await client.close()


async def wait_registered(etcd: EmbeddedEtcd, cluster: str, want: set[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await registered(etcd, cluster)) != want:
        assert time.monotonic() < deadline, f"registry holds {got}, expected {want}"
        await asyncio.sleep(0.05)


async def burst(client: AsyncLlumnixClient, tag: str, n: int) -> list[GenerationResult]:
    """``n`` concurrent requests; each must finish with exactly N tokens from one instance (no migration here)."""
    results = await asyncio.gather(
        *(
            client.generate_text(
                f"bypass {i}", max_tokens=N, seed=i, ignore_eos=True, request_id=f"{tag}-{i}", timeout=60
            )
            for i in range(n)
        )
    )
    for r in results:
        assert r.finish_reason == "length" and len(r.token_ids) == N, (r.request_id, r.finish_reason)
        assert len(r.instances) == 1, (r.request_id, r.instances)
    return list(results)


async def test_frontend_without_scheduler_dispatches_through_the_etcd_registry(
    etcd1: EmbeddedEtcd, procs: Processes, etcd_cluster_name: str
) -> None:
    cluster = etcd_cluster_name
    start_llumlet(procs, etcd1, cluster, "l0")
    l1 = start_llumlet(procs, etcd1, cluster, "l1")
    await wait_registered(etcd1, cluster, {"l0", "l1"})
    fe = procs.start(
        "fe",
        "frontend",
        *("--etcd", ",".join(etcd_urls(etcd1)), "--cluster", cluster),  # no --scheduler: bypass only
        *("--http-port", "0", "--model", "tiny", "--max-model-len", "512"),
    )
    assert fe.ready["schedulers"] == []
    tls = await client_tls(etcd_urls(etcd1), cluster)
    async with AsyncLlumnixClient(frontend_endpoints=fe.address, timeout=10, tls=tls) as client:
        first = await burst(client, "a", 8)
        placed = Counter(r.instances[0] for r in first)
        assert placed == {"l0": 4, "l1": 4}, placed  # fewest in flight: concurrent requests alternate
        # token-exact: the same prompt and seed, one at a time, give the same tokens wherever they run
        for i, r in enumerate(first[:3]):
            again = await client.generate_text(f"bypass {i}", max_tokens=N, seed=i, ignore_eos=True, timeout=60)
            assert again.token_ids == r.token_ids, f"bypass {i}: tokens differ between runs"

        # an instance that leaves (SIGTERM: it revokes its lease) gets no more requests
        assert l1.terminate() == 0
        await wait_registered(etcd1, cluster, {"l0"})
        second = await burst(client, "b", 4)
        assert {r.instances[0] for r in second} == {"l0"}

        # an instance that joins the registry gets requests
        start_llumlet(procs, etcd1, cluster, "l2")
        await wait_registered(etcd1, cluster, {"l0", "l2"})
        third = await burst(client, "c", 8)
        assert Counter(r.instances[0] for r in third) == {"l0": 4, "l2": 4}
