"""A scheduler replica and a llumlet bound on the IPv6 loopback, as real processes with a real etcd: what they
advertise (the election entry, the registry's InstanceInfo, the ready lines) is an address peers can dial.

Before ``infra.grpc_server.advertised_address`` both advertised ``::1:<port>`` (no gRPC target): clients following the
leader, the llumlet's load reporter and anyone dialling the registered instance could not reach them, and the llumlet's
metrics address was no URL.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from integration.cluster import dial, etcd_urls, harness_etcd_client, leader_of, list_instances
from integration.procs import Processes
from pyllumnix.data_plane.transport.tcp import parse_tcp_address
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.registry import InstanceRegistry
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_infra_grpc_server import ipv6_loopback

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host"),
]


async def test_scheduler_and_llumlet_on_ipv6_loopback_advertise_dialable_addresses(
    etcd1: EmbeddedEtcd, procs: Processes, sink: RecordingSink, etcd_cluster_name: str
) -> None:
    etcd = ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", etcd_cluster_name]
    scheduler = procs.start("s6", "scheduler", *etcd, "--host", "::1", "--replica-id", "s6")
    llumlet = procs.start(
        "l6",
        "llumlet",
        *etcd,
        "--host",
        "::1",
        "--instance-id",
        "l6",
        "--profile",
        "tiny",
        "--transport",
        "tcp",
        "--lease-ttl",
        "1",
    )
    assert scheduler.address.startswith("[::1]:") and llumlet.address.startswith("[::1]:")
    client = harness_etcd_client(etcd_urls(etcd1))
    try:
        # The election entry: what clients following the leader trailer and the llumlet's reporter dial.
        leader = await leader_of([scheduler.address], timeout=20)
        leader_address = leader.leader_address
        assert leader_address == scheduler.address
        # The registry entry: the address the scheduler and other llumlets dial this instance at.
        info = common_pb2.InstanceInfo()
        info.ParseFromString((await InstanceRegistry(client, KeyLayout(etcd_cluster_name)).list()).entries["l6"])
        assert info.grpc_address == llumlet.address
        host, port = parse_tcp_address(info.data_plane_address)
        assert host == "::1"
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)  # the data plane listens there
        writer.close()
        await writer.wait_closed()
        # The llumlet reached the leader at its advertised address: its load reports arrive.
        deadline = time.monotonic() + 20
        while not any(i.info.instance_id == "l6" and i.load.seq > 0 for i in await list_instances(leader_address)):
            assert time.monotonic() < deadline, "the llumlet's load never reached the leader"
            await asyncio.sleep(0.1)
        # A request through the registered address runs to its end.
        assert sink.server is not None
        request = common_pb2.EngineRequest(
            request_id="v6",
            prompt_token_ids=list(range(1, 9)),
            sampling=common_pb2.SamplingParams(max_tokens=4, seed=7),
            frontend_address=sink.server.address,
        )
        async with dial(info.grpc_address) as channel:
            await llumlet_pb2_grpc.LlumletServiceStub(channel).AddRequest(
                llumlet_pb2.AddRequestRequest(request=request), timeout=10
            )
        await sink.wait("v6")
        assert sink.raw_indices("v6") == [0, 1, 2, 3]
        # The metrics address is a URL's host:port.
        url = f"http://{llumlet.ready['metrics_address']}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(10)) as reply:
            assert reply.status == 200
            assert "vllm:num_requests_running" in await reply.text()
    finally:
        await client.close()
