"""#13 attacks on the scheduler's gRPC API: spoofed load reports, report floods, request listings by non-admins.

The real SchedulerServicer/AdminServicer are served over mutual TLS with the role interceptor, over a stand-in
replica that records the loads it is given (the replica's own logic is tested elsewhere). A llumlet may report only
its own load (PERMISSION_DENIED naming both ids, nothing of the stream applied after the spoof), reports of one
instance closer together than the floor are dropped, and ListClusterRequests is for admins only. Before #13 any
llumlet's report for any instance was applied and every report of a flood was.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from pyllumnix.control_plane.scheduler import main as scheduler_main
from pyllumnix.control_plane.scheduler.service import AdminServicer, SchedulerServicer
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.authz import RoleInterceptor
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.tls import grpc_server_credentials, secure_channel
from pyllumnix.protos.llumnix.v1 import admin_pb2, admin_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc

CLUSTER = "c1"
DEADLINE = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    return bootstrap_local(tmp_path_factory.mktemp("pki"), CLUSTER, llumlets=["i-1", "i-2"])


@dataclass
class _Cluster:
    loads: dict[str, common_pb2.InstanceLoad] = field(default_factory=dict)

    def note_cadence(self, load: common_pb2.InstanceLoad) -> None:
        """The rate floor tells the cluster the period of a held load's keep-alives; nothing to follow here."""


@dataclass
class StandInReplica:
    """The replica surface the servicers use: always leader; every report of a known instance is applied."""

    applied: list[tuple[str, int]] = field(default_factory=list)
    cluster: _Cluster = field(default_factory=_Cluster)

    def require_leader(self) -> None:
        return None

    def report(self, load: common_pb2.InstanceLoad, now: float | None = None) -> bool:
        self.applied.append((load.instance_id, load.seq))
        self.cluster.loads[load.instance_id] = load
        return True


@dataclass
class Served:
    pki: ClusterSecurity
    replica: StandInReplica
    servicer: SchedulerServicer
    address: str

    async def report(self, id: str, *loads: tuple[str, int]) -> int:
        messages = [
            scheduler_pb2.ReportLoadRequest(load=common_pb2.InstanceLoad(instance_id=i, seq=s)) for i, s in loads
        ]
        async with secure_channel(self.address, self.pki.paths("llumlet", id)) as channel:
            reply = await scheduler_pb2_grpc.SchedulerServiceStub(channel).ReportLoad(iter(messages), timeout=DEADLINE)
            return int(reply.reports_accepted)


@pytest.fixture
async def served(pki: ClusterSecurity) -> AsyncIterator[Served]:
    replica = StandInReplica()
    servicer = SchedulerServicer(replica, min_report_interval=0.2)  # type: ignore[arg-type]
    server = grpc.aio.server(interceptors=[RoleInterceptor(CLUSTER)])
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(replica), server)  # type: ignore[arg-type]
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(pki.paths("scheduler", "s0")))
    await server.start()
    try:
        yield Served(pki, replica, servicer, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


async def refused(coro: Any, code: grpc.StatusCode, needle: str) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert time.monotonic() - start < DEADLINE + 2
    assert info.value.code() == code, info.value.details()
    assert needle in (info.value.details() or ""), info.value.details()


async def test_a_llumlet_reports_only_its_own_load(served: Served) -> None:
    assert await served.report("i-2", ("i-2", 1)) == 1
    await refused(
        served.report("i-1", ("i-1", 1), ("i-2", 99), ("i-1", 2)),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller llumlet i-1 may not act for llumlet 'i-2'",
    )
    assert served.replica.applied == [("i-2", 1), ("i-1", 1)], "the spoofed report and everything after it is refused"
    assert served.replica.cluster.loads["i-2"].seq == 1


async def test_report_floods_are_dropped_per_instance(served: Served) -> None:
    accepted = await served.report("i-1", *(("i-1", n) for n in range(50)))
    assert accepted == 1 and served.servicer.reports_throttled == 49
    assert served.replica.applied == [("i-1", 0)]
    # Another instance is not held back by i-1's flood; i-1 reports again once the floor has passed.
    assert await served.report("i-2", ("i-2", 0)) == 1
    await asyncio.sleep(0.25)
    assert await served.report("i-1", ("i-1", 50)) == 1


def _roles() -> Iterator[tuple[str, str]]:
    yield from (("frontend", "f0"), ("llumlet", "i-1"), ("scheduler", "s1"))


async def test_cluster_request_listing_is_for_admins_only(served: Served) -> None:
    load = common_pb2.InstanceLoad(instance_id="i-1", requests=[common_pb2.RequestLoad(request_id="secret-prompt")])
    served.replica.cluster.loads["i-1"] = load
    for role, id in _roles():
        async with secure_channel(served.address, served.pki.paths(role, id)) as channel:
            await refused(
                admin_pb2_grpc.AdminServiceStub(channel).ListClusterRequests(
                    admin_pb2.ListClusterRequestsRequest(), timeout=DEADLINE
                ),
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller role {role} may not call /llumnix.v1.AdminService/ListClusterRequests; allowed: admin",
            )
    async with secure_channel(served.address, served.pki.paths("admin", "admin")) as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).ListClusterRequests(
            admin_pb2.ListClusterRequestsRequest(), timeout=DEADLINE
        )
    assert [r.request.request_id for r in reply.requests] == ["secret-prompt"]


def test_the_replica_id_is_the_certificates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Llumlets admit a new leader term only from the certificate the election entry names (attack 9 B3), so a
    scheduler given its certificate with --ca/--cert/--key takes the certificate's id as its replica id (it used to
    pick a random one), and refuses a --replica-id that differs."""
    paths = bootstrap_local(tmp_path / "pki", "c1").ensure("scheduler", "s7")
    started: list[str] = []

    async def fake_run(
        etcd: list[str], cluster: str, host: str, port: int, replica_id: str, *args: Any, **kw: Any
    ) -> int:
        started.append(replica_id)
        return 0

    monkeypatch.setattr(scheduler_main, "run_scheduler", fake_run)
    monkeypatch.setitem(runtime._state, "current", runtime.current())  # configure_from_cli sets the process's
    tls = ["--ca", str(paths.ca), "--cert", str(paths.cert), "--key", str(paths.key), "--etcd", "127.0.0.1:1"]
    result = CliRunner().invoke(scheduler_main.scheduler_command, [*tls, "--provider", "none"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert started == ["s7"]
    result = CliRunner().invoke(scheduler_main.scheduler_command, [*tls, "--provider", "none", "--replica-id", "s8"])
    assert result.exit_code == 2 and "--replica-id s8 is not the certificate's id 's7'" in result.output
    assert started == ["s7"]
