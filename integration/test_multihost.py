"""Multi-host on Ray across emulated hosts (two network namespaces joined by a veth pair, a real Ray head and worker,
real etcd): the RayInstanceProvider places a llumlet on host B, which binds and advertises B's address (what
``llmctl`` run from host A shows); impossible placements fail clearly and leave no placement group; stop removes the
actor and its group; a request migrates B -> A; B's link going down fails B's requests (naming the instance) and
nothing else. Every scenario is secure (mutual TLS, certificates naming the hosts' addresses), as the rest of the
suites are by default. Skips only where network namespaces cannot be created (not root)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import multihost
from integration.multihost import TwoHosts, can_create_namespaces, two_hosts
from integration.multihost_driver import LEASE_TTL_S
from pyllumnix.control_plane.scheduler.provider_ray import ProviderError, RayInstanceProvider
from pyllumnix.data_plane.transport import ucx_available
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.ca import DEFAULT_HOSTS

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'pyllumnix[ray]')")
_NO_NETNS = can_create_namespaces()


STALE_RAY_TOKEN = "stale-token-of-an-earlier-ray-run"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    """The emulated hosts, made and used under a home folder of the module's own that holds a stale
    ``~/.ray/auth_token`` (what an earlier Ray run leaves behind): the cluster must not depend on the user's home, nor
    write to it. Before, Ray read that token and every scenario's driver failed to connect (InvalidAuthToken)."""
    if _NO_NETNS is not None:
        pytest.skip(f"cannot emulate hosts here: {_NO_NETNS}")
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(STALE_RAY_TOKEN)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(home))
        with two_hosts(tmp_path_factory.mktemp("multihost")) as made:
            yield made
    assert [p.name for p in (home / ".ray").iterdir()] == ["auth_token"], "Ray wrote into the home folder"
    assert (home / ".ray" / "auth_token").read_text() == STALE_RAY_TOKEN


@pytest.mark.timeout(150)
def test_ray_places_llumlet_on_host_b(hosts: TwoHosts, tmp_path: Path) -> None:
    """Secure (mutual TLS): the scheduler's certificate names A's address; the llumlet's is issued by the provider
    for B after placement and reaches B as PEM content."""
    cluster = f"mh{uuid.uuid4().hex[:8]}"
    pki = tmp_path / "pki"
    bootstrap_local(pki, "llumnix", hosts=[*DEFAULT_HOSTS, hosts.a.ip, hosts.b.ip])
    done = hosts.a.run(
        sys.executable, "-m", "integration.multihost_driver",
        hosts.ray_address, hosts.etcd, hosts.a.ip, hosts.b.ip, cluster, "50071", "place", str(pki),
        timeout=130, env=hosts.env(),
    )  # fmt: skip
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result_lines, f"driver failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    out = json.loads(result_lines[-1][len("RESULT ") :])
    print("phases (s):", out.get("phases"))  # where the scenario spent its time (pytest -s, or a failure's report)
    iid = out["instance"]
    assert out["secure"] is True
    assert out["node"] == hosts.b.ip
    (listed,) = out["listed"]
    # Every address the instance publishes is host B's, never a wildcard or a loopback address.
    addresses = [v for k, v in _flatten(listed) if k.lower().endswith("address")]
    assert addresses, listed
    for address in addresses:
        assert address.removeprefix("tcp://").startswith(f"{hosts.b.ip}:"), (address, listed)
    assert hosts.b.ip in out["table"] and iid in out["table"]
    assert "no alive Ray node among --ray-hosts 10.77.255.9" in out["unknown_host"]
    assert "no Ray node can hold an instance of 64 CPU" in out["too_big"]
    assert "not satisfied within 3" in out["busy"]
    assert out["groups_before_stop"] == [f"pg-{iid}"]  # the failed placements left nothing
    assert out["groups_after_stop"] == []
    assert out["gone"] and out["actors"] == []


def _flatten(value: object, key: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(v, k)]
    if isinstance(value, list):
        return [kv for v in value for kv in _flatten(v, key)]
    return [(key, value)] if isinstance(value, str) else []


def test_unreachable_ray_address_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    provider = RayInstanceProvider(f"127.0.0.1:{port}", [], ray_connect_timeout=5)
    with pytest.raises(ProviderError, match=f"the Ray head at 127.0.0.1:{port} does not answer"):
        asyncio.run(provider.start_instances(1))
    with pytest.raises(ProviderError, match="HOST:PORT"):
        asyncio.run(RayInstanceProvider("nonsense", []).connect())


def test_a_failed_setup_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray failing to start after the namespaces, the veth pair and etcd exist: the fixture still removes them all."""
    if _NO_NETNS is not None:
        pytest.skip(f"cannot emulate hosts here: {_NO_NETNS}")
    seen: list[multihost.Host] = []

    def fail(host: multihost.Host, *args: object) -> None:
        seen.append(host)  # host A: its namespace, the veth pair and etcd exist now
        raise RuntimeError("ray start failed (injected)")

    monkeypatch.setattr(multihost, "_ray_start", fail)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where two_hosts() makes its work folder
    with pytest.raises(RuntimeError, match="injected"), multihost.two_hosts():
        pass
    assert not list(tmp_path.glob("llx-multihost-*"))  # the folder it made is gone too (CI runs left one each)
    (a,) = seen
    assert a.procs and all(p.poll() is not None for p in a.procs)  # etcd was started, and is gone
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert a.name not in names and a.name[:-1] + "b" not in names
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert a.veth not in links and a.veth[:-1] + "b" not in links


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_request_migrates_from_host_b_to_host_a(hosts: TwoHosts, transport: str, tmp_path: Path) -> None:
    """Token-identical live migration B -> A across the veth (destination checks every KV block's bytes), ordered
    through the scheduler's admin API, secure (mutual TLS). Before the addressing fixes TCP advertised
    tcp://127.0.0.1 ("Connect call failed") and UCX offered every interface."""
    if transport == "ucx" and not ucx_available():
        pytest.skip("ucxx not importable (pyllumnix[ucx])")
    cluster = f"mh{uuid.uuid4().hex[:8]}"
    pki = tmp_path / "pki"
    bootstrap_local(pki, "llumnix", hosts=[*DEFAULT_HOSTS, hosts.a.ip, hosts.b.ip])
    done = hosts.a.run(
        sys.executable, "-m", "integration.multihost_driver",
        hosts.ray_address, hosts.etcd, hosts.a.ip, hosts.b.ip, cluster, "50073", "migrate", transport, str(pki),
        timeout=130, env=hosts.env(),
    )  # fmt: skip
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result_lines, f"driver failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    out = json.loads(result_lines[-1][len("RESULT ") :])
    print("phases (s):", out.get("phases"))  # where the scenario spent its time (pytest -s, or a failure's report)
    assert out["secure"] is True
    if transport == "tcp":
        assert out["src"].startswith(f"tcp://{hosts.b.ip}:") and out["dst"].startswith(f"tcp://{hosts.a.ip}:"), out
    assert out["outcome"] == "MIGRATION_OUTCOME_COMMITTED", out["reason"]
    assert out["bytes_sent"] > 0
    assert out["tokens_identical"] and out["indices"], out
    assert out["instances"] == sorted([out["src_id"], out["dst_id"]])


@pytest.mark.timeout(240)
def test_host_b_lost_leaves_registry_and_capacity_is_restored_on_a(hosts: TwoHosts, tmp_path: Path) -> None:
    """Runs last (it takes B's link down). Secure (mutual TLS everywhere; the scheduler's provider issues each placed
    llumlet's certificate for its node). The scheduler's own Ray provider (``--provider ray``) spreads
    ``llmctl scale 2`` over both hosts and a request runs on each; when B's link goes down its instance leaves the
    registry within the lease TTL (etcd on A stops hearing from it), B's request ends at its frontend with an error
    naming B's instance, A's request finishes with every token and no error, and the scheduler starts a replacement
    on A (Ray declares B dead in ~3 s). An instance still starting on B when it vanished (placed, not registered)
    ends with a clear error and leaves no placement group, actor or registry entry. ``llmctl scale`` runs in A's
    namespace; the listings are the admin API's ``ListInstances`` read from A as ``llmctl -o json instances`` prints
    it (the placement test checks llmctl's own listing)."""
    cluster = f"mh{uuid.uuid4().hex[:8]}"
    pki = tmp_path / "pki"
    bootstrap_local(pki, "llumnix", hosts=[*DEFAULT_HOSTS, hosts.a.ip, hosts.b.ip])
    done = hosts.a.run(
        sys.executable, "-m", "integration.multihost_driver",
        hosts.ray_address, hosts.etcd, hosts.a.ip, hosts.b.ip, cluster, "50072",
        "host_loss", hosts.b.name, hosts.b.veth, str(pki),
        timeout=220, env=hosts.env(),
    )  # fmt: skip
    log = hosts.workdir / "host_loss.log"
    log.write_text(f"{done.stdout}\n--- stderr ---\n{done.stderr}")
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result_lines, f"driver failed ({done.returncode}), output in {log}:\n{done.stderr}"
    out = json.loads(result_lines[-1][len("RESULT ") :])
    print("phases (s):", out.get("phases"))  # where the scenario spent its time (pytest -s, or a failure's report)
    assert out["scale"][0] == 0, out["scale"]
    before = out["before"]
    assert sorted(a.split(":")[0] for a in before) == [hosts.a.ip, hosts.b.ip], before  # spread: one per host
    assert out["secure"] is True
    assert out["gone_after_s"] <= 3 * LEASE_TTL_S, out
    assert all(a.startswith(f"{hosts.a.ip}:") for a in out["after"]) and len(out["after"]) == 2, out
    b_end, b_id = out["b_end"], out["b_id"]
    assert b_end["finish_reason"] == "FINISH_REASON_ERROR" and b_end["instance_id"] == b_id, b_end
    assert f"instance {b_id} was lost" in b_end["error"], b_end
    assert 0 < b_end["tokens"] < 8000, b_end  # it was running, and it did not finish some other way
    a_end = out["a_end"]
    assert a_end == {
        "finish_reason": "FINISH_REASON_LENGTH",
        "errors": [],
        "indices_ok": True,
        "instances": a_end["instances"],
    }, a_end
    assert b_id not in a_end["instances"], a_end
    assert out["requests_seen"] == ["on-a", "on-b"], out
    # A start on B that had not registered when B vanished: a clear error, nothing half-made left.
    mid = out["mid"]
    assert out["mid_starting"] and "stopped answering" in mid["failure"] and "node is gone" in mid["failure"], mid
    assert mid["left"] == [] and not mid["listed"] and mid["group"] in ([], ["REMOVED"]), mid
