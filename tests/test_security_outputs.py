"""#13 attack: token injection into another request's stream, against the frontend's real output sink.

The sink is served over mutual TLS with the role interceptor (as a secure frontend serves it); a real ``Frontend``
places a request on a recording llumlet server, which receives the request's capability token with AddRequest. The
victim's pushes are sent as llumlet ``i-1`` with that token; every attacker push (other roles, another llumlet,
stolen or forged tokens, the scheduler pushing tokens or a failure for an instance that does not hold the request)
is refused (PERMISSION_DENIED/UNAUTHENTICATED, or that output alone for a llumlet's bad token) and the victim's
stream stays token-exact, ends with the victim's finish, and never exceeds ``max_tokens``. A migration hand-over
moves the right to push to the destination only.

Before #13 the sink accepted every push: the attacker's tokens landed in the stream and its error ended it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from pyllumnix.control_plane.frontend.core import Frontend, GenerationInput
from pyllumnix.control_plane.frontend.dispatch import Placement
from pyllumnix.control_plane.frontend.requests import TrackedRequest
from pyllumnix.control_plane.frontend.sink import (
    LOST_SCOPE_INSTANCE,
    LOST_SCOPE_LISTED,
    LOST_SCOPE_METADATA_KEY,
    ElectionLeader,
    OutputSinkServicer,
)
from pyllumnix.control_plane.frontend.tokenizer import SimTokenizer
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.authz import RoleInterceptor
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.ca import CertPaths
from pyllumnix.infra.security.tls import grpc_server_credentials, secure_channel, server_ssl_context
from pyllumnix.infra.security.tokens import CapabilityTokens, new_secret
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    common_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
)
from pyllumnix.protos.third_party.etcd.api.etcdserverpb import rpc_pb2
from pyllumnix.protos.third_party.etcd.api.mvccpb import kv_pb2

CLUSTER = "c1"
DEADLINE = 5.0
ERROR = common_pb2.FINISH_REASON_ERROR
LENGTH = common_pb2.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ClusterSecurity:
    security = bootstrap_local(tmp_path_factory.mktemp("pki"), CLUSTER, llumlets=["i-1", "i-2", "i-3"])
    security.ensure("client", "u1")
    security.ensure("scheduler", "s1")  # a follower replica
    return security


class RecordingLlumlet(llumlet_pb2_grpc.LlumletServiceServicer):
    """Takes AddRequest (recording the capability the frontend granted) and AbortRequest; generates nothing."""

    def __init__(self) -> None:
        self.added: list[common_pb2.EngineRequest] = []
        self.aborted: list[str] = []

    async def AddRequest(self, request: llumlet_pb2.AddRequestRequest, context: Any) -> llumlet_pb2.AddRequestResponse:
        self.added.append(request.request)
        return llumlet_pb2.AddRequestResponse(instance_id="i-1")

    async def AbortRequest(
        self, request: llumlet_pb2.AbortRequestRequest, context: Any
    ) -> llumlet_pb2.AbortRequestResponse:
        self.aborted.append(request.request_id)
        return llumlet_pb2.AbortRequestResponse()


class OneDispatcher:
    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    async def dispatch(self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int) -> Placement:
        return self.placement


@dataclass
class Stack:
    pki: ClusterSecurity
    frontend: Frontend
    sink: OutputSinkServicer
    sink_address: str
    llumlet: RecordingLlumlet
    # The scheduler replica the etcd election names leader (what the sink's leader lookup answers).
    leader: list[str | None]

    async def push(
        self,
        role: str,
        id: str,
        instance_id: str,
        *outputs: common_pb2.RequestOutput,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> frontend_pb2.PushOutputsResponse:
        async with secure_channel(self.sink_address, self.pki.paths(role, id)) as channel:
            reply: frontend_pb2.PushOutputsResponse = await frontend_pb2_grpc.OutputSinkServiceStub(
                channel
            ).PushOutputs(
                frontend_pb2.PushOutputsRequest(instance_id=instance_id, outputs=outputs),
                timeout=DEADLINE,
                metadata=metadata,
            )
            return reply

    async def hand_over(self, id: str, request_id: str, capability: str, new: str) -> str:
        async with secure_channel(self.sink_address, self.pki.paths("llumlet", id)) as channel:
            reply = await frontend_pb2_grpc.OutputSinkServiceStub(channel).HandOver(
                frontend_pb2.HandOverRequest(request_id=request_id, capability=capability, new_instance_id=new),
                timeout=DEADLINE,
            )
            return str(reply.capability)

    async def take_back(self, id: str, request_id: str, capability: str, from_instance: str) -> None:
        async with secure_channel(self.sink_address, self.pki.paths("llumlet", id)) as channel:
            await frontend_pb2_grpc.OutputSinkServiceStub(channel).TakeBack(
                frontend_pb2.TakeBackRequest(
                    request_id=request_id, capability=capability, from_instance_id=from_instance, instance_id=id
                ),
                timeout=DEADLINE,
            )

    async def dropped(self, coro: Any, request_id: str) -> None:
        """The push is answered (the pusher's other outputs are not refused with it), ``request_id``'s output is
        refused on its own: listed as unknown, so the pusher stops that request alone, and counted."""
        before = self.sink.refused_outputs
        reply = await asyncio.wait_for(coro, DEADLINE + 2)
        assert request_id in reply.unknown_request_ids, reply
        assert self.sink.refused_outputs == before + 1

    async def refused(self, coro: Any, code: grpc.StatusCode, *needles: str) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(coro, DEADLINE + 2)
        assert info.value.code() == code, info.value.details()
        details = info.value.details() or ""
        for needle in needles:
            assert needle in details, details
        return details


@pytest.fixture
async def stack(pki: ClusterSecurity) -> AsyncIterator[Stack]:
    llumlet = RecordingLlumlet()  # type: ignore[abstract]
    llumlet_server = grpc.aio.server()
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(llumlet, llumlet_server)
    llumlet_port = llumlet_server.add_insecure_port("127.0.0.1:0")
    await llumlet_server.start()
    frontend = Frontend(
        model="sim",
        max_model_len=256,
        tokenizer=SimTokenizer(),
        dispatcher=OneDispatcher(Placement("i-1", f"127.0.0.1:{llumlet_port}")),
        idle_timeout=30.0,
    )
    leader: list[str | None] = ["s0"]

    async def current_leader() -> str | None:
        return leader[0]

    sink = OutputSinkServicer(frontend.tracker)
    sink.scheduler_leader = current_leader
    sink_server = grpc.aio.server(interceptors=[RoleInterceptor(CLUSTER)])
    frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server(sink, sink_server)
    port = sink_server.add_secure_port("127.0.0.1:0", grpc_server_credentials(pki.paths("frontend", "f0")))
    await sink_server.start()
    frontend.sink_address = f"127.0.0.1:{port}"
    # The framed push stream beside it, as start_grpc serves it (mutual TLS, the same servicer).
    framed = await asyncio.start_server(
        sink.serve_framed, "127.0.0.1", 0, ssl=server_ssl_context(pki.paths("frontend", "f0"))
    )
    sink.stream_address = f"127.0.0.1:{framed.sockets[0].getsockname()[1]}"
    sink.stream_cluster = CLUSTER
    try:
        yield Stack(pki, frontend, sink, frontend.sink_address, llumlet, leader)
    finally:
        framed.close()
        await sink.end_streams(1.0)
        await frontend.close()
        await sink_server.stop(None)
        await llumlet_server.stop(None)


def out(
    rid: str,
    first: int,
    tokens: list[int],
    capability: str,
    *,
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    error: str = "",
    instance_id: str = "i-1",
) -> common_pb2.RequestOutput:
    return common_pb2.RequestOutput(
        request_id=rid,
        token_ids=tokens,
        first_token_index=first,
        finished=finish != common_pb2.FINISH_REASON_UNSPECIFIED,
        finish_reason=finish,
        error=error,
        instance_id=instance_id,
        capability=capability,
    )


async def collect(request: TrackedRequest) -> tuple[list[int], int, str]:
    tokens: list[int] = []
    async with asyncio.timeout(DEADLINE):
        async for delta in request.deltas():
            tokens.extend(delta.token_ids)
            if delta.finished:
                return tokens, delta.finish_reason, delta.error
    raise AssertionError("the stream ended without a finish")


async def submit(stack: Stack, rid: str = "victim", max_tokens: int = 8) -> tuple[TrackedRequest, str]:
    request = await stack.frontend.submit(
        GenerationInput(prompt=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=max_tokens), request_id=rid)
    )
    added = stack.llumlet.added[-1]
    assert added.request_id == rid and added.capability, "the frontend grants a capability with AddRequest"
    return request, added.capability


VICTIM = [101, 102, 103, 104, 105, 106, 107, 108]


async def test_token_injection_is_refused_and_the_victim_stream_is_exact(stack: Stack, tmp_path: Path) -> None:
    request, cap = await submit(stack)
    assert (await stack.push("llumlet", "i-1", "i-1", out("victim", 0, VICTIM[:3], cap))).unknown_request_ids == []
    foreign = list(range(1000, 1352))  # the 352 foreign words of the report
    evil_end = dict(finish=ERROR, error="attacker's error text")

    # Roles that may not push at all (the role table, and the sink itself).
    for role, id in (("frontend", "f0"), ("admin", "admin"), ("client", "u1")):
        await stack.refused(
            stack.push(role, id, "i-1", out("victim", 3, foreign, cap, **evil_end)),  # type: ignore[arg-type]
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller role {role} may not call /llumnix.v1.OutputSinkService/PushOutputs",
        )
    # Another llumlet: as the victim's instance, with the stolen token, with no token, with a forged one.
    await stack.refused(
        stack.push("llumlet", "i-2", "i-1", out("victim", 3, foreign, cap)),
        grpc.StatusCode.PERMISSION_DENIED,
        "caller llumlet i-2 may not push outputs as 'i-1'",
    )
    # With a token that does not let it push for the victim, only that output is refused (listed as unknown):
    # refusing the whole push made an honest llumlet handed one bad token abort everything it held (REVIEW18-1).
    await stack.dropped(
        stack.push("llumlet", "i-2", "i-2", out("victim", 3, foreign, cap, instance_id="i-2")), "victim"
    )
    await stack.dropped(stack.push("llumlet", "i-2", "i-2", out("victim", 3, foreign, "", instance_id="i-2")), "victim")
    forged = CapabilityTokens(new_secret(), "frontend").issue("victim", "i-2")
    await stack.dropped(
        stack.push("llumlet", "i-2", "i-2", out("victim", 3, foreign, forged, instance_id="i-2")), "victim"
    )
    # The scheduler: never tokens; a failure only for the instance that holds the request.
    await stack.refused(
        stack.push("scheduler", "s0", "i-1", out("victim", 3, foreign, "")),
        grpc.StatusCode.PERMISSION_DENIED,
        "only token-less ERROR finishes",
    )
    await stack.refused(
        stack.push("scheduler", "s0", "i-2", out("victim", 3, [], "", **evil_end)),  # type: ignore[arg-type]
        grpc.StatusCode.PERMISSION_DENIED,
        "held by instance 'i-2'",
    )
    # A client without a certificate fails the handshake within the deadline (UNAVAILABLE), never hangs.
    no_cert = CertPaths(stack.pki.ca_cert, tmp_path / "none.pem", tmp_path / "none-key.pem")
    async with grpc.aio.secure_channel(
        stack.sink_address, grpc.ssl_channel_credentials(no_cert.ca.read_bytes())
    ) as channel:
        await stack.refused(
            frontend_pb2_grpc.OutputSinkServiceStub(channel).PushOutputs(
                frontend_pb2.PushOutputsRequest(instance_id="i-1", outputs=[out("victim", 3, foreign, cap)]),
                timeout=DEADLINE,
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert not request.finished and request.num_received == 3

    # The victim finishes; a push beyond max_tokens shows no more than max_tokens tokens.
    await stack.push("llumlet", "i-1", "i-1", out("victim", 3, [*VICTIM[3:], 109, 110], cap, finish=LENGTH))
    tokens, reason, error = await collect(request)
    assert tokens == VICTIM
    assert reason == LENGTH and error == ""
    # the other three never reach the sink (the role interceptor refuses them); the bad tokens are refused one by one
    assert (stack.sink.refused_pushes, stack.sink.refused_outputs) == (3, 3)


async def test_lost_instance_notice_from_the_scheduler_ends_the_request(stack: Stack) -> None:
    request, cap = await submit(stack, "r-lost")
    await stack.push("llumlet", "i-1", "i-1", out("r-lost", 0, [7, 8], cap))
    await stack.push("scheduler", "s0", "i-1", out("r-lost", 0, [], "", finish=ERROR, error="instance i-1 lost"))
    tokens, reason, error = await collect(request)
    assert tokens == [7, 8] and reason == ERROR and error == "instance i-1 lost"


async def test_a_lost_instance_notice_ends_every_request_the_instance_holds_listed_or_not(stack: Stack) -> None:
    """attack9 B1: the leader's notice names the instance; its last load snapshot of the instance may predate a
    request's arrival there (here: migrated in from i-1). The request ends at once with the lost-instance error, one
    still held by another instance does not (before: a notice listing nothing ended nothing, and the migrated request
    waited for the idle timeout, then ended as "timed out")."""
    moved, cap1 = await submit(stack, "r-moved")
    stay, stay_cap = await submit(stack, "r-stay")
    await stack.push("llumlet", "i-1", "i-1", out("r-moved", 0, [7], cap1), out("r-stay", 0, [9], stay_cap))
    cap2 = await stack.hand_over("i-1", "r-moved", cap1, "i-2")
    await stack.push("llumlet", "i-2", "i-2", out("r-moved", 1, [8], cap2, instance_id="i-2"))
    reply = await stack.push("scheduler", "s0", "i-2")  # "i-2 lost", with no request listed
    assert reply.unknown_request_ids == []
    assert moved.finished, "ended on the notice itself, not by the idle timeout"
    tokens, reason, error = await collect(moved)
    assert tokens == [7, 8] and reason == ERROR and error == "instance i-2 was lost; the request failed"
    assert not moved.timed_out
    assert not stay.finished, "a request held by another instance is untouched"
    # A listed request takes the leader's own error text, and so do the unlisted ones of the same notice.
    other, other_cap = await submit(stack, "r-other")
    await stack.push("llumlet", "i-1", "i-1", out("r-other", 0, [4], other_cap))
    lost = "instance i-1 was lost (its process is gone); the request failed"
    await stack.push("scheduler", "s0", "i-1", out("r-other", 1, [], "", finish=ERROR, error=lost))
    assert (await collect(stay))[1:] == (ERROR, lost)
    assert (await collect(other))[1:] == (ERROR, lost)


async def test_a_request_handed_over_survives_a_notice_about_its_source(stack: Stack) -> None:
    """review9 F7: the source committed a migration and handed the request over, then was lost before the
    destination's first push; the notice (listing nothing) must not end the request the destination runs (before: it
    ended with the lost-instance error while the destination kept decoding for nobody)."""
    moving, cap1 = await submit(stack, "r-moving")
    await stack.push("llumlet", "i-1", "i-1", out("r-moving", 0, [7], cap1))
    cap2 = await stack.hand_over("i-1", "r-moving", cap1, "i-2")
    await stack.push("scheduler", "s0", "i-1")  # "i-1 lost", listing nothing
    assert not moving.finished
    reply = await stack.push("llumlet", "i-2", "i-2", out("r-moving", 1, [8], cap2, instance_id="i-2", finish=LENGTH))
    assert reply.unknown_request_ids == []
    assert await collect(moving) == ([7, 8], LENGTH, "")


async def test_a_listed_only_notice_spares_the_requests_a_new_process_holds_under_the_same_id(stack: Stack) -> None:
    """review9 F1: a new process re-registered under i-1 and got a request; the leader's notice about the OLD process
    (marked listed-only) ends the listed request only (before: every request held by i-1, r-new included)."""
    old, old_cap = await submit(stack, "r-old")
    await stack.push("llumlet", "i-1", "i-1", out("r-old", 0, [7], old_cap))
    new, new_cap = await submit(stack, "r-new")
    await stack.push("llumlet", "i-1", "i-1", out("r-new", 0, [5], new_cap))
    lost = "instance i-1 was lost (it restarted (a new process re-registered under its id)); the request failed"
    listed = ((LOST_SCOPE_METADATA_KEY, LOST_SCOPE_LISTED),)
    await stack.push("scheduler", "s0", "i-1", out("r-old", 1, [], "", finish=ERROR, error=lost), metadata=listed)
    assert (await collect(old))[1:] == (ERROR, lost)
    assert not new.finished, "r-new lives on the new process i-1"
    await stack.push("llumlet", "i-1", "i-1", out("r-new", 1, [6], new_cap, finish=LENGTH))
    assert await collect(new) == ([5, 6], LENGTH, "")


async def test_a_plaintext_notice_marked_instance_wide_ends_every_request_the_instance_holds(stack: Stack) -> None:
    """review9 F4: on an --insecure cluster the leader's notice (marked "instance") ends the requests the lost
    instance holds, listed or not, as on TLS (before: only the listed ones; an unlisted one waited for the idle
    timeout). A plaintext push without the mark (a llumlet's) ends nothing it does not list."""
    listed, listed_cap = await submit(stack, "r-listed")
    unlisted, unlisted_cap = await submit(stack, "r-unlisted")
    await stack.push(
        "llumlet", "i-1", "i-1", out("r-listed", 0, [7], listed_cap), out("r-unlisted", 0, [9], unlisted_cap)
    )
    plain = grpc.aio.server()
    frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server(stack.sink, plain)
    address = f"127.0.0.1:{plain.add_insecure_port('127.0.0.1:0')}"
    await plain.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            sink = frontend_pb2_grpc.OutputSinkServiceStub(channel)
            await sink.PushOutputs(frontend_pb2.PushOutputsRequest(instance_id="i-1"), timeout=DEADLINE)
            assert [r.finished for r in (listed, unlisted)] == [False, False], "no scope: not the leader's notice"
            lost = "instance i-1 was lost (its process is gone); the request failed"
            notice = out("r-listed", 1, [], "", finish=ERROR, error=lost)
            await sink.PushOutputs(
                frontend_pb2.PushOutputsRequest(instance_id="i-1", outputs=[notice]),
                timeout=DEADLINE,
                metadata=((LOST_SCOPE_METADATA_KEY, LOST_SCOPE_INSTANCE),),
            )
        assert unlisted.finished, "ended on the notice itself, not by the idle timeout"
        assert await collect(unlisted) == ([9], ERROR, lost)
        assert await collect(listed) == ([7], ERROR, lost)
    finally:
        await plain.stop(None)


async def test_only_the_scheduler_leader_may_declare_an_instance_lost(stack: Stack) -> None:
    """attack9 B3: a follower's (or a deposed leader's) certificate is refused, and the request runs on to its own
    finish (before: any scheduler certificate's notice ended it)."""
    request, cap = await submit(stack, "r-live")
    await stack.push("llumlet", "i-1", "i-1", out("r-live", 0, [7], cap))
    forged = out("r-live", 1, [], "", finish=ERROR, error="forged by a follower")
    await stack.refused(
        stack.push("scheduler", "s1", "i-1", forged), grpc.StatusCode.PERMISSION_DENIED, "s1 is not the leader (s0)"
    )
    await stack.refused(stack.push("scheduler", "s1", "i-1"), grpc.StatusCode.PERMISSION_DENIED, "not the leader")
    stack.leader[0] = None  # between two terms nobody may
    await stack.refused(stack.push("scheduler", "s0", "i-1", forged), grpc.StatusCode.PERMISSION_DENIED, "(none)")
    stack.sink.scheduler_leader = None  # a sink that cannot tell the leader takes no notice at all
    await stack.refused(stack.push("scheduler", "s0", "i-1"), grpc.StatusCode.PERMISSION_DENIED, "cannot tell")
    assert not request.finished
    await stack.push("llumlet", "i-1", "i-1", out("r-live", 1, [8], cap, finish=LENGTH))
    tokens, reason, _ = await collect(request)
    assert tokens == [7, 8] and reason == LENGTH


async def test_the_frontend_reads_the_leader_from_the_election() -> None:
    """``ElectionLeader``: the replica id the lowest election key proclaims; None while nobody leads."""

    class FakeEtcd:
        def __init__(self) -> None:
            self.kvs: list[kv_pb2.KeyValue] = []
            self.asked: list[bytes] = []

        async def range(self, request: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
            self.asked.append(request.key)
            return rpc_pb2.RangeResponse(kvs=self.kvs[: request.limit or None])

    etcd = FakeEtcd()
    lookup = ElectionLeader(cast(Any, etcd), KeyLayout(CLUSTER))
    assert await lookup() is None
    value = admin_pb2.SchedulerReplica(replica_id="s0", grpc_address="127.0.0.1:1").SerializeToString()
    etcd.kvs = [kv_pb2.KeyValue(key=b"/llumnix/c1/election/scheduler/1", value=value, create_revision=5)]
    assert await lookup() == "s0"
    assert etcd.asked[-1] == KeyLayout(CLUSTER).election_prefix().encode()


async def test_hand_over_moves_the_right_to_push_to_the_destination_only(stack: Stack) -> None:
    request, cap1 = await submit(stack, "r-mig")
    await stack.push("llumlet", "i-1", "i-1", out("r-mig", 0, VICTIM[:2], cap1))
    # Only the holder may hand over, and only with its token.
    await stack.refused(
        stack.hand_over("i-3", "r-mig", cap1, "i-2"), grpc.StatusCode.PERMISSION_DENIED, "not to the caller 'i-3'"
    )
    cap2 = await stack.hand_over("i-1", "r-mig", cap1, "i-2")
    assert cap2 and cap2 != cap1
    assert await stack.hand_over("i-1", "r-mig", cap1, "i-2") == cap2, "a repeated hand-over answers the same token"
    # Until the destination pushes, the source still may (its commit may yet fail).
    await stack.push("llumlet", "i-1", "i-1", out("r-mig", 2, VICTIM[2:4], cap1))
    # Nobody else can use the destination's token.
    await stack.dropped(stack.push("llumlet", "i-3", "i-3", out("r-mig", 4, [666], cap2, instance_id="i-3")), "r-mig")
    reply = await stack.push("llumlet", "i-2", "i-2", out("r-mig", 4, VICTIM[4:6], cap2, instance_id="i-2"))
    assert reply.unknown_request_ids == []
    # The source's token is stale now: its late output is dropped and reported back, so it stops the request.
    reply = await stack.push("llumlet", "i-1", "i-1", out("r-mig", 6, [666, 667], cap1))
    assert list(reply.unknown_request_ids) == ["r-mig"]
    await stack.refused(stack.hand_over("i-1", "r-mig", cap1, "i-3"), grpc.StatusCode.PERMISSION_DENIED, "is stale")
    await stack.push("llumlet", "i-2", "i-2", out("r-mig", 6, VICTIM[6:], cap2, finish=LENGTH, instance_id="i-2"))
    tokens, reason, _ = await collect(request)
    assert tokens == VICTIM and reason == LENGTH
    assert request.instance_id == "i-2"
    assert len(stack.frontend.tracker.ledger) == 1, "the request is still tracked until released"
    stack.frontend.release(request)
    assert len(stack.frontend.tracker.ledger) == 0, "a released request leaves the ledger"


async def test_a_source_takes_back_an_unanswered_hand_over_only_while_the_destination_has_not_pushed(
    stack: Stack,
) -> None:
    """REVIEW12: a commit whose answer was lost may have installed the request on the destination. The source asks
    the frontend (TakeBack): kept while the destination has not pushed (its grant is withdrawn: its outputs are
    refused and reported back, so it stops its copy); refused once it has (the source must drop its copy). Before,
    the source resumed unasked and both pushed: one stream spliced from two continuations."""
    request, cap1 = await submit(stack, "r-back")
    await stack.push("llumlet", "i-1", "i-1", out("r-back", 0, VICTIM[:2], cap1))
    cap2 = await stack.hand_over("i-1", "r-back", cap1, "i-2")
    # Nobody but the holder may take it back, and a token-less or forged ask is refused.
    await stack.refused(stack.take_back("i-3", "r-back", cap1, "i-2"), grpc.StatusCode.PERMISSION_DENIED)
    await stack.refused(stack.take_back("i-2", "r-back", cap2, "i-1"), grpc.StatusCode.PERMISSION_DENIED)
    await stack.take_back("i-1", "r-back", cap1, "i-2")
    await stack.take_back("i-1", "r-back", cap1, "i-2")  # asking again is harmless
    # The destination installed anyway: its outputs are refused and reported back (it aborts its copy).
    reply = await stack.push("llumlet", "i-2", "i-2", out("r-back", 2, [666, 667], cap2, instance_id="i-2"))
    assert list(reply.unknown_request_ids) == ["r-back"]
    await stack.push("llumlet", "i-1", "i-1", out("r-back", 2, VICTIM[2:], cap1, finish=LENGTH))
    tokens, reason, _ = await collect(request)
    assert tokens == VICTIM and reason == LENGTH and request.instance_id == "i-1"
    await stack.refused(stack.take_back("i-1", "r-back", cap1, "i-2"), grpc.StatusCode.NOT_FOUND, "no request")

    # Once the destination pushed, it holds the request: the source's ask is refused and its outputs are stale.
    request, cap1 = await submit(stack, "r-gone-on")
    await stack.push("llumlet", "i-1", "i-1", out("r-gone-on", 0, VICTIM[:2], cap1))
    cap2 = await stack.hand_over("i-1", "r-gone-on", cap1, "i-2")
    await stack.push("llumlet", "i-2", "i-2", out("r-gone-on", 2, VICTIM[2:4], cap2, instance_id="i-2"))
    await stack.refused(
        stack.take_back("i-1", "r-gone-on", cap1, "i-2"), grpc.StatusCode.FAILED_PRECONDITION, "held by i-2"
    )
    reply = await stack.push("llumlet", "i-1", "i-1", out("r-gone-on", 2, [666], cap1))
    assert list(reply.unknown_request_ids) == ["r-gone-on"]
    await stack.push("llumlet", "i-2", "i-2", out("r-gone-on", 4, VICTIM[4:], cap2, finish=LENGTH, instance_id="i-2"))
    tokens, reason, _ = await collect(request)
    assert tokens == VICTIM and reason == LENGTH and request.instance_id == "i-2"


async def test_a_pushers_own_give_up_notice_needs_no_token(stack: Stack) -> None:
    """The llumlet's pusher queues token-less ERROR notices when it gives up: the holder may end its request."""
    request, cap = await submit(stack, "r-gone")
    await stack.push("llumlet", "i-1", "i-1", out("r-gone", 0, [9], cap))
    await stack.dropped(
        stack.push("llumlet", "i-2", "i-2", out("r-gone", 1, [], "", finish=ERROR, error="x", instance_id="i-2")),
        "r-gone",
    )
    await stack.push("llumlet", "i-1", "i-1", out("r-gone", 1, [], "", finish=ERROR, error="could not deliver"))
    tokens, reason, error = await collect(request)
    assert tokens == [9] and reason == ERROR and error == "could not deliver"


async def test_the_holders_heartbeat_keeps_the_request_alive_and_a_stale_one_is_dropped(stack: Stack) -> None:
    """A llumlet's token-less, unfinished "still here" output restarts the request's idle clock when the holder
    sends it with its token; a former holder's heartbeat is dropped and reported back (it stops the request)."""
    request, cap1 = await submit(stack, "r-beat")
    request.idle_timeout = 0.6
    reader = asyncio.create_task(collect(request))
    for _ in range(6):  # 1.2 s of heartbeats: twice the idle timeout
        await asyncio.sleep(0.2)
        reply = await stack.push("llumlet", "i-1", "i-1", out("r-beat", 0, [], cap1))
        assert reply.unknown_request_ids == []
    assert not reader.done() and not request.finished, "the holder's heartbeats keep the request alive"
    cap2 = await stack.hand_over("i-1", "r-beat", cap1, "i-2")
    await stack.push("llumlet", "i-2", "i-2", out("r-beat", 0, [4], cap2, instance_id="i-2"))
    reply = await stack.push("llumlet", "i-1", "i-1", out("r-beat", 1, [], cap1))
    assert list(reply.unknown_request_ids) == ["r-beat"], "the former holder's heartbeat is stale"
    await stack.push("llumlet", "i-2", "i-2", out("r-beat", 1, [5], cap2, finish=LENGTH, instance_id="i-2"))
    tokens, reason, _ = await asyncio.wait_for(reader, DEADLINE)
    assert tokens == [4, 5] and reason == LENGTH


async def test_one_bad_token_refuses_that_output_alone_not_the_honest_ones_beside_it(stack: Stack) -> None:
    """REVIEW18-1: a compromised llumlet can hand an honest one a bad token (a migration into it carries any token it
    likes). Before, the honest llumlet's next push was refused whole (PERMISSION_DENIED, which its pusher takes as
    permanent: it gave up on the frontend and aborted every request it held there)."""
    victim, cap = await submit(stack, "honest")
    await submit(stack, "poisoned")
    forged = CapabilityTokens(new_secret(), "frontend").issue("poisoned", "i-1")
    reply = await stack.push(
        "llumlet", "i-1", "i-1", out("honest", 0, VICTIM, cap, finish=LENGTH), out("poisoned", 0, [666], forged)
    )
    assert list(reply.unknown_request_ids) == ["poisoned"]
    tokens, reason, _ = await collect(victim)
    assert tokens == VICTIM and reason == LENGTH
    poisoned = stack.frontend.tracker.get("poisoned")
    assert poisoned is not None and poisoned.num_received == 0
