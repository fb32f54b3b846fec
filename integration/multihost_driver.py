"""The scenario run inside emulated host A (``ip netns exec``): a scheduler replica there, the RayInstanceProvider
placing a llumlet on host B, ``llmctl`` from A, bad placements, and stop. Prints one JSON line of what it saw.

It runs in A's network namespace because only there are A's and B's addresses reachable; the test reads its result.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import grpc
from google.protobuf import json_format

from integration.multihost import HOST_CPUS
from pyllumnix.control_plane.scheduler.provider_ray import ProviderError, RayInstanceProvider
from pyllumnix.infra.processes import stop_group
from pyllumnix.infra.security.runtime import INSECURE, from_options, open_channel
from pyllumnix.protos.llumnix.v1 import admin_pb2, admin_pb2_grpc

# The PKI folder of a secure scenario (llmctl then dials with the admin certificate).
TLS_DIR: dict[str, str] = {}


def llmctl(endpoint: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    d = TLS_DIR.get("dir")
    tls = ["--ca", f"{d}/ca.pem", "--cert", f"{d}/admin-admin.pem", "--key", f"{d}/admin-admin-key.pem"] if d else []
    return subprocess.run(
        [sys.executable, "-m", "pyllumnix.tools.llmctl", "-e", endpoint, *(tls or ["--no-tls"]), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
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


async def wait_for(what: str, check: Any, timeout: float, every: float = 0.3) -> Any:
    """Polls ``check`` (a function, or a coroutine function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check() if asyncio.iscoroutinefunction(check) else await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout}s")


class Admin:
    """The scheduler's admin API called in this process, for the scenario's waits: a poll costs a round trip, where
    an ``llmctl`` run costs a Python start (a second or more on a loaded machine, so a wait with it overshot by that
    much each round). What a check asserts is still read with ``llmctl`` once the wait is over."""

    def __init__(self, endpoint: str, tls_dir: str) -> None:
        settings = from_options("admin", "admin", tls_dir=tls_dir) if tls_dir else INSECURE
        self.channel = open_channel(endpoint, peer=None, settings=settings)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def instances(self) -> list[dict[str, Any]]:
        """As ``llmctl -o json instances`` lists them ([] while the scheduler does not answer)."""
        try:
            reply = await self.stub.ListInstances(admin_pb2.ListInstancesRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return []
        return [
            json_format.MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for st in reply.instances
        ]

    async def leads(self) -> bool:
        """True once a scheduler leader answers (``llmctl leader`` succeeding)."""
        try:
            reply = await self.stub.GetLeader(admin_pb2.GetLeaderRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.leader_address)

    async def close(self) -> None:
        await self.channel.close()


class Phases:
    """Seconds since the scenario began at each step (in its RESULT), to see where a slow run spent its time."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        out["phases"] = self.marks

    def __call__(self, name: str) -> None:
        self.marks[name] = round(time.monotonic() - self.t0, 1)


async def wait_nodes(provider: RayInstanceProvider, count: int, timeout: float) -> None:
    import ray

    def alive() -> bool:
        return len([n for n in ray.nodes() if n.get("Alive")]) >= count  # type: ignore[no-untyped-call]

    await wait_for(f"{count} Ray nodes", alive, timeout)


async def main(ray_address: str, etcd: str, host_a: str, host_b: str, cluster: str, port: int) -> dict[str, Any]:
    """Secure when argv[8] names a PKI folder (with the CA key and certificates naming both hosts' addresses): the
    scheduler and llmctl use it, the provider issues the placed llumlet's certificate and hands it over as PEM."""
    out: dict[str, Any] = {}
    phase = Phases(out)
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
    admin = Admin(endpoint, tls_dir)
    try:
        await provider.connect()
        phase("ray connected")
        await wait_nodes(provider, 2, 60)
        (iid,) = await provider.start_instances(1)
        phase("placed")
        out["instance"] = iid
        out["node"] = provider.node_of(iid)

        async def shown() -> bool:
            return any(iid in json.dumps(i) for i in await admin.instances())

        await wait_for(f"{iid} listed by the scheduler", shown, 60, every=0.1)
        phase("listed")
        out["listed"] = [i for i in instances(endpoint) if iid in json.dumps(i)]  # what llmctl shows
        out["table"] = llmctl(endpoint, "-o", "wide", "instances").stdout
        phase("llmctl")

        # Bad placements: a clear error, and no placement group left behind.
        import ray
        from ray.util import placement_group_table

        for name, bad in (
            ("unknown_host", RayInstanceProvider(ray_address, llumlet_args, cluster=cluster, hosts=["10.77.255.9"])),
            ("too_big", RayInstanceProvider(ray_address, llumlet_args, cluster=cluster, cpus=64)),
            (  # fits the node, but its CPUs are taken (our instance holds 1 of B's): the group never becomes ready
                "busy",
                RayInstanceProvider(
                    ray_address, llumlet_args, cluster=cluster, hosts=[host_b], cpus=HOST_CPUS, placement_timeout=3
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
        phase("bad placements")
        assert await provider.stop_instance(iid)
        out["groups_after_stop"] = live_groups()

        async def not_shown() -> bool:
            return not await shown()

        out["gone"] = bool(await wait_for(f"{iid} gone from the scheduler", not_shown, 30, every=0.1))
        out["actors"] = [a for a in ray.util.list_named_actors(all_namespaces=True) if cluster in str(a)]
        phase("stopped")
    finally:
        await admin.close()
        provider.stop_on_close = True
        await provider.close()
        stop_group(scheduler, 10)
    return out


async def host_loss(ray_address: str, etcd: str, host_a: str, host_b: str, cluster: str, port: int) -> dict[str, Any]:
    """The scheduler's own Ray provider under ``llmctl scale 2`` (one instance per host, spread), a request running
    on each, then host B's link goes down: B's instance must leave the registry within its lease TTL, its request end
    at its frontend with an error naming the instance, A's request finish untouched, and the scheduler restore 2 on
    host A. Secure when argv[10] names a PKI folder (the scheduler's provider then issues the llumlets' certificates;
    the recording frontend and the driver's calls use a frontend certificate)."""
    from pyllumnix.infra.grpc_server import start_server
    from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2_grpc, llumlet_pb2, llumlet_pb2_grpc
    from pyllumnix.tools.recording_sink import RecordingSink

    out: dict[str, Any] = {}
    phase = Phases(out)
    endpoint = f"{host_a}:{port}"
    tls_dir = sys.argv[10] if len(sys.argv) > 10 else ""
    llumlet_args = f"--engine sim --transport tcp --lease-ttl {LEASE_TTL_S}"
    flags = ["--insecure"]
    frontend = provider_security = INSECURE
    if tls_dir:
        TLS_DIR["dir"] = tls_dir
        flags = ["--tls-dir", tls_dir, "--replica-id", "s0"]
        frontend = from_options("frontend", "f0", tls_dir=tls_dir, hosts=[host_a])
        provider_security = from_options("scheduler", "s1", tls_dir=tls_dir, hosts=[host_a])
    else:
        llumlet_args += " --insecure"
    out["secure"] = frontend.secure
    scheduler = subprocess.Popen(
        [
            sys.executable, "-m", "pyllumnix.tools.cli", "scheduler", "--etcd", etcd, "--cluster", cluster,
            "--host", host_a, "--advertise-host", host_a, "--port", str(port), *flags,
            "--provider", "ray", "--ray-address", ray_address, "--llumlet-args", llumlet_args,
            "--stop-instances-on-exit",
        ],
        start_new_session=True,
    )  # fmt: skip
    sink = RecordingSink()  # the frontend of both requests, on A
    sink.server = await start_server(
        [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, sink, "llumnix.v1.OutputSinkService")],
        host=host_a,
        security=frontend,
    )

    admin = Admin(endpoint, tls_dir)

    def addresses(found: list[dict[str, Any]]) -> list[str]:
        return sorted(grpc_address(i) for i in found)

    def two(found: list[dict[str, Any]], on: str = "") -> list[str] | None:
        listed = addresses(found)
        return listed if len(listed) == 2 and all(a and a.startswith(on) for a in listed) else None

    async def scheduler_shows_two(on: str = "") -> list[str] | None:
        return two(await admin.instances(), on)

    async def b_gone() -> bool:
        found = addresses(await admin.instances())
        return bool(found) and not any(a.startswith(host_b) for a in found)

    async def add(address: str, rid: str, max_tokens: int) -> None:
        request = common_pb2.EngineRequest(
            request_id=rid,
            prompt_token_ids=[(i * 7 + 3) % 200 + 1 for i in range(64)],
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=7, ignore_eos=True),
            frontend_address=f"{host_a}:{sink.server.port}",  # type: ignore[union-attr]
            arrival_time=time.time(),
        )
        async with open_channel(address, peer=None, settings=frontend) as ch:
            await llumlet_pb2_grpc.LlumletServiceStub(ch).AddRequest(
                llumlet_pb2.AddRequestRequest(request=request), timeout=10
            )

    try:
        await wait_for("scheduler up", admin.leads, 60, every=0.1)
        phase("scheduler up")
        # Scale answers once the provider placed the instances (joining Ray first): slow on a loaded machine.
        scaled = llmctl(endpoint, "--timeout", "100", "scale", "2", timeout=110)
        out["scale"] = scaled.returncode, scaled.stdout + scaled.stderr
        phase("scaled")
        out["before"] = await wait_for("2 instances", scheduler_shows_two, 90, every=0.1)
        listed = await admin.instances()
        on_host = {grpc_address(i).split(":")[0]: i for i in listed}
        phase("2 instances")
        ids = {host: next(v for k, v in _strings(i) if k == "instance_id") for host, i in on_host.items()}
        out["b_id"], out["a_id"] = ids[host_b], ids[host_a]
        await add(grpc_address(on_host[host_b]), "on-b", 8000)  # still running when B goes away
        await add(grpc_address(on_host[host_a]), "on-a", A_TOKENS)
        await wait_for("both requests streaming", lambda: sink.tokens("on-b") and sink.tokens("on-a"), 30, every=0.05)
        phase("streaming")
        # A host that disappears mid-start: a llumlet placed on B that has not registered yet (its etcd address is a
        # blackhole in B's subnet, and B's link goes down right after its actor answered).
        blackhole = host_b.rsplit(".", 1)[0] + ".99:2379"
        mid_args = ["--etcd", blackhole, "--cluster", cluster, "--engine", "sim", "--transport", "tcp"]
        extra = RayInstanceProvider(
            ray_address, mid_args, cluster=cluster, hosts=[host_b], cpus=0.5, security=provider_security
        )
        await extra.connect()
        (mid,) = await extra.start_instances(1)
        out["mid_starting"] = sorted(extra.starting()) == [mid]
        phase("mid-start placed")
        subprocess.run(["ip", "-n", sys.argv[8], "link", "set", sys.argv[9], "down"], check=True)
        t0 = time.monotonic()
        out["a_tokens_at_loss"] = len(sink.tokens("on-a"))
        await wait_for("B's instance gone", b_gone, 60, every=0.1)
        out["gone_after_s"] = round(time.monotonic() - t0, 1)
        phase("B gone")

        async def two_on_a() -> list[str] | None:
            return await scheduler_shows_two(f"{host_a}:")

        try:
            out["after"] = await wait_for("2 instances on A", two_on_a, 90, every=0.1)
        except TimeoutError:
            print("LISTED", json.dumps(await admin.instances()), flush=True)
            raise
        out["restored_after_s"] = round(time.monotonic() - t0, 1)
        phase("restored on A")
        # B's request: ended by the scheduler at its frontend once B is written off (lease TTL + the grace period).
        last_b = (await sink.wait("on-b", timeout=60))[-1]
        out["b_failed_after_s"] = round(time.monotonic() - t0, 1)
        phase("B's request failed")
        out["b_end"] = {
            "finish_reason": common_pb2.FinishReason.Name(last_b.finish_reason),
            "error": last_b.error,
            "instance_id": last_b.instance_id,
            "tokens": len(sink.tokens("on-b")),
        }
        a_outputs = await sink.wait("on-a", timeout=120)
        phase("A's request finished")
        out["a_end"] = {
            "finish_reason": common_pb2.FinishReason.Name(a_outputs[-1].finish_reason),
            "errors": [o.error for o in a_outputs if o.error],
            "indices_ok": sink.raw_indices("on-a") == list(range(A_TOKENS)),
            "instances": sorted({o.instance_id for o in a_outputs}),
        }
        out["requests_seen"] = sorted(sink.outputs)
        await wait_for("the mid-start failure", lambda: mid in extra.start_failures, 60, every=0.1)
        phase("mid-start failed")
        from ray.util import placement_group_table

        out["mid"] = {
            "failure": extra.start_failures[mid],
            "left": sorted(extra.starting()) + sorted(extra.instances),
            "group": [str(g.get("state")) for g in placement_group_table().values() if g.get("name") == f"pg-{mid}"],
            "listed": any(mid in json.dumps(i) for i in await admin.instances()),
        }
        await extra.close()
    finally:
        await admin.close()
        await sink.server.stop()
        stop_group(scheduler, 30)
    return out


LEASE_TTL_S = 3
A_TOKENS = 600  # host A's request: long enough to span B's loss on the sim engine's default profile


def _strings(value: Any, key: str = "") -> list[tuple[str, str]]:
    """Every (key, string value) pair in a parsed ``llmctl -o json`` entry, at any depth."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _strings(v, k)]
    if isinstance(value, list):
        return [kv for v in value for kv in _strings(v, key)]
    return [(key, value)] if isinstance(value, str) else []


async def migrate(ray_address: str, etcd: str, host_a: str, host_b: str, cluster: str, port: int) -> dict[str, Any]:
    """Two Ray-placed llumlets (spread: one per host), a request started on B and live-migrated to A over the data
    plane given in argv[8], across the veth, ordered through the scheduler's admin API (``MigrateRequest``: the
    leader finds the request in B's load reports and orders B with its term); the sink (on A) records every token.
    Secure when argv[9] names a PKI folder: the scheduler, the provider's llumlets (certificates issued for their
    node), the recording frontend and the driver's admin and frontend calls all use mutual TLS."""
    import grpc

    from integration.test_migration_processes import unmigrated_tokens
    from pyllumnix.infra.grpc_server import start_server
    from pyllumnix.protos.llumnix.v1 import (
        admin_pb2,
        admin_pb2_grpc,
        common_pb2,
        frontend_pb2_grpc,
        llumlet_pb2,
        llumlet_pb2_grpc,
    )
    from pyllumnix.tools.recording_sink import RecordingSink

    transport = sys.argv[8]
    tls_dir = sys.argv[9] if len(sys.argv) > 9 else ""
    out: dict[str, Any] = {"transport": transport}
    phase = Phases(out)
    endpoint = f"{host_a}:{port}"
    flags = ["--insecure"]
    provider_security = frontend = admin = INSECURE
    if tls_dir:
        TLS_DIR["dir"] = tls_dir
        flags = ["--tls-dir", tls_dir, "--replica-id", "s0"]
        provider_security = from_options("scheduler", "s1", tls_dir=tls_dir, hosts=[host_a])
        frontend = from_options("frontend", "f0", tls_dir=tls_dir, hosts=[host_a])
        admin = from_options("admin", "admin", tls_dir=tls_dir)
    out["secure"] = frontend.secure
    scheduler = subprocess.Popen(
        [
            sys.executable, "-m", "pyllumnix.tools.cli", "scheduler", "--etcd", etcd, "--cluster", cluster,
            "--host", host_a, "--advertise-host", host_a, "--port", str(port), *flags,
        ],
        start_new_session=True,
    )  # fmt: skip
    args = ["--etcd", etcd, "--cluster", cluster, "--profile", "tiny", "--transport", transport, "--verify-kv"]
    provider = RayInstanceProvider(ray_address, args, cluster=cluster, cpus=1, security=provider_security)
    sink = RecordingSink()
    sink.server = await start_server(
        [(frontend_pb2_grpc.add_OutputSinkServiceServicer_to_server, sink, "llumnix.v1.OutputSinkService")],
        host=host_a,
        security=frontend,
    )
    admin_api = Admin(endpoint, tls_dir)
    try:
        await provider.connect()
        phase("ray connected")
        await wait_nodes(provider, 2, 60)
        ids = await provider.start_instances(2)
        phase("placed")
        nodes = {provider.node_of(i): i for i in ids}
        assert set(nodes) == {host_a, host_b}, nodes

        async def both() -> bool:
            return len(await admin_api.instances()) == 2

        await wait_for("2 instances", both, 60, every=0.1)
        listed = await admin_api.instances()
        phase("listed")
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
        async with open_channel(src["grpc_address"], peer=None, settings=frontend) as ch:
            stub = llumlet_pb2_grpc.LlumletServiceStub(ch)
            await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=request), timeout=10)
        deadline = time.monotonic() + 30
        while len(sink.tokens(rid)) < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        out["tokens_at_migrate"] = len(sink.tokens(rid))
        phase("streaming")
        order = admin_pb2.MigrateRequestRequest(request_id=rid, destination_instance_id=dst["instance_id"])
        async with open_channel(endpoint, peer=None, settings=admin) as ch:
            while True:  # NOT_FOUND until B's first load report listing the request reaches the leader
                try:
                    reply = await admin_pb2_grpc.AdminServiceStub(ch).MigrateRequest(order, timeout=60)
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.02)
        result = reply.result
        out["outcome"] = llumlet_pb2.MigrationOutcome.Name(result.outcome)
        out["reason"] = result.reason
        out["bytes_sent"] = result.bytes_sent
        out["downtime_ms"] = result.downtime_ms
        phase("migrated")
        await sink.wait(rid, timeout=60)
        phase("finished")
        out["tokens_identical"] = sink.tokens(rid) == unmigrated_tokens(prompt, 250, 7)
        out["indices"] = sink.raw_indices(rid) == list(range(250))
        out["instances"] = sorted({o.instance_id for o in sink.outputs[rid]})
        out["src_id"], out["dst_id"] = src["instance_id"], dst["instance_id"]
    finally:
        await admin_api.close()
        await sink.server.stop()
        provider.stop_on_close = True
        await provider.close()
        stop_group(scheduler, 10)
    return out


if __name__ == "__main__":
    ray_address, etcd, host_a, host_b, cluster, port = sys.argv[1:7]
    # place [PKI folder] | host_loss <B's netns> <B's veth> [PKI folder] | migrate <transport> [PKI folder]
    scenario = {"place": main, "host_loss": host_loss, "migrate": migrate}[(sys.argv[7:8] or ["place"])[0]]
    result = asyncio.run(scenario(ray_address, etcd, host_a, host_b, cluster, int(port)))
    print("RESULT " + json.dumps(result), flush=True)
