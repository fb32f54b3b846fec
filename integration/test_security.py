"""Transport security of a real cluster (scheduler, two llumlets, frontend as processes, on a local PKI).

Every internal hop is mutual TLS with a role check, so: a plaintext client is refused at the handshake, quickly; a
certificate from another CA or an expired one is refused with a hint, never a hang; a certificate of the wrong role
gets PERMISSION_DENIED naming the role and the method; the public surfaces want API keys (401 with an OpenAI body);
and a component started without certificates refuses to start (exit 2) and says how to get them.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from integration.cluster import etcd_urls, harness_etcd_client
from pyllumnix.clients import LlumnixClient
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKeyStore
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.ca import Identity
from pyllumnix.infra.security.context import load_context
from pyllumnix.infra.security.runtime import SecuritySettings, identity_of, open_channel
from pyllumnix.infra.security.tls import grpc_channel_credentials, tls_failure_hint
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from pyllumnix.tools.launch import Component, Launcher

# A refused handshake must be reported well within this (grpc's own connect deadline is 20 s).
REFUSAL_DEADLINE_S = 5.0


@dataclass
class SecureCluster:
    launcher: Launcher
    scheduler: Component
    llumlets: list[Component]
    frontend: Component
    etcd_endpoints: list[str]
    cluster: str


@pytest.fixture(scope="module")
def secure_cluster(etcd1: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    launcher = Launcher(tmp_path_factory.mktemp("secure"), secure=True)
    cluster = "sec"
    common = ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", cluster]
    try:
        scheduler = launcher.start("scheduler", "scheduler", *common, "--replica-id", "s0", timeout=60)
        llumlets = [
            launcher.start(f"l{i}", "llumlet", *common, "--instance-id", f"l{i}", "--transport", "tcp", timeout=60)
            for i in range(2)
        ]
        frontend = launcher.start(
            "frontend", "frontend", *common, "--scheduler", scheduler.address, "--http-port", "0", timeout=60
        )
        yield SecureCluster(launcher, scheduler, llumlets, frontend, etcd_urls(etcd1), cluster)
    finally:
        launcher.stop_all()


async def refused(call: Any) -> grpc.aio.AioRpcError:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert time.monotonic() - start < REFUSAL_DEADLINE_S
    return info.value


async def test_plaintext_client_is_refused_quickly(secure_cluster: SecureCluster) -> None:
    for address in (secure_cluster.scheduler.address, secure_cluster.llumlets[0].address):
        async with grpc.aio.insecure_channel(address) as ch:
            err = await refused(
                llumlet_pb2_grpc.LlumletServiceStub(ch).GetLoad(
                    llumlet_pb2.GetLoadRequest(), timeout=REFUSAL_DEADLINE_S
                )
            )
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err


async def test_certificate_from_another_ca_is_refused_with_a_hint(
    secure_cluster: SecureCluster, tmp_path: Path
) -> None:
    other = bootstrap_local(tmp_path / "other-pki", secure_cluster.launcher.pki.cluster)
    paths = other.ensure("admin", "intruder")
    settings = SecuritySettings(paths, identity_of(paths.cert))
    async with open_channel(secure_cluster.scheduler.address, peer=None, settings=settings) as ch:
        err = await refused(
            admin_pb2_grpc.AdminServiceStub(ch).GetLeader(admin_pb2.GetLeaderRequest(), timeout=REFUSAL_DEADLINE_S)
        )
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert tls_failure_hint(err.details() or ""), err.details()


async def test_expired_certificate_is_refused(secure_cluster: SecureCluster, tmp_path: Path) -> None:
    pki = secure_cluster.launcher.pki
    now = datetime.datetime.now(datetime.UTC)
    issued = pki.authority().issue(
        Identity(pki.cluster, "admin", "expired"),
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    paths = issued.write(tmp_path / "expired", pki.ca_cert)
    async with grpc.aio.secure_channel(secure_cluster.scheduler.address, grpc_channel_credentials(paths)) as ch:
        err = await refused(
            admin_pb2_grpc.AdminServiceStub(ch).GetLeader(admin_pb2.GetLeaderRequest(), timeout=REFUSAL_DEADLINE_S)
        )
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert tls_failure_hint(err.details() or ""), err.details()


def denial_cases(c: SecureCluster) -> list[tuple[str, str, str, Any]]:
    """(role of the caller, address, full method name, the call as a function of a channel)."""
    sink = str(c.frontend.ready["sink_address"])
    sched, llumlet = c.scheduler.address, c.llumlets[0].address

    def admin(name: str, request: Any) -> Any:
        return lambda ch: getattr(admin_pb2_grpc.AdminServiceStub(ch), name)(request, timeout=5)

    return [
        (
            "client",
            sink,
            "/llumnix.v1.OutputSinkService/PushOutputs",
            lambda ch: frontend_pb2_grpc.OutputSinkServiceStub(ch).PushOutputs(
                frontend_pb2.PushOutputsRequest(instance_id="l0"), timeout=5
            ),
        ),
        (
            "llumlet",
            sched,
            "/llumnix.v1.AdminService/Scale",
            admin("Scale", admin_pb2.ScaleRequest(target_instances=9)),
        ),
        ("frontend", sched, "/llumnix.v1.AdminService/SetConfig", admin("SetConfig", admin_pb2.SetConfigRequest())),
        (
            "client",
            sched,
            "/llumnix.v1.AdminService/DrainInstance",
            admin("DrainInstance", admin_pb2.DrainInstanceRequest(instance_id="l0")),
        ),
        (
            "frontend",
            llumlet,
            "/llumnix.v1.LlumletService/MigrateOut",
            lambda ch: llumlet_pb2_grpc.LlumletServiceStub(ch).MigrateOut(
                llumlet_pb2.MigrateOutRequest(destination_instance_id="l1"), timeout=5
            ),
        ),
        (
            "llumlet",
            sched,
            "/llumnix.v1.SchedulerService/Dispatch",
            lambda ch: scheduler_pb2_grpc.SchedulerServiceStub(ch).Dispatch(
                scheduler_pb2.DispatchRequest(request_id="x", num_prompt_tokens=1, max_tokens=1), timeout=5
            ),
        ),
    ]


async def test_wrong_role_is_denied_naming_role_and_method(secure_cluster: SecureCluster) -> None:
    for role, address, method, call in denial_cases(secure_cluster):
        async with secure_cluster.launcher.channel(address, role) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch)
        err = info.value
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err)
        assert f"caller role {role}" in (err.details() or "") and method in (err.details() or ""), err.details()


async def test_a_llumlet_reports_only_its_own_load(secure_cluster: SecureCluster) -> None:
    """ReportLoad with l0's certificate but l1's instance id: PERMISSION_DENIED (require_self)."""

    async def reports() -> Any:
        yield scheduler_pb2.ReportLoadRequest(load=common_pb2.InstanceLoad(instance_id="l1"))

    settings = secure_cluster.launcher.security("llumlet", "l0")
    async with open_channel(secure_cluster.scheduler.address, peer=None, settings=settings) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await scheduler_pb2_grpc.SchedulerServiceStub(ch).ReportLoad(reports(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    assert "'l1'" in (info.value.details() or ""), info.value.details()


def http(url: str, body: dict[str, Any] | None = None, key: str = "") -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def user_key(c: SecureCluster, name: str) -> str:
    async with harness_etcd_client(c.etcd_endpoints) as etcd:
        key, _ = await ApiKeyStore(etcd, KeyLayout(c.cluster)).create(name, "user")
    return key


async def test_public_surfaces_need_an_api_key(secure_cluster: SecureCluster) -> None:
    fe = secure_cluster.frontend
    base = str(fe.ready["http_url"])
    completion = {"model": "llama-7b-a10", "prompt": "hello", "max_tokens": 2}
    status, body = http(f"{base}/v1/completions", completion)
    assert status == 401 and body["error"]["code"] == "missing_api_key", body
    status, body = http(f"{base}/v1/completions", completion, key="llx_0123456789abcdef_" + "A" * 43)
    assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert http(f"{base}/readyz")[0] in (200, 503)  # probes need no key
    key = await user_key(secure_cluster, f"user-{time.monotonic_ns()}")
    status, body = http(f"{base}/v1/models", key=key)
    assert status == 200, body

    # gRPC: server-only TLS (the cluster CA), the key as a Bearer call credential.
    ca = secure_cluster.launcher.pki.ca_cert.read_bytes()
    target = str(fe.ready["grpc_address"])
    async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in frontend_pb2_grpc.FrontendServiceStub(ch).Generate(
                frontend_pb2.GenerateRequest(text="hi"), timeout=10
            ):
                pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(key)
    )
    async with grpc.aio.secure_channel(target, creds) as ch:
        request = frontend_pb2.GenerateRequest(text="hello there", sampling=common_pb2.SamplingParams(max_tokens=4))
        replies = [r async for r in frontend_pb2_grpc.FrontendServiceStub(ch).Generate(request, timeout=60)]
    assert replies and replies[-1].finished, replies
    assert replies[-1].finish_reason != common_pb2.FINISH_REASON_ERROR, replies[-1]


def test_a_component_without_certificates_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LLUMNIX_TLS_DIR", "LLUMNIX_INSECURE")}
    done = subprocess.run(
        [sys.executable, "-m", "pyllumnix.tools.cli", "llumlet", "--instance-id", "x"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done
    assert "--tls-dir" in done.stderr and "llumnix serve" in done.stderr, done.stderr


def test_serve_is_secure_by_default_and_clients_need_no_flags(tmp_path: Path, private_context_file: Path) -> None:
    """`llumnix serve` with no security flags: PKI, etcd over TLS, the admin key in a 0600 context file; the client
    library given no endpoints reads that file and works (Generate through the frontend, admin calls at the leader);
    the OpenAI API wants the key."""
    launcher = Launcher(tmp_path / "launcher")
    serve = launcher.start(
        "serve",
        "serve",
        *("--schedulers", "1", "--llumlets", "2", "--http-port", "0", "--grpc-port", "0"),
        *("--log-dir", str(tmp_path / "cluster")),
        env={"LLUMNIX_INSECURE": ""},  # what a user's shell has: nothing
        timeout=240,
    )
    try:
        ready = serve.ready
        assert ready["secure"] is True and str(ready["etcd"]).startswith("https://"), ready
        assert Path(ready["context"]) == private_context_file
        assert private_context_file.stat().st_mode & 0o077 == 0
        ctx = load_context()
        assert ctx is not None and ctx.api_key.startswith("llx_")
        with LlumnixClient(timeout=30) as client:
            assert len(client.list_instances()) == 2
            result = client.generate_text("Hello", max_tokens=4)
            assert result.text and result.finish_reason != "error", result
        # llmctl with no flags: the context file gives the schedulers, the CA, the admin certificate
        llmctl = str(Path(sys.executable).parent / "llmctl")
        env = {k: v for k, v in os.environ.items() if k != "LLUMNIX_ENDPOINT"}
        done = subprocess.run(
            [llmctl, "-o", "json", "instances"], capture_output=True, check=False, text=True, timeout=60, env=env
        )
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["instances"]) == 2
        completion = {"model": "llama-7b-a10", "prompt": "hello", "max_tokens": 2}
        assert http(f"{ready['http']}/v1/completions", completion)[0] == 401
        status, body = http(f"{ready['http']}/v1/completions", completion, key=ctx.api_key)
        assert status == 200 and body["choices"], body
    finally:
        launcher.stop_all()
