"""#13 attacks against a real secure cluster (etcd, scheduler, two llumlets, frontend as processes, mutual TLS).

A user streams a request through the frontend's public gRPC API (server TLS + API key). While it runs:

- token injection: a certificate of the other llumlet and one of the scheduler push foreign tokens and an error to
  the frontend's output sink: PERMISSION_DENIED;
- prompt/KV theft: MigrateOut orders to a fake destination, without a leader term, with the leader's term from a
  scheduler certificate that does not lead, with a stale term, and with the leader's own term but an address the
  registry does not have: refused, and the fake destination receives nothing;
- aborting it with another user's API key: HTTP 403;
- a real migration ordered through the leader (admin MigrateRequest) moves the request: the source hands the
  request's capability over at the frontend, the destination pushes with it;

and the user's stream ends token-exact (the simulator's deterministic tokens, computed here independently), with
its finish, no error text, and the instance change visible.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from integration.cluster import etcd_urls, harness_etcd_client
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.convert import spec_from_pb
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKeyStore
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
)
from pyllumnix.tools.launch import Component, Launcher

PROFILE = "llama-7b-a10"
PROMPT = [(11 * i) % 300 + 5 for i in range(24)]
MAX_TOKENS = 320  # ~12 s on llama-7b-a10: still running after the attacks and their TLS dials on a loaded host
SAMPLING = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=5, ignore_eos=True, temperature=0.8)


@dataclass
class Cluster:
    launcher: Launcher
    scheduler: Component
    llumlets: dict[str, Component]
    frontend: Component
    etcd: list[str]
    name: str


@pytest.fixture(scope="module")
def cluster(etcd1: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    launcher = Launcher(tmp_path_factory.mktemp("attacks"), secure=True)
    name = f"attacks-{time.monotonic_ns()}"
    common = ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", name]
    try:
        scheduler = launcher.start("scheduler", "scheduler", *common, "--replica-id", "s0", timeout=60)
        llumlets = {
            f"l{i}": launcher.start(
                f"l{i}", "llumlet", *common, "--instance-id", f"l{i}", "--profile", PROFILE, timeout=60
            )
            for i in range(2)
        }
        frontend = launcher.start(
            "frontend", "frontend", *common, "--scheduler", scheduler.address, "--http-port", "0", timeout=60
        )
        yield Cluster(launcher, scheduler, llumlets, frontend, etcd_urls(etcd1), name)
    finally:
        launcher.stop_all()


class FakeDestination(llumlet_pb2_grpc.LlumletServiceServicer):
    def __init__(self) -> None:
        self.received: list[str] = []

    async def PreAllocate(self, request: Any, context: Any) -> llumlet_pb2.PreAllocateResponse:
        self.received.append(request.request.request.request_id)
        return llumlet_pb2.PreAllocateResponse()


@pytest.fixture
async def fake_destination() -> AsyncIterator[tuple[FakeDestination, str]]:
    fake = FakeDestination()  # type: ignore[abstract]
    server = grpc.aio.server()
    llumlet_pb2_grpc.add_LlumletServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


def expected_tokens() -> list[int]:
    """What the llumlet's simulator generates for this request, computed here from the same spec."""
    engine = SimEngine(PROFILE, payload=False)
    spec = spec_from_pb(common_pb2.EngineRequest(request_id="ref", prompt_token_ids=PROMPT, sampling=SAMPLING))
    engine.add_request(spec, 0.0)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step(0.0).outputs:
            tokens.extend(out.token_ids)
    return tokens


async def user_key(c: Cluster) -> str:
    async with harness_etcd_client(c.etcd) as etcd:
        key, _ = await ApiKeyStore(etcd, KeyLayout(c.name)).create(f"alice-{time.monotonic_ns()}", "user")
    return key


def http_post(url: str, key: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=b"", method="POST", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def refused(coro: Any, code: grpc.StatusCode, needle: str) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert time.monotonic() - start < 10, "refusals come at once"
    assert info.value.code() == code, info.value.details()
    assert needle in (info.value.details() or ""), info.value.details()


async def test_attacks_on_a_running_request_fail_and_its_stream_stays_exact(
    cluster: Cluster, fake_destination: tuple[FakeDestination, str]
) -> None:
    fake, fake_address = fake_destination
    key = await user_key(cluster)
    ca = cluster.launcher.pki.ca_cert.read_bytes()
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(key)
    )
    target = str(cluster.frontend.ready["grpc_address"])
    sink = str(cluster.frontend.ready["sink_address"])
    rid = f"victim-{time.monotonic_ns()}"
    replies: list[frontend_pb2.GenerateResponse] = []
    started = asyncio.Event()

    async def stream() -> None:
        async with grpc.aio.secure_channel(target, creds) as ch:
            call = frontend_pb2_grpc.FrontendServiceStub(ch).Generate(
                frontend_pb2.GenerateRequest(
                    request_id=rid, token_ids=frontend_pb2.TokenIds(ids=PROMPT), sampling=SAMPLING
                ),
                timeout=120,
            )
            async for reply in call:
                replies.append(reply)
                if sum(len(r.token_ids) for r in replies) >= 5:
                    started.set()

    task = asyncio.create_task(stream())
    await asyncio.wait_for(started.wait(), 60)
    holder = next(r.instance_id for r in replies if r.instance_id)
    other = "l1" if holder == "l0" else "l0"

    # Token injection from the other llumlet's and the scheduler's certificates.
    evil = common_pb2.RequestOutput(
        request_id=rid,
        token_ids=list(range(1000, 1352)),
        first_token_index=3,
        finished=True,
        finish_reason=common_pb2.FINISH_REASON_ERROR,
        error="attacker's error text",
        instance_id=other,
    )
    # From the other llumlet as itself: its output without a token is refused alone (listed as unknown, so that
    # llumlet stops it), the push itself is answered.
    async with open_channel(sink, peer=None, settings=cluster.launcher.security("llumlet", other)) as ch:
        reply = await frontend_pb2_grpc.OutputSinkServiceStub(ch).PushOutputs(
            frontend_pb2.PushOutputsRequest(instance_id=other, outputs=[evil]), timeout=10
        )
    assert list(reply.unknown_request_ids) == [rid], reply
    for role, id, as_instance, needle in (
        ("llumlet", other, holder, f"may not push outputs as {holder!r}"),
        # A scheduler that does not lead may not declare instances lost (attack 9 B3); the leader may, but only with
        # token-less ERROR finishes, never tokens.
        ("scheduler", "harness", holder, "scheduler harness is not the leader (s0)"),
        ("scheduler", "s0", holder, "only token-less ERROR finishes"),
    ):
        async with open_channel(sink, peer=None, settings=cluster.launcher.security(role, id)) as ch:
            await refused(
                frontend_pb2_grpc.OutputSinkServiceStub(ch).PushOutputs(
                    frontend_pb2.PushOutputsRequest(instance_id=as_instance, outputs=[evil]), timeout=10
                ),
                grpc.StatusCode.PERMISSION_DENIED,
                needle,
            )

    # Another user's key may not abort the request (HTTP 403).
    bob = await user_key(cluster)
    abort_url = f"{cluster.frontend.ready['http_url']}/v1/requests/{rid}/abort"
    status, body = await asyncio.to_thread(http_post, abort_url, bob)
    assert status == 403 and body["error"]["type"] == "permission_error", body

    # Theft orders to a fake destination.
    steal = llumlet_pb2.MigrateOutRequest(
        destination_instance_id=other, destination_grpc_address=fake_address, request_id=rid, wait=True
    )
    async with open_channel(
        cluster.llumlets[holder].address, peer=None, settings=cluster.launcher.security("scheduler", "harness")
    ) as ch:
        stub = llumlet_pb2_grpc.LlumletServiceStub(ch)
        await refused(stub.MigrateOut(steal, timeout=10), grpc.StatusCode.PERMISSION_DENIED, "no leader term")
        async with open_channel(
            cluster.scheduler.address, peer=None, settings=cluster.launcher.security("admin", "harness")
        ) as a:
            term = (await admin_pb2_grpc.AdminServiceStub(a).GetLeader(admin_pb2.GetLeaderRequest(), timeout=10)).term
        # A scheduler certificate that does not lead: etcd names s0 as the leader of this term (attack 9 B3).
        await refused(
            stub.MigrateOut(steal, timeout=10, metadata=term_metadata(term)),
            grpc.StatusCode.PERMISSION_DENIED,
            f"leader term {term} is s0's, not harness's",
        )
    async with open_channel(
        cluster.llumlets[holder].address, peer=None, settings=cluster.launcher.security("scheduler", "s0")
    ) as ch:
        stub = llumlet_pb2_grpc.LlumletServiceStub(ch)  # the leader's own certificate
        await refused(
            stub.MigrateOut(steal, timeout=10, metadata=term_metadata(term)),
            grpc.StatusCode.PERMISSION_DENIED,
            f"destination {other} is registered at {cluster.llumlets[other].address}, not {fake_address}",
        )
        await refused(
            stub.MigrateOut(steal, timeout=10, metadata=term_metadata(max(1, term - 1))),
            grpc.StatusCode.FAILED_PRECONDITION,
            "stale leader",
        )
    assert fake.received == []

    # The leader migrates the request for real: the hand-over makes the destination the only pusher.
    async with open_channel(
        cluster.scheduler.address, peer=None, settings=cluster.launcher.security("admin", "harness")
    ) as a:
        reply = await admin_pb2_grpc.AdminServiceStub(a).MigrateRequest(
            admin_pb2.MigrateRequestRequest(request_id=rid, destination_instance_id=other), timeout=60
        )
    assert reply.result.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED, reply.result.reason

    await asyncio.wait_for(task, 120)
    tokens = [t for r in replies for t in r.token_ids]
    assert tokens == expected_tokens()
    final = replies[-1]
    assert final.finished and final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert "attacker" not in "".join(r.text for r in replies)
    assert replies[-1].instance_id == other, "the destination produced the last tokens"
    assert fake.received == []
