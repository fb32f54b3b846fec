"""Bad credentials against real servers get a clear error naming what was wrong, quickly, never a hang.

One real secure cluster (a scheduler and a frontend as processes, on the session's throwaway PKI); for each kind of
bad credential (an expired certificate, a certificate from another CA, a certificate of the wrong role, an unknown
API key) the test checks what a user sees: the Python client library's exception, ``llmctl``'s exit code and message,
and the OpenAI HTTP API's status and error body. "Names what was wrong": the text contains the cause ("expired",
"CA", the role and the method, "API key"), not just a status code.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from integration.cluster import etcd_urls, harness_etcd_client
from pyllumnix.clients import LlumnixClient
from pyllumnix.clients.channel import TlsConfig
from pyllumnix.clients.errors import LlumnixError
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKeyStore
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.ca import CertPaths, Identity
from pyllumnix.tools.launch import Component, Launcher

pytestmark = pytest.mark.integration

# Each refusal must come well within this (grpc's own connect deadline is 20 s; the calls' timeout is 10 s).
REFUSAL_DEADLINE_S = 8.0
LLMCTL = str(Path(sys.executable).parent / "llmctl")
# Well formed (llx_<16 hex>_<43 chars>), never issued.
UNKNOWN_KEY = "llx_0123456789abcdef_" + "A" * 43
CLUSTER = "creds"


@dataclass
class Cluster:
    launcher: Launcher
    scheduler: Component
    llumlet: Component
    frontend: Component
    etcd_endpoints: list[str]


@pytest.fixture(scope="module")
def cluster(etcd1: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    launcher = Launcher(tmp_path_factory.mktemp("creds"))  # secure, the default
    common = ["--etcd", ",".join(etcd_urls(etcd1)), "--cluster", CLUSTER]
    try:
        scheduler = launcher.start("scheduler", "scheduler", *common, "--replica-id", "s0", timeout=60)
        llumlet = launcher.start("l0", "llumlet", *common, "--instance-id", "l0", "--transport", "tcp", timeout=60)
        frontend = launcher.start(
            "frontend", "frontend", *common, "--scheduler", scheduler.address, "--http-port", "0", timeout=60
        )
        yield Cluster(launcher, scheduler, llumlet, frontend, etcd_urls(etcd1))
    finally:
        launcher.stop_all()


# -- the bad credentials -------------------------------------------------------------------------------------------
def expired_admin(c: Cluster, directory: Path) -> CertPaths:
    """An admin certificate of the cluster's own CA whose validity ended yesterday."""
    pki = c.launcher.pki
    now = datetime.datetime.now(datetime.UTC)
    issued = pki.authority().issue(
        Identity(pki.cluster, "admin", "expired"),
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    paths: CertPaths = issued.write(directory, pki.ca_cert)
    return paths


def other_ca_admin(c: Cluster, directory: Path) -> CertPaths:
    """An admin certificate for the same cluster name from another CA (trusting the right CA)."""
    other = bootstrap_local(directory, c.launcher.pki.cluster)
    own = other.ensure("admin", "intruder")
    return CertPaths(c.launcher.pki.ca_cert, own.cert, own.key)


def wrong_role(c: Cluster) -> CertPaths:
    """A valid certificate of the cluster's CA, for a llumlet (which may not call admin RPCs)."""
    paths: CertPaths = c.launcher.pki.ensure("llumlet", "not-an-admin")
    return paths


def tls(paths: CertPaths) -> TlsConfig:
    return TlsConfig.from_files(paths.ca, paths.cert, paths.key)


# -- client library ------------------------------------------------------------------------------------------------
def library_error(c: Cluster, paths: CertPaths) -> LlumnixError:
    start = time.monotonic()
    client = LlumnixClient(scheduler_endpoints=c.scheduler.address, tls=tls(paths), timeout=10)
    with client, pytest.raises(LlumnixError) as info:
        client.list_instances()
    assert time.monotonic() - start < REFUSAL_DEADLINE_S, "the refusal took too long"
    return info.value


def test_library_expired_certificate_is_named(cluster: Cluster, tmp_path: Path) -> None:
    err = library_error(cluster, expired_admin(cluster, tmp_path / "expired"))
    assert "expired" in str(err), err
    assert "admin-expired.pem" in str(err) or "this client's certificate" in str(err), err


def test_library_certificate_from_another_ca_is_named(cluster: Cluster, tmp_path: Path) -> None:
    err = library_error(cluster, other_ca_admin(cluster, tmp_path / "other"))
    assert "CA" in str(err), err


def test_library_wrong_role_is_named(cluster: Cluster) -> None:
    err = library_error(cluster, wrong_role(cluster))
    assert err.code == "PERMISSION_DENIED", err
    assert "caller role llumlet" in str(err) and "/llumnix.v1.AdminService/ListInstances" in str(err), err


def test_library_unknown_api_key_is_named(cluster: Cluster) -> None:
    ca = cluster.launcher.pki.ca_cert
    config = TlsConfig.from_files(ca, api_key=UNKNOWN_KEY)
    start = time.monotonic()
    client = LlumnixClient(frontend_endpoints=str(cluster.frontend.ready["grpc_address"]), tls=config, timeout=10)
    with client, pytest.raises(LlumnixError) as info:
        client.generate_text("hello", max_tokens=2, timeout=10)
    assert time.monotonic() - start < REFUSAL_DEADLINE_S
    assert info.value.code == "UNAUTHENTICATED", info.value
    assert "unknown or revoked API key" in str(info.value), info.value


# -- llmctl --------------------------------------------------------------------------------------------------------
def llmctl(c: Cluster, paths: CertPaths, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--ca", str(paths.ca), "--cert", str(paths.cert), "--key", str(paths.key), "--timeout", "10"]
    start = time.monotonic()
    done = subprocess.run(
        [LLMCTL, "--endpoint", c.scheduler.address, *flags, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - start < 30, "llmctl took too long to refuse"
    return done


def test_llmctl_expired_certificate_exits_with_the_cause(cluster: Cluster, tmp_path: Path) -> None:
    done = llmctl(cluster, expired_admin(cluster, tmp_path / "expired"), "instances")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done
    assert "expired" in done.stderr, done.stderr


def test_llmctl_certificate_from_another_ca_exits_with_the_cause(cluster: Cluster, tmp_path: Path) -> None:
    done = llmctl(cluster, other_ca_admin(cluster, tmp_path / "other"), "instances")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done
    assert "CA" in done.stderr, done.stderr


def test_llmctl_wrong_role_exits_with_the_cause(cluster: Cluster) -> None:
    done = llmctl(cluster, wrong_role(cluster), "scale", "3")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done
    assert "caller role llumlet" in done.stderr and "AdminService/Scale" in done.stderr, done.stderr


# -- HTTP ----------------------------------------------------------------------------------------------------------
def http(url: str, body: dict[str, Any] | None = None, key: str = "") -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, payload = reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, json.loads(exc.read())
    assert time.monotonic() - start < REFUSAL_DEADLINE_S
    return status, payload


async def new_key(c: Cluster, role: str) -> str:
    async with harness_etcd_client(c.etcd_endpoints) as etcd:
        key, _ = await ApiKeyStore(etcd, KeyLayout(CLUSTER)).create(f"{role}-{time.monotonic_ns()}", role)
    return key


def test_http_unknown_and_malformed_keys_get_401_naming_the_key(cluster: Cluster) -> None:
    base = str(cluster.frontend.ready["http_url"])
    completion = {"model": "llama-7b-a10", "prompt": "hello", "max_tokens": 2}
    status, body = http(f"{base}/v1/completions", completion, key=UNKNOWN_KEY)
    assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert "unknown or revoked API key" in body["error"]["message"], body
    status, body = http(f"{base}/v1/completions", completion, key="not-a-key")
    assert status == 401 and "malformed API key" in body["error"]["message"], body


async def test_http_revoked_key_gets_401(cluster: Cluster) -> None:
    key = await new_key(cluster, "user")
    base = str(cluster.frontend.ready["http_url"])
    assert http(f"{base}/v1/models", key=key)[0] == 200
    async with harness_etcd_client(cluster.etcd_endpoints) as etcd:
        store = ApiKeyStore(etcd, KeyLayout(CLUSTER))
        await store.revoke(key.split("_")[1])
    # the frontend caches verified keys briefly; the revocation must take effect within its TTL, not hang
    deadline = time.monotonic() + 30
    while (reply := http(f"{base}/v1/models", key=key))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    status, body = reply
    assert status == 401 and "unknown or revoked API key" in body["error"]["message"], body


async def test_http_abort_of_another_keys_request_gets_403_naming_the_rule(cluster: Cluster) -> None:
    """The wrong role over HTTP: a user's key may abort only the requests it created (an admin's any)."""
    alice, bob = await new_key(cluster, "user"), await new_key(cluster, "user")
    base = str(cluster.frontend.ready["http_url"])
    body = {"model": "llama-7b-a10", "prompt": "a b c", "max_tokens": 400, "stream": True}
    rid = f"alice-{time.monotonic_ns()}"
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {alice}", "X-Request-Id": rid}
        async with session.post(f"{base}/v1/completions", json=body, headers=headers) as stream:
            assert stream.status == 200
            await stream.content.readline()  # it runs
            start = time.monotonic()
            async with session.post(
                f"{base}/v1/requests/{rid}/abort", headers={"Authorization": f"Bearer {bob}"}
            ) as refused:
                assert refused.status == 403
                error = (await refused.json())["error"]
            assert time.monotonic() - start < REFUSAL_DEADLINE_S
            assert error["type"] == "permission_error", error
            assert "created by another API key" in error["message"] and "may not abort it" in error["message"], error
            async with session.post(
                f"{base}/v1/requests/{rid}/abort", headers={"Authorization": f"Bearer {alice}"}
            ) as own:
                assert own.status == 200, await own.text()
            payload = (await stream.read()).decode()
    assert '"finish_reason": "abort"' in payload, payload[-500:]
