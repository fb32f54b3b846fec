"""``llumnix scheduler``: one replica of the global scheduler (several run at once; etcd elects the leader).

Prints one JSON line ``{"event": "ready", ...}`` once it serves. SIGTERM/SIGINT resigns leadership (so a standby
takes over at once) and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import signal
import sys
import uuid
from pathlib import Path

import click

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.keys import KeyLayout
from pyllumnix.control_plane.grpc_server import start_server
from pyllumnix.control_plane.scheduler.provider import InstanceProvider, LocalProcessProvider
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.control_plane.scheduler.service import (
    ADMIN_SERVICE,
    SCHEDULER_SERVICE,
    AdminServicer,
    SchedulerServicer,
)
from pyllumnix.protos.llumnix.v1 import admin_pb2_grpc, scheduler_pb2_grpc


async def run_scheduler(
    etcd: list[str],
    cluster: str = "default",
    host: str = "127.0.0.1",
    port: int = 0,
    replica_id: str = "",
    provider: InstanceProvider | None = None,
    election_ttl: int = 1,
    seed: int = 0,
    stop: asyncio.Event | None = None,
) -> int:
    stop = stop or asyncio.Event()
    replica_id = replica_id or f"scheduler-{uuid.uuid4().hex[:6]}"
    client = EtcdClient(etcd)
    # The replica advertises its address in the election, so bind the server first and start the replica after.
    replica = SchedulerReplica(
        client, KeyLayout(cluster), replica_id, "", provider=provider, seed=seed, election_ttl=election_ttl
    )
    server = await start_server(
        [
            (scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, SchedulerServicer(replica), SCHEDULER_SERVICE),
            (admin_pb2_grpc.add_AdminServiceServicer_to_server, AdminServicer(replica), ADMIN_SERVICE),
        ],
        host,
        port,
    )
    address = f"{host}:{server.port}"
    replica.grpc_address = address
    await replica.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready", "replica_id": replica_id, "grpc_address": address}), flush=True)
    await stop.wait()
    await replica.stop()
    await server.stop(1.0)
    if provider is not None:
        await provider.close()
    await client.close()
    return 0


@click.command("scheduler")
@click.option("--etcd", required=True, help="Comma-separated etcd endpoints.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name (etcd key prefix).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True, help="gRPC port (0: any free port).")
@click.option("--replica-id", default="", help="Unique replica id (default: scheduler-<random>).")
@click.option(
    "--provider",
    type=click.Choice(["none", "local"]),
    default="none",
    show_default=True,
    help="Instance provider for autoscaling and `llmctl scale` (local: spawn llumlet processes on this host).",
)
@click.option("--llumlet-args", default="", help="Arguments for llumlets the local provider starts (shell syntax).")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="Logs of provider-started llumlets.")
@click.option(
    "--election-ttl",
    default=1,
    show_default=True,
    help="Leader lease TTL, seconds: a standby takes over within about this long after the leader dies "
    "(etcd may round it up to its minimum TTL).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the policy core's randomness.")
@click.option("--log-level", default="INFO", show_default=True)
def scheduler_command(
    etcd: str,
    cluster: str,
    host: str,
    port: int,
    replica_id: str,
    provider: str,
    llumlet_args: str,
    log_dir: Path | None,
    election_ttl: int,
    seed: int,
    log_level: str,
) -> None:
    """Run one scheduler replica."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    endpoints = [e for e in etcd.split(",") if e]
    instance_provider: InstanceProvider | None = None
    if provider == "local":
        args = shlex.split(llumlet_args)
        if "--etcd" not in args:
            args += ["--etcd", ",".join(endpoints), "--cluster", cluster]
        instance_provider = LocalProcessProvider(args, log_dir)
    sys.exit(
        asyncio.run(run_scheduler(endpoints, cluster, host, port, replica_id, instance_provider, election_ttl, seed))
    )
