"""``llumnix scheduler``: one replica of the global scheduler (several run at once; etcd elects the leader).

Prints one JSON line ``{"event": "ready", ...}`` once it serves. SIGTERM/SIGINT resigns leadership (so a standby
takes over at once) and stops; with ``--stop-instances-on-exit`` it also stops the llumlets its provider started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shlex
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from pyllumnix.control_plane.scheduler.metrics import SchedulerMetrics
from pyllumnix.control_plane.scheduler.provider import (
    DEFAULT_LOCAL_MAX_INSTANCES,
    InstanceProvider,
    LocalProcessProvider,
)
from pyllumnix.control_plane.scheduler.replica import ReplicaTiming, SchedulerReplica
from pyllumnix.control_plane.scheduler.service import (
    ADMIN_SERVICE,
    SCHEDULER_SERVICE,
    AdminServicer,
    SchedulerServicer,
)
from pyllumnix.infra import tracing
from pyllumnix.infra.cli_types import FiniteFloatRange
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.framed import listen
from pyllumnix.infra.grpc_server import advertised_address, advertised_host, start_server
from pyllumnix.infra.metrics_http import start_metrics_server
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.runtime import security_options
from pyllumnix.infra.security.tls import server_ssl_context
from pyllumnix.protos.llumnix.v1 import admin_pb2_grpc, scheduler_pb2_grpc


def freeze_startup_heap() -> int:
    """Moves every object alive now (the imported modules: gRPC, protobuf, numpy, the etcd client; the replica) out
    of the garbage collector's reach, once the process has started; returns how many. The leader allocates for every
    load report and dispatch, so the collector runs often, and each pass of its oldest generation walked all of these
    too: ~50 ms with the event loop stopped (Dispatch and reports wait) where, frozen, it takes ~5 ms
    (``llumnix bench dispatch`` reports the collector's passes). Nothing frozen is garbage: it lives as long as the
    process."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def run_scheduler(
    etcd: list[str],
    cluster: str = "default",
    host: str = "127.0.0.1",
    port: int = 0,
    replica_id: str = "",
    provider: InstanceProvider | None = None,
    timing: ReplicaTiming | None = None,
    seed: int = 0,
    stop: asyncio.Event | None = None,
    advertise_host: str = "",
    metrics_port: int = -1,
    report_port: int = 0,
) -> int:
    stop = stop or asyncio.Event()
    replica_id = replica_id or f"scheduler-{uuid.uuid4().hex[:6]}"
    tracing.configure("llumnix-scheduler")  # before any server or channel (on only when an exporter is configured)
    client = runtime.etcd_client(etcd)
    # The replica advertises its address in the election, so bind the server first and start the replica after.
    replica = SchedulerReplica(client, KeyLayout(cluster), replica_id, "", provider=provider, seed=seed, timing=timing)
    servicer = SchedulerServicer(replica)
    server = await start_server(
        [
            (scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, servicer, SCHEDULER_SERVICE),
            (admin_pb2_grpc.add_AdminServiceServicer_to_server, AdminServicer(replica), ADMIN_SERVICE),
        ],
        host,
        port,
    )
    # Others (clients following the leader trailer, followers probing the leader) connect here: never a wildcard.
    advertise = advertised_host(host, advertise_host)
    address = advertised_address(host, advertise_host, server.port)
    replica.grpc_address = address
    framed = None
    if report_port >= 0:  # framed load streams (the election value names it) and framed Dispatch calls
        settings = runtime.current()
        ssl_context = None if settings.paths is None else server_ssl_context(settings.paths)
        servicer.framed_cluster = None if settings.paths is None else settings.cluster
        framed, bound = await listen(servicer.serve_framed, host, report_port, ssl_context)
        replica.report_address = advertised_address(host, advertise_host, bound)
    await replica.start()
    freeze_startup_heap()
    ready = {
        "event": "ready",
        "replica_id": replica_id,
        "grpc_address": address,
        "report_address": replica.report_address,
    }
    metrics_server = None
    if metrics_port >= 0:
        metrics = SchedulerMetrics(replica)
        metrics_server = await start_metrics_server(metrics.registry, host, metrics_port, advertise)
        ready["metrics_address"] = metrics_server.address
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(json.dumps(ready), flush=True)
    await stop.wait()
    try:
        await replica.stop()
        if framed is not None:
            framed.close()
            servicer.close_framed()
        await server.stop(1.0)
        if metrics_server is not None:
            await metrics_server.close()
    finally:
        if provider is not None:
            await provider.close()  # with --stop-instances-on-exit: stops and waits for its llumlets
        await client.close()
    return 0


@click.command("scheduler")
@click.option("--etcd", required=True, help="Comma-separated etcd endpoints.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name (etcd key prefix).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--advertise-host",
    default="",
    help="Host others use to reach this replica (default: --host; the hostname when --host is a wildcard).",
)
@click.option("--port", default=0, show_default=True, help="gRPC port (0: any free port).")
@click.option("--replica-id", default="", help="Unique replica id (default: scheduler-<random>).")
@click.option(
    "--provider",
    type=click.Choice(["none", "local", "ray"]),
    default="none",
    show_default=True,
    help="Instance provider for autoscaling and `llmctl scale` (local: spawn llumlet processes on this host; ray: "
    "place llumlets on a Ray cluster, --ray-address).",
)
@click.option("--ray-address", default="", help="HOST:PORT of the Ray head (GCS) for --provider ray.")
@click.option(
    "--ray-placement",
    type=click.Choice(["spread", "pack"]),
    default="spread",
    show_default=True,
    help="--provider ray: put a new instance on the node holding the fewest (spread) or most (pack) instances.",
)
@click.option("--ray-hosts", default="", help="--provider ray: comma-separated node IPs to place on (default: any).")
@click.option("--ray-cpus", type=FiniteFloatRange(min=0), default=1.0, show_default=True, help="CPUs per instance.")
@click.option("--ray-gpus", type=FiniteFloatRange(min=0), default=0.0, show_default=True, help="GPUs per instance.")
@click.option("--llumlet-args", default="", help="Arguments for llumlets the local provider starts (shell syntax).")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="Logs of provider-started llumlets.")
@click.option(
    "--election-ttl",
    type=click.IntRange(min=1),
    default=ReplicaTiming.election_ttl,
    show_default=True,
    help="Leader lease TTL, seconds. A stall (CPU, etcd) shorter than the TTL minus the renewal period costs no "
    "leadership change; a leader whose host vanishes is replaced after about this long (etcd may round it up to its "
    "minimum TTL).",
)
@click.option(
    "--election-renew-every",
    type=FiniteFloatRange(min=0.1),
    default=ReplicaTiming.election_renew_every,
    show_default=True,
    help="Seconds between renewals of the leader's lease (less than --election-ttl).",
)
@click.option(
    "--leader-probe-interval",
    type=FiniteFloatRange(min=0),
    default=ReplicaTiming.leader_probe_interval,
    show_default=True,
    help="Seconds between a follower's connection probes of the leader's port; two refusals in a row (the leader "
    "process is gone) make it revoke the leader's lease, so a standby leads within about a second. 0: off.",
)
@click.option(
    "--instance-grace",
    type=FiniteFloatRange(min=0),
    default=ReplicaTiming.instance_grace,
    show_default=True,
    help="Seconds an instance whose registry key vanished may take to re-register before its requests are reported "
    "failed (sooner if its port refuses connections: the process is gone).",
)
@click.option(
    "--resign-hold-off",
    type=FiniteFloatRange(min=0),
    default=ReplicaTiming.resign_hold_off,
    show_default=True,
    help="Seconds a replica stays out of the election after `llmctl leader resign`.",
)
@click.option(
    "--max-instances",
    "provider_max_instances",
    type=click.IntRange(min=1),
    default=DEFAULT_LOCAL_MAX_INSTANCES,
    show_default=True,
    help="Hard cap on the llumlets the local provider runs at once; `llmctl scale` beyond it is refused.",
)
@click.option(
    "--stop-instances-on-exit/--keep-instances-on-exit",
    default=False,
    show_default=True,
    help="On exit, stop the llumlets the local provider started (SIGTERM, SIGKILL after --stop-timeout) and wait.",
)
@click.option(
    "--stop-timeout",
    type=FiniteFloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds a provider-started llumlet gets to exit after SIGTERM before SIGKILL.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the policy core's randomness.")
@click.option(
    "--metrics-port",
    type=click.IntRange(min=-1),
    default=0,
    show_default=True,
    help="Port of this replica's Prometheus /metrics (decisions by policy) on --host (0: any free port, named in the"
    " ready line; -1: off).",
)
@click.option(
    "--report-port",
    type=click.IntRange(min=-1, max=65535),
    default=0,
    show_default=True,
    help="Port of the llumlets' framed load-report stream on --host, named in the election (0: any free port; -1: "
    "none, llumlets stream ReportLoad over gRPC).",
)
@security_options
@click.option("--log-level", default="INFO", show_default=True)
def scheduler_command(
    etcd: str,
    cluster: str,
    host: str,
    advertise_host: str,
    port: int,
    replica_id: str,
    provider: str,
    ray_address: str,
    ray_placement: str,
    ray_hosts: str,
    ray_cpus: float,
    ray_gpus: float,
    llumlet_args: str,
    log_dir: Path | None,
    election_ttl: int,
    election_renew_every: float,
    leader_probe_interval: float,
    instance_grace: float,
    resign_hold_off: float,
    provider_max_instances: int,
    stop_instances_on_exit: bool,
    stop_timeout: float,
    seed: int,
    metrics_port: int,
    report_port: int,
    log_level: str,
    **security: Any,
) -> None:
    """Run one scheduler replica. Secure by default: give its certificates (--tls-dir or --ca/--cert/--key; the
    certificate's id is the replica id) or --insecure."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = replica_id
    replica_id = replica_id or f"scheduler-{uuid.uuid4().hex[:6]}"
    settings = runtime.configure_from_cli("scheduler", replica_id, security, [host, advertise_host])
    if settings.identity is not None and settings.identity.id != replica_id:
        # Llumlets admit a leader's orders only from the certificate its election entry names (attack 9 B3).
        if given:
            raise click.UsageError(f"--replica-id {given} is not the certificate's id {settings.identity.id!r}")
        replica_id = settings.identity.id
    endpoints = [e for e in etcd.split(",") if e]
    instance_provider: InstanceProvider | None = None
    args = shlex.split(llumlet_args)
    if "--etcd" not in args:
        args += ["--etcd", ",".join(endpoints), "--cluster", cluster]
    if provider == "ray":
        if not ray_address:
            raise click.UsageError("--provider ray needs --ray-address HOST:PORT (the Ray head)")
        from pyllumnix.control_plane.scheduler.provider_ray import RayInstanceProvider

        instance_provider = RayInstanceProvider(
            ray_address,
            args,
            cluster=cluster,
            cpus=ray_cpus,
            gpus=ray_gpus,
            placement=ray_placement,
            hosts=[h for h in ray_hosts.split(",") if h],
            max_instances=provider_max_instances,
            stop_on_close=stop_instances_on_exit,
            stop_timeout=stop_timeout,
            security=settings,
        )
    if provider == "local":
        instance_provider = LocalProcessProvider(
            args,
            log_dir,
            max_instances=provider_max_instances,
            stop_on_close=stop_instances_on_exit,
            stop_timeout=stop_timeout,
            security=settings,
        )
    timing = ReplicaTiming(
        election_ttl=election_ttl,
        election_renew_every=election_renew_every,
        leader_probe_interval=leader_probe_interval,
        instance_grace=instance_grace,
        resign_hold_off=resign_hold_off,
    )
    sys.exit(
        asyncio.run(
            run_scheduler(
                endpoints,
                cluster,
                host,
                port,
                replica_id,
                instance_provider,
                timing,
                seed,
                advertise_host=advertise_host,
                metrics_port=metrics_port,
                report_port=report_port,
            )
        )
    )
