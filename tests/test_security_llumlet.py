"""#13 attacks on a llumlet: prompt/KV theft by migration orders, spoofed orders, hijacked migrations, slot hogging.

A real llumlet (sim engine with payload, migration coordinator, in-process transport) is served over mutual TLS with
the role interceptor; a victim request runs on it, its outputs going to a recording sink. Attackers call with other
roles, with the scheduler's role but no or an old leader term, with a destination that is not registered or registered
elsewhere, and as llumlets that do not hold the migration they drive. Every attack is refused with PERMISSION_DENIED
(or FAILED_PRECONDITION for a stale term, ABORTED for a second reservation), the fake destination receives nothing,
and the victim finishes token-exact with every block freed. Before #13 the llumlet obeyed every one of these calls.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator, MigrationSettings, data_key
from pyllumnix.data_plane.llumlet.service import (
    ADD_REQUEST_METHOD,
    MAX_STREAMS_PER_CALLER,
    LlumletServicer,
    election_leader,
)
from pyllumnix.data_plane.llumlet.service import forwarded_abort_metadata as forwarded
from pyllumnix.data_plane.transport.fusion import chunk_key_of
from pyllumnix.data_plane.transport.inproc import InprocTransport
from pyllumnix.infra.etcd.election import LeaderInfo
from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.infra.framed_calls import UnaryChannel, listen_calls
from pyllumnix.infra.security.authz import RoleInterceptor
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.ca import role_name
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.infra.security.tls import client_ssl_context, grpc_server_credentials, secure_channel, server_ssl_context
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import admin_pb2, common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.recording_sink import RecordingSink

CLUSTER = "c1"
DEADLINE = 5.0
PROMPT = [(7 * i) % 250 + 1 for i in range(40)]
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    return bootstrap_local(tmp_path_factory.mktemp("pki"), CLUSTER, llumlets=["i-1", "i-2", "i-3"])


class FakeDestination(llumlet_pb2_grpc.LlumletServiceServicer):
    """An attacker's "destination": records anything a llumlet sends it."""

    def __init__(self) -> None:
        self.received: list[str] = []

    async def PreAllocate(
        self, request: llumlet_pb2.PreAllocateRequest, context: Any
    ) -> llumlet_pb2.PreAllocateResponse:
        self.received.append(
            f"PreAllocate {request.request.request.request_id} {list(request.request.request.prompt_token_ids)[:3]}"
        )
        return llumlet_pb2.PreAllocateResponse()


@dataclass
class Node:
    pki: ClusterSecurity
    llumlet: Llumlet
    engine: SimEngine
    coordinator: MigrationCoordinator
    servicer: LlumletServicer
    address: str
    sink: RecordingSink
    fake: FakeDestination
    fake_address: str
    registry: dict[str, str]
    transport: InprocTransport

    def stub(self, role: str, id: str) -> tuple[grpc.aio.Channel, llumlet_pb2_grpc.LlumletServiceStub]:
        channel = secure_channel(self.address, self.pki.paths(role, id))
        return channel, llumlet_pb2_grpc.LlumletServiceStub(channel)

    async def call(self, role: str, id: str, method: str, request: Any, **kwargs: Any) -> Any:
        channel, stub = self.stub(role, id)
        async with channel:
            return await getattr(stub, method)(request, timeout=DEADLINE, **kwargs)


async def refused(coro: Any, code: grpc.StatusCode, *needles: str) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert time.monotonic() - start < DEADLINE + 2, "a refusal comes at once, never a hang"
    assert info.value.code() == code, info.value.details()
    for needle in needles:
        assert needle in (info.value.details() or ""), info.value.details()


@pytest.fixture
async def node(pki: ClusterSecurity) -> AsyncIterator[Node]:
    engine = SimEngine("tiny")
    llumlet = Llumlet(engine, "i-1")
    transport = InprocTransport()
    await transport.start()
    coordinator = MigrationCoordinator(llumlet, transport, MigrationSettings(pending_timeout_s=1.0))
    registry: dict[str, str] = {}

    async def resolve(instance_id: str) -> str | None:
        return registry.get(instance_id)

    servicer = LlumletServicer(llumlet, coordinator, registry=resolve)
    server = grpc.aio.server(interceptors=[RoleInterceptor(CLUSTER)])
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(pki.paths("llumlet", "i-1")))
    await server.start()
    fake = FakeDestination()  # type: ignore[abstract]
    fake_server = grpc.aio.server()
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(fake, fake_server)
    fake_port = fake_server.add_insecure_port("127.0.0.1:0")
    await fake_server.start()
    sink = RecordingSink()
    await sink.start()
    llumlet.start()
    coordinator.start()
    try:
        yield Node(
            pki,
            llumlet,
            engine,
            coordinator,
            servicer,
            f"127.0.0.1:{port}",
            sink,
            fake,
            f"127.0.0.1:{fake_port}",
            registry,
            transport,
        )
    finally:
        await server.stop(None)
        await fake_server.stop(None)
        await coordinator.close()
        await llumlet.stop()
        await transport.close()
        await sink.stop()


def expected_tokens() -> list[int]:
    engine = SimEngine("tiny", payload=False)
    engine.add_request(RequestSpec("x", tuple(PROMPT), Sampling(MAX_TOKENS, seed=11, ignore_eos=True)), 0.0)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step(0.0).outputs:
            tokens.extend(out.token_ids)
    return tokens


async def add_victim(node: Node) -> None:
    assert node.sink.server is not None
    await node.call(
        "frontend",
        "f0",
        "AddRequest",
        llumlet_pb2.AddRequestRequest(
            request=common_pb2.EngineRequest(
                request_id="victim",
                prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=11, ignore_eos=True),
                frontend_address=node.sink.server.address,
            )
        ),
    )


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def assert_victim_untouched(node: Node) -> None:
    await node.sink.wait("victim")
    assert node.sink.tokens("victim") == expected_tokens()
    assert node.sink.outputs["victim"][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    await until(lambda: node.engine.load().free_blocks == node.engine.load().total_blocks, "every block freed")
    assert node.llumlet.stats.migrations_out == 0 and not node.coordinator.results
    assert node.fake.received == [], "the fake destination must receive nothing"


async def test_migration_orders_need_the_leader_and_a_registered_destination(node: Node) -> None:
    await add_victim(node)
    await until(lambda: len(node.sink.tokens("victim")) >= 2, "the victim to run")
    steal = llumlet_pb2.MigrateOutRequest(
        destination_instance_id="i-2", destination_grpc_address=node.fake_address, request_id="victim", wait=True
    )
    # Other roles may not order at all.
    for role, id in (("frontend", "f0"), ("llumlet", "i-2"), ("admin", "admin")):
        await refused(
            node.call(role, id, "MigrateOut", steal),
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller role {role} may not call /llumnix.v1.LlumletService/MigrateOut",
        )
    # The scheduler's role without a leader term is not enough.
    await refused(
        node.call("scheduler", "s1", "MigrateOut", steal),
        grpc.StatusCode.PERMISSION_DENIED,
        "the order carries no leader term",
    )
    # A term, but a destination that is not registered / registered at another address.
    await refused(
        node.call("scheduler", "s0", "MigrateOut", steal, metadata=term_metadata(7)),
        grpc.StatusCode.PERMISSION_DENIED,
        "destination 'i-2' is not a registered instance",
    )
    node.registry["i-2"] = "127.0.0.1:1"
    await refused(
        node.call("scheduler", "s0", "MigrateOut", steal, metadata=term_metadata(7)),
        grpc.StatusCode.PERMISSION_DENIED,
        f"destination i-2 is registered at 127.0.0.1:1, not {node.fake_address}",
    )
    # A deposed leader (older term than one seen) is refused whatever it orders.
    node.registry["i-2"] = node.fake_address
    await refused(
        node.call("scheduler", "s1", "MigrateOut", steal, metadata=term_metadata(5)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale leader: term 5 < 7",
    )
    drain = llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_DRAINING)
    await refused(
        node.call("scheduler", "s1", "SetInstanceState", drain, metadata=term_metadata(5)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale leader",
    )
    await refused(
        node.call("scheduler", "s1", "SetInstanceState", drain), grpc.StatusCode.PERMISSION_DENIED, "no leader term"
    )
    await refused(
        node.call("admin", "admin", "SetInstanceState", drain),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller role admin may not call",
    )
    assert node.llumlet.state == InstanceState.ACTIVE
    # The current leader's order goes through (a newer term is admitted too).
    cordon = llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_CORDONED)
    await node.call("scheduler", "s0", "SetInstanceState", cordon, metadata=term_metadata(8))
    assert int(node.llumlet.state) == InstanceState.CORDONED  # int(): mypy keeps the narrowing of the assert above
    assert node.servicer.fence.highest_seen == 8
    await assert_victim_untouched(node)


def migrating(frontend: str) -> llumlet_pb2.MigratingRequest:
    return llumlet_pb2.MigratingRequest(
        request=common_pb2.EngineRequest(
            request_id="incoming",
            prompt_token_ids=[3, 4, 5, 6],
            sampling=common_pb2.SamplingParams(max_tokens=8),
            frontend_address=frontend,
        ),
        num_computed_tokens=0,
    )


def pre(mid: str, source: str, *, stage: int = 0, blocks: int = 2) -> llumlet_pb2.PreAllocateRequest:
    request = llumlet_pb2.PreAllocateRequest(
        migration_id=mid, source_instance_id=source, stage=stage, num_blocks=blocks
    )
    if stage == 0:
        request.request.CopyFrom(migrating("127.0.0.1:7000"))
        request.kv_layout = SimEngine("tiny", payload=False).kv_layout().encode()  # a peer of the same engine
    return request


async def test_migration_destination_is_bound_to_its_source(node: Node) -> None:
    await add_victim(node)
    total = node.engine.load().total_blocks
    # Only llumlets reserve, and only for themselves.
    await refused(
        node.call("frontend", "f0", "PreAllocate", pre("m0", "i-2")),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller role frontend may not call",
    )
    await refused(
        node.call("llumlet", "i-2", "PreAllocate", pre("m0", "i-3")),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller llumlet i-2 may not reserve for source 'i-3'",
    )
    reply = await node.call("llumlet", "i-2", "PreAllocate", pre("m1", "i-2"))
    assert len(reply.block_ids) == 2
    assert node.coordinator.incoming_source("m1") == "i-2"
    # One reservation per source: a second migration of i-2 cannot take more slots or blocks.
    await refused(
        node.call("llumlet", "i-2", "PreAllocate", pre("m2", "i-2")),
        grpc.StatusCode.ABORTED,
        "source i-2 already holds reservation m1",
    )
    # Another llumlet cannot drive, commit or abort i-2's migration.
    await refused(
        node.call("llumlet", "i-3", "PreAllocate", pre("m1", "i-3", stage=1)),
        grpc.StatusCode.PERMISSION_DENIED,
        "migration m1 belongs to source i-2, not i-3",
    )
    stage = llumlet_pb2.TransferStageRequest(migration_id="m1", stage=0, block_ids=list(reply.block_ids), last=True)
    await refused(
        node.call("llumlet", "i-3", "TransferStage", stage), grpc.StatusCode.PERMISSION_DENIED, "belongs to source i-2"
    )
    commit = llumlet_pb2.CommitMigrationRequest(
        migration_id="m1", request=migrating("127.0.0.1:7000"), block_ids=list(reply.block_ids)
    )
    await refused(
        node.call("llumlet", "i-3", "CommitMigration", commit),
        grpc.StatusCode.PERMISSION_DENIED,
        "belongs to source i-2",
    )
    await refused(
        node.call("llumlet", "i-3", "AbortMigration", llumlet_pb2.AbortMigrationRequest(migration_id="m1")),
        grpc.StatusCode.PERMISSION_DENIED,
        "belongs to source i-2",
    )
    # Even the source cannot redirect the request's outputs to another frontend at the commit.
    hijack = llumlet_pb2.CommitMigrationRequest(
        migration_id="m1", request=migrating("127.0.0.1:6666"), block_ids=list(reply.block_ids)
    )
    await refused(
        node.call("llumlet", "i-2", "CommitMigration", hijack),
        grpc.StatusCode.PERMISSION_DENIED,
        "announced request incoming of frontend 127.0.0.1:7000; the commit names incoming of 127.0.0.1:6666",
    )
    assert node.coordinator.incoming_source("m1") == "i-2", "a refused call leaves the reservation as it was"
    # A source that goes silent loses its reservation (pending timeout): blocks and the slot come back.
    await until(lambda: not node.coordinator.incoming_from("i-2"), "the silent source's reservation to expire")
    # An ended migration still belongs to its source (a repeated commit is answered for ENDED_KEEP_S): before, any
    # llumlet's commit for it was answered, telling it how the migration ended.
    await refused(
        node.call("llumlet", "i-3", "CommitMigration", commit),
        grpc.StatusCode.PERMISSION_DENIED,
        "migration m1 belongs to source i-2, not llumlet i-3",
    )
    # Nor does an ended id open a second reservation for its source (REVIEW11: the source of an ended id was known,
    # so the one-reservation-per-source check was skipped), nor a new one under the old id.
    await node.call("llumlet", "i-2", "PreAllocate", pre("m4", "i-2"))
    await refused(
        node.call("llumlet", "i-2", "PreAllocate", pre("m1", "i-2")),
        grpc.StatusCode.ABORTED,
        "source i-2 already holds reservation m4",
    )
    await node.call("llumlet", "i-2", "AbortMigration", llumlet_pb2.AbortMigrationRequest(migration_id="m4"))
    await refused(
        node.call("llumlet", "i-2", "PreAllocate", pre("m1", "i-2")),
        grpc.StatusCode.ALREADY_EXISTS,
        "migration m1 ended here; a new migration needs a new id",
    )
    reply = await node.call("llumlet", "i-3", "PreAllocate", pre("m3", "i-3"))
    assert len(reply.block_ids) == 2
    await node.call("llumlet", "i-3", "AbortMigration", llumlet_pb2.AbortMigrationRequest(migration_id="m3"))
    await assert_victim_untouched(node)
    assert node.engine.load().free_blocks == total


async def test_load_streams_per_caller_are_capped(node: Node) -> None:
    channel, stub = node.stub("scheduler", "s0")
    async with channel:
        calls = [stub.StreamLoad(llumlet_pb2.StreamLoadRequest(interval_ms=50)) for _ in range(MAX_STREAMS_PER_CALLER)]
        for call in calls:
            await call.read()
        extra = stub.StreamLoad(llumlet_pb2.StreamLoadRequest(interval_ms=50), timeout=DEADLINE)
        await refused(extra.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, f"already holds {MAX_STREAMS_PER_CALLER}")
        # Another caller is not affected; a closed stream frees its place.
        other, other_stub = node.stub("admin", "admin")
        async with other:
            await other_stub.StreamLoad(llumlet_pb2.StreamLoadRequest(interval_ms=50)).read()
        calls[0].cancel()
        await until(lambda: node.servicer._streams.get("scheduler/s0") == MAX_STREAMS_PER_CALLER - 1, "a place freed")
        again = stub.StreamLoad(llumlet_pb2.StreamLoadRequest(interval_ms=50))
        assert (await again.read()).load.instance_id == "i-1"
        for call in [*calls[1:], again]:
            call.cancel()


async def test_a_verifying_destination_refuses_a_stage_without_crc() -> None:
    """Integrity checking cannot be switched off by the sender: a source that sends no CRC gets DATA_LOSS and keeps
    the request (which then finishes token-exact there), and the destination frees what it reserved."""
    from tests.test_migration_paths import make_node, migrate, request, unmigrated_tokens, wait_tokens

    sink = RecordingSink()
    await sink.start()
    src = await make_node("src", settings=MigrationSettings(verify_crc=False))
    dst = await make_node("dst")  # the default: verify_crc=True
    try:
        free = dst.free
        await src.stub.AddRequest(request("r", sink, 64, 120), timeout=DEADLINE)
        await wait_tokens(sink, "r", 4)
        reply = await src.stub.MigrateOut(migrate(src, dst, "r"), timeout=30)
        result = reply.results[0]
        assert result.outcome == llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION, result
        assert "DATA_LOSS" in result.reason and "crc 0" in result.reason, result.reason
        await sink.wait("r")
        assert sink.tokens("r") == unmigrated_tokens(64, 120)
        await until(lambda: dst.free == free, "the destination to free its reservation")
    finally:
        await src.close()
        await dst.close()
        await sink.stop()


async def test_only_the_answered_source_can_write_a_migrations_bytes(node: Node) -> None:
    """Data-plane keys embed the one-time token of the PreAllocate answer: a peer that knows the migration id but not
    the token writes nowhere, while the source's bytes land and pass the CRC check."""
    reply = await node.call("llumlet", "i-2", "PreAllocate", pre("m1", "i-2"))
    assert reply.transfer_token, "the destination answers a one-time data-plane token"
    nbytes = len(reply.block_ids) * node.engine.block_bytes
    forged = np.full(nbytes, 0xAB, dtype=np.uint8)
    legit = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
    attacker = InprocTransport()
    source = InprocTransport()
    await attacker.start()
    await source.start()
    try:
        for key in ("m1/0/0", f"m1~{'A' * 24}/0/0", chunk_key_of(data_key("m1", "guess", 0), 0)):
            await attacker.send(reply.data_plane_address, key, forged, timeout=DEADLINE)
        await source.send(
            reply.data_plane_address, chunk_key_of(data_key("m1", reply.transfer_token, 0), 0), legit, timeout=DEADLINE
        )
        stage = llumlet_pb2.TransferStageRequest(
            migration_id="m1",
            stage=0,
            block_ids=list(reply.block_ids),
            num_bytes=nbytes,
            crc32=zlib.crc32(legit.data),
            last=True,
        )
        got = await node.call("llumlet", "i-2", "TransferStage", stage)
        assert got.bytes_received == nbytes, "exactly the source's bytes landed"
    finally:
        await attacker.close()
        await source.close()
        await node.call("llumlet", "i-2", "AbortMigration", llumlet_pb2.AbortMigrationRequest(migration_id="m1"))


async def test_a_llumlet_aborts_only_what_it_migrated_here(node: Node) -> None:
    """A5: the llumlet role may call AbortRequest so a migration source can forward its client's abort after the
    commit. Another llumlet's certificate aborts neither a request that came from a frontend nor one another source
    migrated here (PERMISSION_DENIED, no tombstone); the source that migrated a request here may abort it; frontends
    and the scheduler keep their rights. Before the fix every llumlet could abort every request by id."""
    pki = node.pki
    engine = SimEngine("tiny")
    source = Llumlet(engine, "i-2")
    transport = InprocTransport()
    await transport.start()
    coordinator = MigrationCoordinator(source, transport)
    # The source dials the destination with its own llumlet certificate (what open_channel does in a configured
    # process); the destination's role interceptor and servicer then see caller llumlet i-2.
    coordinator._channels[node.address] = secure_channel(node.address, pki.paths("llumlet", "i-2"))
    source.start()
    coordinator.start()
    assert node.sink.server is not None
    try:
        await add_victim(node)
        await source.add_request(
            common_pb2.EngineRequest(
                request_id="moved",
                prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=11, ignore_eos=True),
                frontend_address=node.sink.server.address,
            )
        )
        await until(lambda: len(node.sink.tokens("moved")) >= 2, "'moved' to run on its source")
        order = llumlet_pb2.MigrateOutRequest(
            destination_instance_id="i-1", destination_grpc_address=node.address, request_id="moved", wait=True
        )
        result = (await coordinator.migrate_out(order)).results[0]
        assert result.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, result.reason
        assert node.coordinator.migrated_from("moved") == "i-2"
        abort = llumlet_pb2.AbortRequestRequest
        # Another llumlet: neither the migrated request nor the frontend's, nor an unknown id (no tombstone).
        for caller, rid in (("i-3", "moved"), ("i-2", "victim"), ("i-3", "victim"), ("i-2", "ghost")):
            await refused(
                node.call("llumlet", caller, "AbortRequest", abort(request_id=rid)),
                grpc.StatusCode.PERMISSION_DENIED,
                f"llumlet {caller} may abort only a request it migrated to i-1; {rid!r} did not come from it",
            )
        assert "ghost" not in node.servicer.tombstones
        n = len(node.sink.tokens("moved"))
        await until(lambda: len(node.sink.tokens("moved")) > n, "'moved' to keep running after the refusals")
        # Its source, naming no migration or another one (a later incarnation of the id could be hit): refused.
        await refused(
            node.call("llumlet", "i-2", "AbortRequest", abort(request_id="moved")),
            grpc.StatusCode.PERMISSION_DENIED,
            "llumlet i-2's abort of 'moved' names no migration",
        )
        # Another migration named in the field, or (a source older than the field) in the metadata entry.
        for request, metadata in (
            (abort(request_id="moved", migration_id="i-2-other"), ()),
            (abort(request_id="moved"), forwarded("i-2-other")),
        ):
            await refused(
                node.call("llumlet", "i-2", "AbortRequest", request, metadata=metadata),
                grpc.StatusCode.NOT_FOUND,
                "the request 'moved' that migration i-2-other brought to i-1 is no longer here",
            )
        # Its source forwards the client's abort, naming the migration in the request: it ends where it lives now.
        await node.call("llumlet", "i-2", "AbortRequest", abort(request_id="moved", migration_id=result.migration_id))
        outs = await node.sink.wait("moved")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT and outs[-1].instance_id == "i-1"
        assert node.coordinator.migrated_from("moved") is None, "an ended request is nobody's to abort any more"
        # Frontends and the scheduler keep theirs (an unknown id: NOT_FOUND, and its late add is refused).
        for role, id, rid in (("frontend", "f0", "ghost-f"), ("scheduler", "s0", "ghost-s")):
            await refused(node.call(role, id, "AbortRequest", abort(request_id=rid)), grpc.StatusCode.NOT_FOUND)
            assert rid in node.servicer.tombstones
        # The victim went on untouched (assert_victim_untouched expects no migration *out* of i-1: none happened).
        await node.sink.wait("victim")
        assert node.sink.tokens("victim") == expected_tokens()
        assert node.sink.outputs["victim"][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        await until(lambda: node.engine.load().free_blocks == node.engine.load().total_blocks, "every block freed")
    finally:
        await coordinator.close()
        await source.stop()
        await transport.close()


async def test_a_forwarded_abort_follows_the_request_on_over_mtls(node: Node) -> None:
    """REL2 over mutual TLS: 'moved' migrates i-2 -> i-1 -> i-3, and i-2's abort (naming its migration) reaches i-1
    after the second commit. i-1 lets its source through (the request it passed on came from i-2) and passes the
    abort on with its own certificate, naming its own migration; i-3 takes it from i-1 (its source) and ends the
    request, freeing its blocks. Another llumlet naming i-2's migration is still refused. Before, i-1 refused i-2
    (PERMISSION_DENIED: the request no longer lived there) and the request ran on at i-3."""
    pki = node.pki
    assert node.sink.server is not None
    parts: list[tuple[Llumlet, InprocTransport, MigrationCoordinator]] = []
    for iid in ("i-2", "i-3"):
        transport = InprocTransport()
        await transport.start()
        llumlet = Llumlet(SimEngine("tiny"), iid)
        parts.append((llumlet, transport, MigrationCoordinator(llumlet, transport)))
    (source, _, first), (last, _, third) = parts
    server = grpc.aio.server(interceptors=[RoleInterceptor(CLUSTER)])
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(LlumletServicer(last, third), server)
    last_address = (
        f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', grpc_server_credentials(pki.paths('llumlet', 'i-3')))}"
    )
    await server.start()
    # Each dials the next with its own llumlet certificate (what open_channel does in a configured process).
    first._channels[node.address] = secure_channel(node.address, pki.paths("llumlet", "i-2"))
    node.coordinator._channels[last_address] = secure_channel(last_address, pki.paths("llumlet", "i-1"))
    for llumlet, _, coordinator in parts:
        llumlet.start()
        coordinator.start()
    try:
        await source.add_request(
            common_pb2.EngineRequest(
                request_id="moved",
                prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=11, ignore_eos=True),
                frontend_address=node.sink.server.address,
            )
        )
        await until(lambda: len(node.sink.tokens("moved")) >= 2, "'moved' to run on its source")
        hops = []
        for coordinator, iid, address in ((first, "i-1", node.address), (node.coordinator, "i-3", last_address)):
            order = llumlet_pb2.MigrateOutRequest(
                destination_instance_id=iid, destination_grpc_address=address, request_id="moved", wait=True
            )
            hops.append((await coordinator.migrate_out(order)).results[0])
            assert hops[-1].outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, hops[-1].reason
        assert third.migrated_from("moved") == "i-1" and node.coordinator.migrated_from("moved") is None
        late = llumlet_pb2.AbortRequestRequest(request_id="moved", migration_id=hops[0].migration_id)
        await refused(
            node.call("llumlet", "i-3", "AbortRequest", late),
            grpc.StatusCode.PERMISSION_DENIED,
            "llumlet i-3 may abort only a request it migrated to i-1",
        )
        await node.call("llumlet", "i-2", "AbortRequest", late)  # i-2's forward, late: i-1 passes it on
        outs = await node.sink.wait("moved")
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT and outs[-1].instance_id == "i-3"
        assert len(node.sink.tokens("moved")) < MAX_TOKENS
        await until(lambda: last.engine.load().free_blocks == last.engine.load().total_blocks, "i-3's blocks freed")
    finally:
        await server.stop(None)
        for llumlet, transport, coordinator in parts:
            await coordinator.close()
            await llumlet.stop()
            await transport.close()


async def test_a_made_up_leader_term_is_refused_and_the_leader_keeps_its_llumlet(node: Node) -> None:
    """Attack 9 B3: a scheduler certificate that does not lead (a follower's) sent one order with a made-up huge term;
    the llumlet raised its fence to it and refused every order of the real leader until it restarted. A new term is
    now admitted only once etcd (here: what the election names) proves the caller leads in it."""
    etcd: dict[str, Any] = {"leader": (40, "s0"), "down": False}

    async def leader_of() -> tuple[int, str] | None:
        if etcd["down"]:
            raise EtcdUnavailableError("range", ["127.0.0.1:1"], 0.1, "connection refused")
        leader: tuple[int, str] | None = etcd["leader"]
        return leader

    fence = node.servicer.fence
    fence.leader_of = leader_of

    def state(value: int) -> llumlet_pb2.SetInstanceStateRequest:
        return llumlet_pb2.SetInstanceStateRequest(state=value)  # type: ignore[arg-type]

    active, cordoned = common_pb2.INSTANCE_STATE_ACTIVE, common_pb2.INSTANCE_STATE_CORDONED
    await refused(
        node.call("scheduler", "s1", "SetInstanceState", state(active), metadata=term_metadata(1 << 62)),
        grpc.StatusCode.PERMISSION_DENIED,
        f"leader term {1 << 62} is not the current leader's (etcd names term 40 of s0)",
    )
    await refused(  # the leader's real term, claimed by another replica
        node.call("scheduler", "s1", "SetInstanceState", state(active), metadata=term_metadata(40)),
        grpc.StatusCode.PERMISSION_DENIED,
        "leader term 40 is s0's, not s1's",
    )
    assert fence.highest_seen == 0
    # The real leader's next order is admitted.
    await node.call("scheduler", "s0", "SetInstanceState", state(cordoned), metadata=term_metadata(40))
    assert int(node.llumlet.state) == InstanceState.CORDONED
    assert fence.highest_seen == 40 and fence.reads == 2  # one read per new term: 2^62 and 40
    # etcd unreachable: the proven term goes on without a read, a new one is refused until it can be proven.
    etcd["down"] = True
    await node.call("scheduler", "s0", "SetInstanceState", state(active), metadata=term_metadata(40))
    assert int(node.llumlet.state) == InstanceState.ACTIVE and fence.reads == 2
    etcd["leader"] = (55, "s1")
    await refused(
        node.call("scheduler", "s1", "SetInstanceState", state(cordoned), metadata=term_metadata(55)),
        grpc.StatusCode.UNAVAILABLE,
        "leader term 55 cannot be checked now: etcd unavailable",
    )
    assert int(node.llumlet.state) == InstanceState.ACTIVE
    etcd["down"] = False
    await node.call("scheduler", "s1", "SetInstanceState", state(cordoned), metadata=term_metadata(55))
    assert int(node.llumlet.state) == InstanceState.CORDONED and fence.highest_seen == 55
    await refused(  # the old leader is fenced off as before
        node.call("scheduler", "s0", "SetInstanceState", state(active), metadata=term_metadata(40)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale leader: term 40 < 55",
    )


async def test_election_leader_reads_the_term_and_replica_of_the_leader_key() -> None:
    class FakeElection:
        def __init__(self, info: LeaderInfo | None) -> None:
            self.info = info

        async def leader(self) -> LeaderInfo | None:
            return self.info

    value = admin_pb2.SchedulerReplica(replica_id="s0", grpc_address="127.0.0.1:9").SerializeToString()
    assert await election_leader(FakeElection(LeaderInfo(b"/e/1", value, 77, 5)))() == (77, "s0")
    assert await election_leader(FakeElection(LeaderInfo(b"/e/1", b"\xff\xff", 78, 5)))() == (78, "")
    assert await election_leader(FakeElection(None))() is None


async def test_a_registry_that_cannot_be_read_answers_unavailable(node: Node) -> None:
    """MigrateOut checks its destination in the registry (etcd); when etcd cannot answer, the order is refused with
    UNAVAILABLE naming what failed (the leader retries it at its next pass), not grpc's UNKNOWN 'Unexpected
    <class EtcdUnavailableError>', which reads as a fault of the llumlet."""
    await add_victim(node)
    await until(lambda: len(node.sink.tokens("victim")) >= 2, "the victim to run")

    async def unreadable(instance_id: str) -> str | None:
        raise EtcdUnavailableError("range", ["127.0.0.1:1"], 0.1, "connection refused")

    node.servicer.registry = unreadable
    steal = llumlet_pb2.MigrateOutRequest(
        destination_instance_id="i-2", destination_grpc_address=node.fake_address, request_id="victim", wait=True
    )
    await refused(
        node.call("scheduler", "s0", "MigrateOut", steal, metadata=term_metadata(7)),
        grpc.StatusCode.UNAVAILABLE,
        "MigrateOut: cannot check destination 'i-2' in the registry",
        "127.0.0.1:1",
    )
    await assert_victim_untouched(node)


async def test_the_framed_addrequest_port_admits_frontends_only(node: Node) -> None:
    """The llumlet's framed call listener (``--call-port``) keeps AddRequest's rule: a frontend's add runs token-exact,
    another role is refused and let go; its gRPC replies name the listener (before: AddRequest over gRPC only)."""
    node.servicer.framed_cluster = CLUSTER
    listener, port = await listen_calls(
        node.servicer.framed_calls, "127.0.0.1", 0, server_ssl_context(node.pki.paths("llumlet", "i-1"))
    )
    node.servicer.call_address = f"127.0.0.1:{port}"
    assert node.sink.server is not None
    request = common_pb2.EngineRequest(
        request_id="victim",
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=11, ignore_eos=True),
        frontend_address=node.sink.server.address,
    )
    add = llumlet_pb2.AddRequestRequest(request=request)
    try:
        for role, id in [("llumlet", "i-2"), ("scheduler", "s0"), ("frontend", "f0")]:
            channel = await UnaryChannel.open(
                node.servicer.call_address,
                ssl_context=client_ssl_context(node.pki.paths(role, id)),
                server_name=role_name("llumlet"),
                timeout=DEADLINE,
            )
            try:
                if role != "frontend":
                    await refused(
                        channel.call(ADD_REQUEST_METHOD, add, llumlet_pb2.AddRequestResponse, DEADLINE),
                        grpc.StatusCode.PERMISSION_DENIED,
                        "AddRequest",
                    )
                    await until(lambda: channel.closed, "a refused caller is let go")  # noqa: B023 (awaited here)
                    assert "victim" not in node.llumlet.owners
                else:
                    reply = await channel.call(ADD_REQUEST_METHOD, add, llumlet_pb2.AddRequestResponse, DEADLINE)
                    assert reply.instance_id == "i-1" and reply.call_address == node.servicer.call_address
            finally:
                await channel.aclose()
        await assert_victim_untouched(node)
        # The gRPC reply names the listener.
        request.request_id = "second"
        reply = await node.call("frontend", "f0", "AddRequest", llumlet_pb2.AddRequestRequest(request=request))
        assert reply.call_address == node.servicer.call_address
    finally:
        node.servicer.framed_calls.close()
        listener.close()
