"""Leader-aware calling: redirects, failover, and which calls are (never) retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from pyllumnix.clients import (
    AsyncLlumnixClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NoLeaderError,
    NotFoundError,
    UnavailableError,
    config_paths,
)
from pyllumnix.clients.channel import EndpointPool, TlsConfig, normalize_endpoints
from pyllumnix.clients.config_paths import ConfigPathError
from pyllumnix.clients.errors import DeadlineExceededError
from pyllumnix.infra.grpc_server import DEFAULT_OPTIONS, MIN_RECV_PING_INTERVAL_MS, RunningServer
from pyllumnix.infra.security.context import ClientContext
from pyllumnix.protos.llumnix.v1 import common_pb2, config_pb2
from tests.test_clients_fakes import Blackhole, FakeAdmin, Replica, dead_address, serve_replica, stop_all

Cluster = tuple[list[RunningServer], list[Replica], list[FakeAdmin]]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A leader and a follower that knows it."""
    leader = Replica("s-0", leader=True)
    s0, a0 = await serve_replica(leader)
    follower = Replica("s-1", leader=False, leader_address=s0.address)
    s1, a1 = await serve_replica(follower)
    yield [s0, s1], [leader, follower], [a0, a1]
    await stop_all([s0, s1])


def test_normalize_endpoints() -> None:
    assert normalize_endpoints(["grpc://a:1, b:2", "a:1", "http://c:3/"]) == ["a:1", "b:2", "c:3"]
    with pytest.raises(ValueError, match="host:port"):
        normalize_endpoints("nohost")


def test_normalize_endpoints_checks_host_and_port() -> None:
    """grpc would take port 99999 modulo 65536 and report a malformed port only as an unreachable endpoint."""
    assert normalize_endpoints("[::1]:5, grpc://[fe80::1]:65535, h:1") == ["[::1]:5", "[fe80::1]:65535", "h:1"]
    for bad, why in (
        ("127.0.0.1:99999", "1 to 65535"),
        ("127.0.0.1:0", "1 to 65535"),
        ("host:abc", "1 to 65535"),
        ("host:+5", "1 to 65535"),
        ("host:", "1 to 65535"),
        ("host:" + "1" * 5000, "1 to 65535"),
        (":5", "host is missing"),
        ("[]:5", "host is missing"),
        ("::1:5", "brackets"),
        ("[::1]", "host:port"),
        ("[::1:5", "host:port"),
    ):
        with pytest.raises(ValueError, match=why):
            normalize_endpoints(bad)
    with pytest.raises(ValueError, match="1 to 65535"):
        AsyncLlumnixClient(scheduler_endpoints="127.0.0.1:99999")


def test_channels_ping_during_calls_within_the_servers_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend host that vanishes without closing the connection must fail a Generate stream (no deadline by
    default) instead of hanging it: the channels ping while a call is open, no more often than the servers allow."""
    seen: list[dict[str, Any]] = []

    def capture(target: str, *args: Any, options: Sequence[tuple[str, Any]] = (), **kwargs: Any) -> object:
        seen.append(dict(options))
        return object()

    monkeypatch.setattr(grpc.aio, "insecure_channel", capture)
    monkeypatch.setattr(grpc.aio, "secure_channel", capture)
    EndpointPool("127.0.0.1:1").channel("127.0.0.1:1")
    EndpointPool("127.0.0.1:1", tls=TlsConfig(server_name_override="x")).channel("127.0.0.1:1")
    assert len(seen) == 2
    for options in seen:
        assert options["grpc.keepalive_time_ms"] == 20_000
        # Each ping is at least the servers' minimum interval apart (else they strike and close the connection).
        assert options["grpc.keepalive_time_ms"] >= MIN_RECV_PING_INTERVAL_MS
        assert 0 < options["grpc.keepalive_timeout_ms"] <= 10_000
        assert 0 < options["grpc.http2.ping_timeout_ms"] <= 10_000  # grpc's default, 60 s, bounds some pings
        # No pings on a connection without calls: the servers forbid them (keepalive_permit_without_calls 0).
        assert options["grpc.keepalive_permit_without_calls"] == 0
        assert dict(DEFAULT_OPTIONS)["grpc.keepalive_permit_without_calls"] == 0


async def test_write_follows_leader_redirect_once_and_remembers(cluster: Cluster) -> None:
    servers, (leader, follower), _ = cluster
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[1].address]) as client:
        st = await client.cordon("i-1")
        assert st.state == common_pb2.INSTANCE_STATE_CORDONED
        assert follower.calls["CordonInstance"] == 1
        assert leader.calls["CordonInstance"] == 1
        assert client.scheduler_pool.leader_hint == servers[0].address
        # Remembered: the next write goes straight to the leader.
        await client.uncordon("i-1")
        assert follower.calls["UncordonInstance"] == 0
        assert leader.calls["UncordonInstance"] == 1


async def test_follower_without_known_leader_raises_no_leader() -> None:
    lonely = Replica("s-9", leader=False, leader_address="")
    server, _ = await serve_replica(lonely)
    try:
        async with AsyncLlumnixClient(scheduler_endpoints=[server.address], timeout=2) as client:
            with pytest.raises(NoLeaderError) as err:
                await client.scale(3)
            assert server.address in err.value.endpoints
            # Reads are answered by any replica.
            assert len(await client.list_instances()) == 2
    finally:
        await server.stop(None)


async def test_semantic_failed_precondition_is_not_a_redirect(cluster: Cluster) -> None:
    servers, (leader, _), _ = cluster
    leader.fail["Scale"] = (grpc.StatusCode.FAILED_PRECONDITION, "no instance provider")
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[0].address]) as client:
        with pytest.raises(FailedPreconditionError, match="no instance provider"):
            await client.scale(2)
    assert leader.calls["Scale"] == 1


async def test_failover_past_dead_endpoint_for_reads_and_writes(cluster: Cluster) -> None:
    servers, (leader, _), _ = cluster
    async with AsyncLlumnixClient(scheduler_endpoints=[dead_address(), servers[0].address], timeout=3) as client:
        assert {s.info.instance_id for s in await client.list_instances()} == {"i-1", "i-2"}
        # The dead endpoint never connected, so the write certainly did not start there: it moves on.
        await client.cordon("i-2")
    assert leader.calls["CordonInstance"] == 1


async def test_write_fails_over_past_a_hung_endpoint(cluster: Cluster) -> None:
    servers, (leader, _), _ = cluster
    hole = Blackhole()
    try:
        client = AsyncLlumnixClient(scheduler_endpoints=[hole.address, servers[0].address], connect_timeout=0.2)
        async with client:
            await client.drain("i-1")
    finally:
        hole.close()
    assert leader.calls["DrainInstance"] == 1


async def test_write_is_not_resent_after_unavailable_mid_call(cluster: Cluster) -> None:
    servers, (leader, _), _ = cluster
    leader.fail["MigrateRequest"] = (grpc.StatusCode.UNAVAILABLE, "connection reset")
    other = Replica("s-2", leader=True)
    s2, _ = await serve_replica(other)
    try:
        async with AsyncLlumnixClient(scheduler_endpoints=[servers[0].address, s2.address]) as client:
            with pytest.raises(UnavailableError) as err:
                await client.migrate("r-1", "i-2")
            assert err.value.may_have_started
            assert leader.calls["MigrateRequest"] == 1
            assert other.calls["MigrateRequest"] == 0
            # A read with the same failure is retried at the next endpoint.
            leader.fail["ListInstances"] = (grpc.StatusCode.UNAVAILABLE, "connection reset")
            assert len(await client.list_instances()) == 2
            assert other.calls["ListInstances"] == 1
    finally:
        await s2.stop(None)


async def test_all_endpoints_dead_lists_them() -> None:
    dead = [dead_address(), dead_address()]
    async with AsyncLlumnixClient(scheduler_endpoints=dead, timeout=2) as client:
        with pytest.raises(UnavailableError) as err:
            await client.list_instances()
        assert set(dead) <= set(err.value.endpoints)
        assert not err.value.may_have_started
        with pytest.raises(UnavailableError):
            await client.cordon("i-1")


async def test_errors_map_to_classes(cluster: Cluster) -> None:
    servers, _, _ = cluster
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[0].address]) as client:
        with pytest.raises(NotFoundError, match="i-404"):
            await client.drain("i-404")
        with pytest.raises(InvalidArgumentError, match="outside"):
            await client.scale(99)
        with pytest.raises(NotFoundError):
            await client.list_requests("nope")


async def test_set_config_sends_parsed_values_and_mask(cluster: Cluster) -> None:
    servers, _, (admin, _) = cluster
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[1].address]) as client:
        reply = await client.set_config(
            {"dispatch.policy": "infaas++", "migration.migrate_out_threshold": 5, "migration.selection": "lcr"}
        )
        sent = admin.set_requests[-1]
        assert sorted(sent.update_mask.paths) == [
            "dispatch.policy",
            "migration.migrate_out_threshold",
            "migration.selection",
        ]
        assert sent.config.dispatch.policy == config_pb2.DISPATCH_POLICY_INFAAS_PP
        assert sent.config.migration.migrate_out_threshold == 5.0
        assert sent.config.migration.selection == common_pb2.MIGRATION_SELECTION_LCR
        assert reply.config.migration.max_stages == 3  # untouched by the mask
        assert await client.get_config_value("dispatch.policy") == "DISPATCH_POLICY_INFAAS_PP"
        with pytest.raises(ConfigPathError):
            await client.set_config({"migration.nope": 1})
        assert len(admin.set_requests) == 1


async def test_membership_and_leader(cluster: Cluster) -> None:
    servers, _, _ = cluster
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[1].address, servers[0].address]) as client:
        reply = await client.leader()
        assert reply.leader_address == servers[0].address
        assert (await client.membership()).revision == 5


async def test_pool_requires_endpoints() -> None:
    with pytest.raises(ValueError):
        EndpointPool([])


async def test_read_that_runs_out_of_time_is_deadline_exceeded(cluster: Cluster) -> None:
    """Each attempt of a read has all the time left: when a slow replica uses it up, the error is the deadline, not
    "no scheduler reachable" (which would send an operator looking for a network problem)."""
    servers, (leader, follower), _ = cluster
    leader.delay["ListInstances"] = 5.0
    loop = asyncio.get_running_loop()
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[0].address, servers[1].address], timeout=0.5) as c:
        started = loop.time()
        with pytest.raises(DeadlineExceededError) as err:
            await c.list_instances()
        assert loop.time() - started < 2.0
        assert not err.value.may_have_started  # a read applies nothing
        assert servers[0].address in str(err.value)
        assert leader.calls["ListInstances"] == 1 and follower.calls["ListInstances"] == 0
    # A server's own DEADLINE_EXCEEDED while time is left is still retried at the next replica.
    leader.delay.clear()
    leader.fail["ListInstances"] = (grpc.StatusCode.DEADLINE_EXCEEDED, "an inner call timed out")
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[0].address, servers[1].address], timeout=3) as c:
        assert len(await c.list_instances()) == 2
    assert follower.calls["ListInstances"] == 1
    # A write that times out is raised as such, may have been applied, and is never re-sent.
    leader.delay["CordonInstance"] = 5.0
    async with AsyncLlumnixClient(scheduler_endpoints=[servers[0].address, servers[1].address], timeout=0.5) as c:
        with pytest.raises(DeadlineExceededError) as err:
            await c.cordon("i-1")
        assert err.value.may_have_started
    assert leader.calls["CordonInstance"] == 1 and follower.calls["CordonInstance"] == 0


def test_api_key_is_checked_when_the_config_is_made() -> None:
    """grpc refuses such a key only when a call is sent, reported as an unreachable cluster after every retry."""
    assert TlsConfig(api_key="  llx_abc-1.2/3+=\n").api_key == "llx_abc-1.2/3+="  # surrounding whitespace dropped
    assert TlsConfig(api_key="").api_key is None
    for bad in ("llx_a\nb", "llx a", "llx_é", "llx_\x00"):
        with pytest.raises(ValueError, match="not printable ASCII"):
            TlsConfig(api_key=bad)
    with pytest.raises(ValueError, match="blank"):
        TlsConfig(api_key=" \n")
    with pytest.raises(ValueError, match="not printable ASCII"):
        TlsConfig.from_files(api_key="llx_\tx")


def test_secrets_stay_out_of_repr() -> None:
    tls = TlsConfig(root_certificates=b"ROOT", private_key=b"PRIVATE-KEY-PEM", api_key="llx_secret")
    text = repr(tls)
    assert "PRIVATE-KEY-PEM" not in text and "llx_secret" not in text
    assert "ROOT" in text  # public material is still shown
    ctx = ClientContext(name="c", scheduler=["h:1"], api_key="llx_secret")
    assert "llx_secret" not in repr(ctx) and "h:1" in repr(ctx)


@pytest.mark.parametrize(
    "value",
    ["[" * 100_000, "[" + '{"priority":' * 5_000 + "1" + "}" * 5_000 + "]", config_pb2.ClusterConfig()],
)
def test_unusable_config_value_is_a_config_path_error(value: object) -> None:
    """Checked locally, before any call: never a RecursionError or AttributeError from deep inside json/protobuf."""
    with pytest.raises(ConfigPathError, match=r"bad value for priority\.headroom"):
        config_paths.make_update({"priority.headroom": value})
