"""``llumnix llumlet``: one engine instance with its gRPC service, data-plane endpoint and etcd registration.

Prints one JSON line ``{"event": "ready", ...}`` on stdout once it serves (addresses included), so supervisors and
tests can wait for it. SIGTERM/SIGINT deregisters (revokes the lease) and stops cleanly; losing the lease (etcd says
this instance is dead, and the scheduler has failed its requests) stops it with exit code 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

import click

from pyllumnix.control_plane.grpc_server import start_server
from pyllumnix.data_plane.engine.base import Engine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator, MigrationSettings
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer
from pyllumnix.data_plane.transport.factory import make_transport
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2_grpc

log = logging.getLogger(__name__)

EXIT_LEASE_LOST = 3


@dataclass
class LlumletOptions:
    instance_id: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    engine: str = "sim"
    profile: str = "llama-7b-a10"
    payload: bool = True
    bytes_per_token: int | None = None
    total_blocks: int | None = None
    block_size: int | None = None
    model: str = ""
    etcd: list[str] = field(default_factory=list)
    cluster: str = "default"
    transport: str = "auto"
    lease_ttl: int = 2
    load_interval_ms: int = 50
    migration: MigrationSettings = field(default_factory=MigrationSettings)


def make_engine(opts: LlumletOptions) -> Engine:
    if opts.engine == "sim":
        from pyllumnix.data_plane.engine.profile import get_profile
        from pyllumnix.data_plane.engine.sim import SimEngine

        profile = get_profile(opts.profile)
        if opts.bytes_per_token:
            profile = dataclasses.replace(profile, bytes_per_token=opts.bytes_per_token)
        return SimEngine(profile, payload=opts.payload, total_blocks=opts.total_blocks, block_size=opts.block_size)
    raise click.BadParameter(f"unknown engine {opts.engine!r} (available: sim)", param_hint="--engine")


async def run_llumlet(opts: LlumletOptions, stop: asyncio.Event | None = None) -> int:
    """Serves until ``stop`` is set (or SIGTERM/SIGINT); returns the process exit code."""
    stop = stop or asyncio.Event()
    instance_id = opts.instance_id or f"llumlet-{uuid.uuid4().hex[:8]}"
    engine = make_engine(opts)
    llumlet = Llumlet(engine, instance_id)
    transport = make_transport(opts.transport)
    data_plane_address = await transport.start()
    coordinator = MigrationCoordinator(llumlet, transport, opts.migration)
    servicer = LlumletServicer(llumlet, coordinator, opts.load_interval_ms)
    server = await start_server(
        [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, SERVICE_NAME)], opts.host, opts.port
    )
    advertise = opts.advertise_host or (opts.host if opts.host not in ("0.0.0.0", "::") else socket.gethostname())
    grpc_address = f"{advertise}:{server.port}"
    llumlet.start()
    coordinator.start()
    info = common_pb2.InstanceInfo(
        instance_id=instance_id,
        grpc_address=grpc_address,
        data_plane_address=data_plane_address,
        transport=type(transport).__name__.removesuffix("Transport").lower(),
        engine=opts.engine,
        model=opts.model or opts.profile,
        total_blocks=engine.total_blocks,
        block_size=engine.block_size,
        max_model_len=engine.max_model_len,
        hostname=socket.gethostname(),
        started_at=time.time(),
        block_bytes=engine.block_bytes,
    )
    registration = None
    reporter = None
    background: list[asyncio.Task[None]] = []
    exit_code = 0
    if opts.etcd:
        from pyllumnix.control_plane.etcd.client import EtcdClient
        from pyllumnix.control_plane.etcd.keys import KeyLayout
        from pyllumnix.control_plane.etcd.lease import Lease
        from pyllumnix.control_plane.etcd.registry import InstanceRegistry
        from pyllumnix.data_plane.llumlet.reporter import LoadReporter

        client = EtcdClient(opts.etcd)
        layout = KeyLayout(opts.cluster)
        lease = await Lease.grant(client, opts.lease_ttl)
        registry = InstanceRegistry(client, layout)
        await registry.register(instance_id, info.SerializeToString(), lease)
        registration = (client, lease)
        reporter = LoadReporter(llumlet, client, layout, opts.load_interval_ms / 1000)
        reporter.start()

        async def watch_lease() -> None:
            nonlocal exit_code
            await lease.lost.wait()
            if stop.is_set():  # our own revoke at shutdown
                return
            log.error("lease lost (%s): this instance is considered dead; stopping", lease.lost_reason)
            exit_code = EXIT_LEASE_LOST
            stop.set()

        background.append(asyncio.get_running_loop().create_task(watch_lease()))
    loop = asyncio.get_running_loop()

    async def exit_when_drained() -> None:
        """A draining instance that holds nothing leaves: its requests went elsewhere, new ones cannot come."""
        empty_since: float | None = None
        while not stop.is_set():
            await asyncio.sleep(0.2)
            drained = (
                llumlet.state == common_pb2.INSTANCE_STATE_DRAINING
                and not engine.request_ids()
                and not coordinator.busy
            )
            empty_since = (empty_since or time.monotonic()) if drained else None
            if empty_since is not None and time.monotonic() - empty_since > 0.5:
                log.info("instance %s drained; stopping", instance_id)
                stop.set()

    background.append(loop.create_task(exit_when_drained()))
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ready = {
        "event": "ready",
        "instance_id": instance_id,
        "grpc_address": grpc_address,
        "data_plane_address": data_plane_address,
        "transport": info.transport,
    }
    print(json.dumps(ready), flush=True)
    await stop.wait()
    for task in background:
        task.cancel()
    log.info("llumlet %s stopping", instance_id)
    if reporter is not None:
        await reporter.stop()
    if registration is not None:
        client, lease = registration
        await lease.revoke(best_effort=True)
        await client.close()
    await server.stop(1.0)
    await coordinator.close()
    await llumlet.stop()
    await transport.close()
    return exit_code


@click.command("llumlet")
@click.option("--instance-id", default="", help="Unique id (default: llumlet-<random>).")
@click.option("--host", default="127.0.0.1", show_default=True, help="gRPC bind host.")
@click.option("--port", default=0, show_default=True, help="gRPC port (0: any free port).")
@click.option("--advertise-host", default="", help="Host others use to reach this llumlet (default: --host).")
@click.option("--engine", type=click.Choice(["sim"]), default="sim", show_default=True)
@click.option("--profile", default="llama-7b-a10", show_default=True, help="Latency/capacity profile (sim engine).")
@click.option("--payload/--no-payload", default=True, show_default=True, help="Real KV bytes in every block.")
@click.option("--bytes-per-token", type=int, default=None, help="Override the profile's KV bytes per token.")
@click.option("--total-blocks", type=int, default=None, help="Override the profile's KV block count.")
@click.option("--block-size", type=int, default=None, help="Override the profile's tokens per block.")
@click.option("--etcd", default="", help="Comma-separated etcd endpoints; empty runs unregistered.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name (etcd key prefix).")
@click.option("--transport", type=click.Choice(["auto", "ucx", "tcp", "inproc"]), default="auto", show_default=True)
@click.option("--lease-ttl", default=2, show_default=True, help="Registry lease TTL, seconds.")
@click.option("--load-interval-ms", default=50, show_default=True, help="Load report period.")
@click.option("--last-stage-max-blocks", default=4, show_default=True)
@click.option("--max-stages", default=3, show_default=True)
@click.option(
    "--pending-timeout", default=10.0, show_default=True, help="Seconds before a silent source's reservation is freed."
)
@click.option("--transfer-timeout", default=10.0, show_default=True, help="Seconds a stage may take.")
@click.option("--log-level", default="INFO", show_default=True)
def llumlet_command(
    instance_id: str,
    host: str,
    port: int,
    advertise_host: str,
    engine: str,
    profile: str,
    payload: bool,
    bytes_per_token: int | None,
    total_blocks: int | None,
    block_size: int | None,
    etcd: str,
    cluster: str,
    transport: str,
    lease_ttl: int,
    load_interval_ms: int,
    last_stage_max_blocks: int,
    max_stages: int,
    pending_timeout: float,
    transfer_timeout: float,
    log_level: str,
) -> None:
    """Run one engine instance (a llumlet)."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    opts = LlumletOptions(
        instance_id=instance_id,
        host=host,
        port=port,
        advertise_host=advertise_host,
        engine=engine,
        profile=profile,
        payload=payload,
        bytes_per_token=bytes_per_token,
        total_blocks=total_blocks,
        block_size=block_size,
        etcd=[e for e in etcd.split(",") if e],
        cluster=cluster,
        transport=transport,
        lease_ttl=lease_ttl,
        load_interval_ms=load_interval_ms,
        migration=MigrationSettings(
            limits=MigrationLimits(last_stage_max_blocks, max_stages),
            pending_timeout_s=pending_timeout,
            transfer_timeout_s=transfer_timeout,
        ),
    )
    sys.exit(asyncio.run(run_llumlet(opts)))
