"""The scenario run inside emulated host A (``ip netns exec``): a scheduler replica there, the RayInstanceProvider
placing a llumlet on host B, ``llmctl`` from A, bad placements, and stop. Prints one JSON line of what it saw.

It runs in A's network namespace because only there are A's and B's addresses reachable; the test reads its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from pyllumnix.control_plane.scheduler.provider_ray import ProviderError, RayInstanceProvider
from pyllumnix.infra.security.runtime import INSECURE, from_options

# The PKI folder of a secure scenario (llmctl then dials with the admin certificate).
TLS_DIR: dict[str, str] = {}


def llmctl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    d = TLS_DIR.get("dir")
    tls = ["--ca", f"{d}/ca.pem", "--cert", f"{d}/admin-admin.pem", "--key", f"{d}/admin-admin-key.pem"] if d else []
    return subprocess.run(
        [sys.executable, "-m", "pyllumnix.tools.llmctl", "-e", endpoint, *(tls or ["--no-tls"]), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def instances(endpoint: str) -> list[dict[str, Any]]:
    done = llmctl(endpoint, "-o", "json", "instances")
    if done.returncode != 0:
        return []
    data = json.loads(done.stdout or "{}")
    found: list[dict[str, Any]] = data.get("instances", data if isinstance(data, list) else [])
    return found


def grpc_address(instance: Any) -> str:
    """The ``grpc_address`` anywhere in one instance of ``llmctl -o json instances`` ("" if none)."""
    if isinstance(instance, dict):
        if isinstance(instance.get("grpc_address"), str):
            return str(instance["grpc_address"])
        return next((a for a in map(grpc_address, instance.values()) if a), "")
    return ""


async def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.3)
    raise TimeoutError(f"{what}: not within {timeout}s")


async def wait_nodes(provider: RayInstanceProvider, count: int, timeout: float) -> None:
    import ray

    def alive() -> bool:
        return len([n for n in ray.nodes() if n.get("Alive")]) >= count  # type: ignore[no-untyped-call]

    await wait_for(f"{count} Ray nodes", alive, timeout)


async def main(ray_address: str, etcd: str, host_a: str, host_b: str, cluster: str, port: int) -> dict[str, Any]:
    """Secure when argv[8] names a PKI folder (with the CA key and certificates naming both hosts' addresses): the
    scheduler and llmctl use it, the provider issues the placed llumlet's certificate and hands it over as PEM."""
    out: dict[str, Any] = {}
    endpoint = f"{host_a}:{port}"
    tls_dir = sys.argv[8] if len(sys.argv) > 8 else ""
    security = INSECURE
    flags = ["--insecure"]
    if tls_dir:
        TLS_DIR["dir"] = tls_dir
        security = from_options("scheduler", "s1", tls_dir=tls_dir, hosts=[host_a])
        flags = ["--tls-dir", tls_dir, "--replica-id", "s0"]
    scheduler = subprocess.Popen(
        [
            sys.executable, "-m", "pyllumnix.tools.cli", "scheduler", "--etcd", etcd, "--cluster", cluster,
            "--host", host_a, "--advertise-host", host_a, "--port", str(port), *flags,
        ],
        start_new_session=True,
    )  # fmt: skip
    llumlet_args = ["--etcd", etcd, "--cluster", cluster, "--engine", "sim", "--transport", "tcp"]
    provider = RayInstanceProvider(
        ray_address, llumlet_args, cluster=cluster, hosts=[host_b], cpus=1, security=security, placement_timeout=5
    )
    out["secure"] = security.secure
    try:
        await provider.connect()
        await wait_nodes(provider, 2, 60)
        (iid,) = await provider.start_instances(1)
        out["instance"] = iid
        out["node"] = provider.node_of(iid)
        listed = await wait_for(
            f"{iid} in llmctl instances", lambda: [i for i in instances(endpoint) if iid in json.dumps(i)], 60
        )
        out["listed"] = listed
        out["table"] = llmctl(endpoint, "-o", "wide", "instances").stdout

        # Bad placements: a clear error, and no placement group left behind.
        import ray
        from ray.util import placement_group_table

        for name, bad in (
            ("unknown_host", RayInstanceProvider(ray_address, llumlet_args, cluster=cluster, hosts=["10.77.255.9"])),
            ("too_big", RayInstanceProvider(ray_address, llumlet_args, cluster=cluster, cpus=64)),
            (  # fits the node, but its CPUs are taken (B has 2, our instance holds 1): the group never becomes ready
                "busy",
                RayInstanceProvider(
                    ray_address, llumlet_args, cluster=cluster, hosts=[host_b], cpus=2, placement_timeout=3
                ),
            ),
        ):
            bad._connected = True  # the same driver connection
            try:
                await bad.start_instances(1)
                out[name] = "started"
            except ProviderError as e:
                out[name] = str(e)

        def live_groups() -> list[str]:
            return sorted(str(g.get("name")) for g in placement_group_table().values() if g.get("state") != "REMOVED")

        out["groups_before_stop"] = live_groups()
        assert await provider.stop_instance(iid)
        out["groups_after_stop"] = live_groups()
        out["gone"] = bool(
            await wait_for(f"{iid} gone", lambda: not [i for i in instances(endpoint) if iid in json.dumps(i)], 30)
        )
        out["actors"] = [a for a in ray.util.list_named_actors(all_namespaces=True) if cluster in str(a)]
    finally:
        provider.stop_on_close = True
        await provider.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(scheduler.pid, signal.SIGTERM)
        try:
            scheduler.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait()
    return out


async def host_loss(ray_address: str, etcd: str, host_a: str, host_b: str, cluster: str, port: int) -> dict[str, Any]:
    """The scheduler's own Ray provider under ``llmctl scale 2`` (one instance per host, spread), then host B's link
    goes down: B's instance must leave the registry within its lease TTL and the scheduler restore 2 on host A."""
    out: dict[str, Any] = {}
    endpoint = f"{host_a}:{port}"
    llumlet_args = f"--engine sim --transport tcp --insecure --lease-ttl {LEASE_TTL_S}"
    scheduler = subprocess.Popen(
        [
            sys.executable, "-m", "pyllumnix.tools.cli", "scheduler", "--etcd", etcd, "--cluster", cluster,
            "--host", host_a, "--advertise-host", host_a, "--port", str(port), "--insecure",
            "--provider", "ray", "--ray-address", ray_address, "--llumlet-args", llumlet_args,
            "--stop-instances-on-exit",
        ],
        start_new_session=True,
    )  # fmt: skip

    def hosts_of() -> list[str]:
        return sorted(grpc_address(i) for i in instances(endpoint))

    try:
        await wait_for("scheduler up", lambda: llmctl(endpoint, "leader").returncode == 0, 60)
        scaled = llmctl(endpoint, "scale", "2")
        out["scale"] = scaled.returncode, scaled.stdout + scaled.stderr

        def two(on: str = "") -> list[str] | None:
            found = hosts_of()
            return found if len(found) == 2 and all(a and a.startswith(on) for a in found) else None

        out["before"] = await wait_for("2 instances", two, 90)
        subprocess.run(["ip", "-n", sys.argv[8], "link", "set", sys.argv[9], "down"], check=True)
        t0 = time.monotonic()
        await wait_for("B's instance gone", lambda: (h := hosts_of()) and not any(a.startswith(host_b) for a in h), 60)
        out["gone_after_s"] = round(time.monotonic() - t0, 1)
        try:
            out["after"] = await wait_for("2 instances on A", lambda: two(f"{host_a}:"), 90)
        except TimeoutError:
            print("LISTED", json.dumps(instances(endpoint)), flush=True)
            raise
        out["restored_after_s"] = round(time.monotonic() - t0, 1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(scheduler.pid, signal.SIGTERM)
        try:
            scheduler.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait()
    return out


LEASE_TTL_S = 3


async def migrate(ray_address: str, etcd: str, host_a: str, host_b: str, cluster: str, port: int) -> dict[str, Any]:
    """Two Ray-placed llumlets (spread: one per host, plaintext), a request started on B and live-migrated to A over
    the data plane given in argv[8], across the veth; the sink (on A) records every token."""
    import grpc

    from integration.test_migration_processes import unmigrated_tokens
    from pyllumnix.infra.grpc_server import start_server
    from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc
    from pyllumnix.tools.recording_sink import RecordingSink

    transport = sys.argv[8]
    out: dict[str, Any] = {"transport": transport}
    endpoint = f"{host_a}:{port}"
    scheduler = subprocess.Popen(
        [
            sys.executable, "-m", "pyllumnix.tools.cli", "scheduler", "--etcd", etcd, "--cluster", cluster,
            "--host", host_a, "--advertise-host", host_a, "--port", str(port), "--insecure",
        ],
        start_new_session=True,
    )  # fmt: skip
    args = ["--etcd", etcd, "--cluster", cluster, "--profile", "tiny", "--transport", transport, "--verify-kv"]
    provider = RayInstanceProvider(ray_address, args, cluster=cluster, cpus=1, security=INSECURE)
    sink = RecordingSink()
    sink.server = await start_server(
        [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, sink, "llumnix.v1.OutputSinkService")],
        host=host_a,
        security=INSECURE,
    )
    try:
        await provider.connect()
        await wait_nodes(provider, 2, 60)
        ids = await provider.start_instances(2)
        nodes = {provider.node_of(i): i for i in ids}
        assert set(nodes) == {host_a, host_b}, nodes

        def both() -> list[dict[str, Any]] | None:
            found = instances(endpoint)
            return found if len(found) == 2 else None

        listed = await wait_for("2 instances", both, 60)
        info = {i["info"]["instance_id"]: i["info"] for i in listed}
        src, dst = info[nodes[host_b]], info[nodes[host_a]]
        out["src"], out["dst"] = src["data_plane_address"], dst["data_plane_address"]
        rid = "mh-r1"
        prompt = [(i * 7 + 3) % 200 + 1 for i in range(100)]
        request = common_pb2.EngineRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=250, seed=7, ignore_eos=True),
            frontend_address=f"{host_a}:{sink.server.port}",  # RunningServer.address is always 127.0.0.1
            arrival_time=time.time(),
        )
        async with grpc.aio.insecure_channel(src["grpc_address"]) as ch:
            stub = llumlet_pb2_grpc.LlumletServiceStub(ch)
            await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=request), timeout=10)
            deadline = time.monotonic() + 30
            while len(sink.tokens(rid)) < 40 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            out["tokens_at_migrate"] = len(sink.tokens(rid))
            reply = await stub.MigrateOut(
                llumlet_pb2.MigrateOutRequest(
                    destination_instance_id=dst["instance_id"],
                    destination_grpc_address=dst["grpc_address"],
                    request_id=rid,
                    wait=True,
                ),
                timeout=60,
            )
        result = reply.results[0]
        out["outcome"] = llumlet_pb2.MigrationOutcome.Name(result.outcome)
        out["reason"] = result.reason
        out["bytes_sent"] = result.bytes_sent
        out["downtime_ms"] = result.downtime_ms
        await sink.wait(rid, timeout=60)
        out["tokens_identical"] = sink.tokens(rid) == unmigrated_tokens(prompt, 250, 7)
        out["indices"] = sink.raw_indices(rid) == list(range(250))
        out["instances"] = sorted({o.instance_id for o in sink.outputs[rid]})
        out["src_id"], out["dst_id"] = src["instance_id"], dst["instance_id"]
    finally:
        await sink.server.stop()
        provider.stop_on_close = True
        await provider.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(scheduler.pid, signal.SIGTERM)
        try:
            scheduler.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait()
    return out


if __name__ == "__main__":
    ray_address, etcd, host_a, host_b, cluster, port = sys.argv[1:7]
    # place [PKI folder] | host_loss <B's netns> <B's veth> | migrate <transport>
    scenario = {"place": main, "host_loss": host_loss, "migrate": migrate}[(sys.argv[7:8] or ["place"])[0]]
    result = asyncio.run(scenario(ray_address, etcd, host_a, host_b, cluster, int(port)))
    print("RESULT " + json.dumps(result), flush=True)
