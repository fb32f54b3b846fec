"""``llumnix llumlet``: one engine instance with its gRPC service, data-plane endpoint and etcd registration.

Prints one JSON line ``{"event": "ready", ...}`` on stdout once it serves (addresses included), so supervisors and
tests can wait for it. SIGTERM/SIGINT deregisters (revokes the lease) and stops cleanly: requests still here end with
an ERROR output to their frontends.

Losing the registry lease (etcd unreachable, or this process stalled, for longer than ``--lease-ttl``) no longer stops
the llumlet (it used to exit with code 3, and nothing restarted it): it keeps serving its requests and registers again
under a new lease with the same instance id and InstanceInfo, retrying etcd with backoff until that succeeds (see
``registration``). The default TTL of 6 s, renewed every TTL/3, rides out a stall of up to ~3.5 s without losing
the lease at all; a dead llumlet leaves the registry 6 s after its last renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from pyllumnix.data_plane.engine.base import Engine
from pyllumnix.data_plane.llumlet.llumlet import HEARTBEAT_S, Llumlet
from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics
from pyllumnix.data_plane.llumlet.migration.coordinator import MigrationCoordinator, MigrationSettings
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.data_plane.llumlet.output_push import OutputPusher, PushSettings
from pyllumnix.data_plane.llumlet.service import SERVICE_NAME, LlumletServicer, election_leader, registry_resolver
from pyllumnix.data_plane.transport.factory import make_transport, ucx_available
from pyllumnix.data_plane.transport.fusion import DEFAULT_STALL_TIMEOUT_S
from pyllumnix.infra import tracing
from pyllumnix.infra.cli_types import FiniteFloatRange
from pyllumnix.infra.etcd.errors import EtcdError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.framed_calls import CallServer, listen_calls
from pyllumnix.infra.grpc_server import WILDCARD_HOSTS, advertised_address, advertised_host, start_server
from pyllumnix.infra.metrics_http import start_metrics_server
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.runtime import security_options
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context
from pyllumnix.infra.vocabulary import InstanceState
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2_grpc

if TYPE_CHECKING:
    from pyllumnix.data_plane.llumlet.reporter import LoadReporter

log = logging.getLogger(__name__)


@dataclass
class LlumletOptions:
    instance_id: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    call_port: int = 0  # the framed AddRequest listener (0: any free port; -1: none)
    advertise_host: str = ""
    engine: str = "sim"
    profile: str = "llama-7b-a10"
    payload: bool = True
    bytes_per_token: int | None = None
    total_blocks: int | None = None
    block_size: int | None = None
    # Sim engine: KV payload memory to allocate and touch at start (page faults then, not mid-step or mid-migration).
    prewarm_kv_mib: int = 0
    # Sim engine: check every migrated-in request's KV bytes before installing it (tests).
    verify_kv: bool = False
    model: str = ""
    # vLLM engine (--engine vllm): settings passed to vLLM V1 (see pyllumnix.data_plane.engine.vllm.engine).
    vllm_dtype: str = "float32"
    vllm_max_model_len: int = 512
    vllm_kv_cache_bytes: int | None = 64 << 20
    vllm_gpu_memory_utilization: float | None = None
    vllm_max_num_seqs: int | None = None
    vllm_enforce_eager: bool = True
    vllm_seed: int = 0
    etcd: list[str] = field(default_factory=list)
    cluster: str = "default"
    transport: str = "auto"
    lease_ttl: int = 6
    load_interval_ms: int = 50
    # Seconds one batch of outputs may keep failing to reach its frontend before that frontend's requests are aborted.
    push_budget_s: float = 30.0
    # Seconds an output sender (a channel and a task per frontend address) may stay idle before it closes.
    sink_idle_s: float = 60.0
    # Engine steps whose decode-only outputs share one push message (first tokens and finishes are never held).
    stream_interval: int = PushSettings.stream_interval
    # AddRequest answers RESOURCE_EXHAUSTED while this many requests wait here (0: no limit).
    max_waiting: int = 256
    # Seconds of silence after which a held request gets a "still here" output (0: never), so a request queued here
    # longer than its frontend's idle timeout is not ended by it.
    heartbeat_s: float = HEARTBEAT_S
    # /metrics (vLLM-named per-instance metrics) on --host: 0 any free port, -1 off.
    metrics_port: int = 0
    migration: MigrationSettings = field(default_factory=MigrationSettings)


async def exit_when_drained(llumlet: Llumlet, coordinator: MigrationCoordinator, stop: asyncio.Event) -> None:
    """A draining instance that holds nothing leaves (sets ``stop``): its requests went elsewhere, new ones cannot
    come. Only a draining instance is polled (5 times a second); any other sleeps until its state changes, so an idle
    llumlet pays nothing for this."""
    empty_since: float | None = None
    while not stop.is_set():
        if llumlet.state is not InstanceState.DRAINING:
            empty_since = None
            llumlet.state_changed.clear()
            await llumlet.state_changed.wait()
            continue
        await asyncio.sleep(0.2)
        drained = llumlet.state is InstanceState.DRAINING and not llumlet.engine.request_ids() and not coordinator.busy
        empty_since = (empty_since or time.monotonic()) if drained else None
        if empty_since is not None and time.monotonic() - empty_since > 0.5:
            log.info("instance %s drained; stopping", llumlet.instance_id)
            stop.set()


def streams_opened(pusher: OutputPusher, reporter: LoadReporter | None) -> dict[tuple[str, str], int]:
    """(stream, transport) -> streams opened, for ``llumnix_llumlet_streams_opened``."""
    opened = {("outputs", "framed"): pusher.framed_streams, ("outputs", "grpc"): pusher.grpc_streams}
    if reporter is not None:
        opened |= {("load", "framed"): reporter.framed_streams, ("load", "grpc"): reporter.grpc_streams}
    return opened


def make_engine(opts: LlumletOptions) -> Engine:
    if opts.engine == "sim":
        from pyllumnix.data_plane.engine.profile import get_profile
        from pyllumnix.data_plane.engine.sim import SimEngine

        try:
            profile = get_profile(opts.profile)
            if opts.bytes_per_token:
                profile = dataclasses.replace(profile, bytes_per_token=opts.bytes_per_token)
            prewarm_bytes = opts.prewarm_kv_mib << 20
            return SimEngine(
                profile,
                payload=opts.payload,
                total_blocks=opts.total_blocks,
                block_size=opts.block_size,
                payload_spare_bytes=max(1 << 30, prewarm_bytes),
                prewarm_blocks=prewarm_bytes // profile.block_bytes if opts.payload else 0,
                verify_incoming=opts.verify_kv,
            )
        except (KeyError, ValueError) as exc:
            # An unknown profile or an impossible capacity (e.g. --total-blocks too small for the profile's
            # max_model_len) is a usage error: a one-line message and exit 2, not a traceback.
            raise click.UsageError(f"sim engine: {exc.args[0] if exc.args else exc}") from exc
    if opts.engine == "vllm":
        if not opts.model:
            raise click.BadParameter("--engine vllm needs --model PATH", param_hint="--model")
        from pyllumnix.data_plane.engine.vllm.adapter import VllmUnavailableError
        from pyllumnix.data_plane.engine.vllm.engine import VllmEngine, VllmEngineConfig

        try:
            return VllmEngine(
                VllmEngineConfig(
                    model=opts.model,
                    dtype=opts.vllm_dtype,
                    max_model_len=opts.vllm_max_model_len,
                    block_size=opts.block_size or 32,
                    kv_cache_memory_bytes=opts.vllm_kv_cache_bytes or None,
                    gpu_memory_utilization=opts.vllm_gpu_memory_utilization,
                    max_num_seqs=opts.vllm_max_num_seqs,
                    enforce_eager=opts.vllm_enforce_eager,
                    seed=opts.vllm_seed,
                )
            )
        except VllmUnavailableError as exc:
            raise click.UsageError(str(exc)) from exc
    raise click.BadParameter(f"unknown engine {opts.engine!r} (available: sim, vllm)", param_hint="--engine")


def transport_options(kind: str, host: str = "127.0.0.1", advertise_host: str = "") -> tuple[str, dict[str, Any]]:
    """(transport kind, its options): the TCP data plane binds the llumlet's ``--host`` and advertises its
    ``--advertise-host``; under secure settings it is mutual TLS with the llumlet's certificate (peers must be
    llumlets of the cluster). UCX has no TLS: its KV bytes go unencrypted (said once), so ``auto`` picks UCX only on
    an insecure cluster (``--transport ucx`` asks for it on a secure one); TCP keeps them inside TLS. UCX uses only
    the interface of ``--host`` (of ``--advertise-host`` when ``--host`` is a wildcard), so the worker address peers on
    other hosts get names no interface they cannot reach."""
    settings = runtime.current()
    # UCX binds the interface of ``--host`` (of ``--advertise-host`` behind a wildcard), found by its IPv4 address.
    local, option = (host, "--host") if host not in WILDCARD_HOSTS else (advertise_host, "--advertise-host")
    ipv4: str | None = None
    if kind == "auto":
        # Secure by default: UCX has no TLS, so on a secure cluster ``auto`` is TCP inside mutual TLS; UCX (NVLink,
        # InfiniBand) only when asked for by name, where the network between the hosts is trusted.
        kind = "ucx" if ucx_available() and settings.paths is None else "tcp"
        if kind == "ucx" and local and (ipv4 := _ipv4_of(local, option)) is None:
            log.info(
                "--transport auto: tcp, not ucx: UCX binds the interface of an IPv4 address only, %s %s has none",
                option,
                local,
            )
            kind = "tcp"
    if kind == "ucx":
        ipv4 = ipv4 or (_ipv4_of(local, option) if local else None)
        if local and ipv4 is None:
            raise click.UsageError(
                f"--transport ucx binds the interface of an IPv4 address only, and {option} {local} has none: "
                f"use --transport tcp for an IPv6 {option}"
            )
        if settings.paths is not None:
            log.warning("the ucx data plane is not encrypted (KV bytes in the clear); --transport tcp uses TLS")
        return kind, {"host": ipv4} if ipv4 else {}
    if kind != "tcp":
        return kind, {}
    options: dict[str, Any] = {"host": host, "advertise_host": advertise_host or None}
    if settings.paths is not None:
        options.update(
            ssl_server=server_ssl_context(settings.paths),
            ssl_client=client_ssl_context(settings.paths),
            cluster=settings.cluster,
        )
    return kind, options


def _ipv4_of(host: str, option: str) -> str | None:
    """The IPv4 address of ``host`` (the UCX transport finds its network interface by IPv4 address, ``interface_of``),
    or None for an IPv6 literal (bracketed or not) or a name with IPv6 addresses only. ``socket.gethostbyname`` on
    ``::1`` raised a bare ``gaierror``; a name that does not resolve at all is a usage error naming ``option``."""
    bare = host.strip("[]")
    with contextlib.suppress(ValueError):  # not an address literal: a name, resolved below
        if ipaddress.ip_address(bare).version == 6:
            return None
    try:
        infos = socket.getaddrinfo(bare, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise click.UsageError(f"{option} {host}: cannot resolve it ({exc})") from exc
    return next((str(info[4][0]) for info in infos if info[0] == socket.AF_INET), None)


async def run_llumlet(opts: LlumletOptions, stop: asyncio.Event | None = None) -> int:
    """Serves until ``stop`` is set (or SIGTERM/SIGINT); returns the process exit code."""
    stop = stop or asyncio.Event()
    instance_id = opts.instance_id or f"llumlet-{uuid.uuid4().hex[:8]}"
    tracing.configure(f"llumnix-llumlet-{instance_id}")  # before any server or channel (on with an exporter only)
    engine = make_engine(opts)
    llumlet = Llumlet(
        engine,
        instance_id,
        step_in_thread=opts.engine == "vllm",
        push=PushSettings(
            budget_s=opts.push_budget_s, idle_close_s=opts.sink_idle_s, stream_interval=opts.stream_interval
        ),
        max_waiting=opts.max_waiting or None,
        heartbeat_s=opts.heartbeat_s or None,
    )
    kind, transport_opts = transport_options(opts.transport, opts.host, opts.advertise_host)
    if kind == "ucx" and engine.kv_device != "cpu":  # UCX moves the GPU's chunks directly (#17)
        transport_opts["device"] = engine.kv_device
    transport = make_transport(kind, **transport_opts)
    data_plane_address = await transport.start()
    coordinator = MigrationCoordinator(llumlet, transport, opts.migration)
    layout = KeyLayout(opts.cluster)
    client = None
    registry = None
    leaders = None
    if opts.etcd:
        from pyllumnix.infra.etcd.election import Election
        from pyllumnix.infra.etcd.registry import InstanceRegistry

        # The fence and the registry check are in place before the server serves its first order (review9 F2):
        # set after registration, a made-up term sent while etcd was slow was admitted and then outranked the real
        # leader's for good (attack 9 B3 at start), and MigrateOut destinations went unchecked meanwhile.
        client = runtime.etcd_client(opts.etcd)
        # MigrateOut sends only to registered instances at their registered address (#13).
        registry = registry_resolver(InstanceRegistry(client, layout))
        # A new leader term is admitted only once the election in etcd proves it is the caller's (attack 9 B3).
        leaders = election_leader(Election(client, layout.election_prefix()))
    servicer = LlumletServicer(llumlet, coordinator, opts.load_interval_ms, registry=registry, leaders=leaders)
    server: Any  # the gRPC server, or it and the framed call listener (``_Servers``)
    try:
        server = await start_server(
            [(llumlet_pb2_grpc.add_LlumletServiceServicer_to_server, servicer, SERVICE_NAME)], opts.host, opts.port
        )
    except BaseException:
        if client is not None:  # made before the server now (review9 F2): closed here when it cannot serve
            await client.close()
        raise
    if opts.call_port >= 0:
        try:
            server = await _with_call_listener(server, servicer, opts)
        except BaseException:
            await server.stop(0)
            if client is not None:
                await client.close()
            raise
    advertise = advertised_host(opts.host, opts.advertise_host)
    grpc_address = advertised_address(opts.host, opts.advertise_host, server.port)
    metrics_server = None
    reporter = None  # with --etcd, set below (the metrics read its failure count at scrape time)
    if opts.metrics_port >= 0:
        llumlet.metrics = InstanceMetrics(
            instance_id,
            opts.model or opts.profile,
            engine.load,
            lambda: llumlet.stats.migration,
            engine.request_ids,
            vllm_stats=getattr(engine, "vllm_stats", None),  # vLLM's own scheduler statistics (--engine vllm)
            late_adds_refused=lambda: servicer.late_adds_refused,
            report_failures=lambda: reporter.report_failures if reporter is not None else 0,
            streams_opened=lambda: streams_opened(llumlet.pusher, reporter),
        )
        try:
            metrics_server = await start_metrics_server(
                llumlet.metrics.registry, opts.host, opts.metrics_port, advertise
            )
        except BaseException:
            await server.stop(0)
            if client is not None:
                await client.close()
            raise
    coordinator.prewarm()
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
        load_report_interval_ms=opts.load_interval_ms,  # the leader's silence bounds follow the slower of its own
    )
    registration = None
    background: list[asyncio.Task[None]] = []
    if client is not None:
        from pyllumnix.data_plane.llumlet.registration import InstanceRegistration
        from pyllumnix.data_plane.llumlet.reporter import LoadReporter

        registration = InstanceRegistration(client, layout, instance_id, info.SerializeToString(), opts.lease_ttl)
        try:
            await registration.start()
        except EtcdError as exc:
            # One line and a non-zero exit, not a traceback; what started is shut down inside this loop (attack 9 B5:
            # the gRPC server used to be stopped after the loop closed, "Event loop is closed").
            click.echo(f"llumlet: {exc}", err=True)
            await _shut_down(llumlet, coordinator, server, transport, metrics_server, registration, client)
            return 1
        reporter = LoadReporter(llumlet, client, layout, opts.load_interval_ms / 1000)
        reporter.start()
    loop = asyncio.get_running_loop()

    background.append(loop.create_task(exit_when_drained(llumlet, coordinator, stop)))
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
    if metrics_server is not None:
        ready["metrics_address"] = metrics_server.address
    print(json.dumps(ready), flush=True)
    await stop.wait()
    for task in background:
        task.cancel()
    log.info("llumlet %s stopping", instance_id)
    if reporter is not None:
        await reporter.stop()
    await _shut_down(llumlet, coordinator, server, transport, metrics_server, registration, client)
    return 0


class _Servers:
    """The gRPC server and the framed call listener beside it, stopped together (``server.stop``'s shape)."""

    def __init__(self, server: Any, listener: asyncio.Server, calls: CallServer) -> None:
        self.server, self.listener, self.calls = server, listener, calls
        self.port = server.port

    async def stop(self, grace: float | None) -> None:
        self.listener.close()  # no new connection; the calls in flight have gRPC's grace too
        await self.server.stop(grace)
        self.calls.close()


async def _with_call_listener(server: Any, servicer: LlumletServicer, opts: LlumletOptions) -> _Servers:
    """Starts the framed AddRequest listener (``--call-port``), secured as the gRPC port is."""
    settings = runtime.current()
    servicer.framed_cluster = None if settings.paths is None else settings.cluster
    ssl_context = None if settings.paths is None else server_ssl_context(settings.paths)
    listener, port = await listen_calls(servicer.framed_calls, opts.host, opts.call_port, ssl_context)
    servicer.call_address = advertised_address(opts.host, opts.advertise_host, port)
    return _Servers(server, listener, servicer.framed_calls)


async def _shut_down(
    llumlet: Llumlet,
    coordinator: MigrationCoordinator,
    server: Any,
    transport: Any,
    metrics_server: Any,
    registration: Any,
    client: Any,
) -> None:
    """Deregisters (revokes the lease), then stops the server, migrations, engine, data plane and /metrics."""
    if registration is not None:
        await registration.close()
    if client is not None:
        await client.close()
    await server.stop(1.0)
    await coordinator.close()
    await llumlet.stop()
    await transport.close()
    if metrics_server is not None:
        await metrics_server.close()


@click.command("llumlet")
@click.option(
    "--instance-id",
    default="",
    help="Unique id; with a certificate, its id (the default then; without one: llumlet-<random>).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="gRPC bind host.")
@click.option("--port", default=0, show_default=True, help="gRPC port (0: any free port).")
@click.option(
    "--call-port",
    type=click.IntRange(min=-1, max=65535),
    default=0,
    show_default=True,
    help="Port of the framed AddRequest listener on --host, named in AddRequest replies (0: any free port; -1: none,"
    " frontends add requests over gRPC).",
)
@click.option("--advertise-host", default="", help="Host others use to reach this llumlet (default: --host).")
@click.option("--engine", type=click.Choice(["sim", "vllm"]), default="sim", show_default=True)
@click.option("--model", default="", help="Model path or name (vLLM engine).")
@click.option("--dtype", "vllm_dtype", default="float32", show_default=True, help="vLLM: model dtype.")
@click.option("--max-model-len", "vllm_max_model_len", default=512, show_default=True, help="vLLM: max tokens.")
@click.option(
    "--kv-cache-bytes",
    "vllm_kv_cache_bytes",
    type=int,
    default=64 << 20,
    show_default=True,
    help="vLLM: KV cache size in bytes (0: let vLLM size it from --gpu-memory-utilization).",
)
@click.option("--gpu-memory-utilization", "vllm_gpu_memory_utilization", type=float, default=None, help="vLLM (GPU).")
@click.option("--max-num-seqs", "vllm_max_num_seqs", type=int, default=None, help="vLLM: max running requests.")
@click.option("--enforce-eager/--no-enforce-eager", "vllm_enforce_eager", default=True, show_default=True)
@click.option("--seed", "vllm_seed", default=0, show_default=True, help="vLLM: engine seed.")
@click.option("--profile", default="llama-7b-a10", show_default=True, help="Latency/capacity profile (sim engine).")
@click.option("--payload/--no-payload", default=True, show_default=True, help="Real KV bytes in every block.")
@click.option("--bytes-per-token", type=int, default=None, help="Override the profile's KV bytes per token.")
@click.option("--total-blocks", type=int, default=None, help="Override the profile's KV block count.")
@click.option("--block-size", type=int, default=None, help="Override the profile's tokens per block.")
@click.option(
    "--verify-kv/--no-verify-kv",
    default=False,
    show_default=True,
    help="Sim engine: refuse a migrated-in request whose KV bytes differ from the source's (tests).",
)
@click.option(
    "--prewarm-kv-mib",
    type=int,
    default=0,
    show_default=True,
    help="KV payload memory to allocate and touch at start (sim engine).",
)
@click.option("--etcd", default="", help="Comma-separated etcd endpoints; empty runs unregistered.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name (etcd key prefix).")
@click.option(
    "--transport",
    type=click.Choice(["auto", "ucx", "tcp", "inproc"]),
    default="auto",
    show_default=True,
    help="KV data plane. auto: ucx when installed, unless the host to bind is IPv6 (UCX binds IPv4 interfaces only).",
)
@click.option(
    "--lease-ttl",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Registry lease TTL, seconds (renewed every TTL/3): an instance that dies leaves the registry (and its "
    "requests are failed) this long after its last renewal; a lost lease is replaced while the llumlet serves on.",
)
@click.option(
    "--push-budget",
    type=FiniteFloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds outputs may keep failing to reach a frontend (retried with backoff, in order) before its "
    "requests are aborted here.",
)
@click.option(
    "--sink-idle-close",
    type=FiniteFloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds an output channel to a frontend may stay unused before it is closed.",
)
@click.option(
    "--stream-interval",
    type=click.IntRange(min=1),
    default=PushSettings.stream_interval,
    show_default=True,
    help="Engine steps whose tokens share one push message to a frontend (vLLM's --stream-interval): fewer messages "
    "cost less CPU; a token reaches its client up to this many steps minus one later. First tokens, finishes and "
    "errors are never held (TTFT and time per output token unchanged). 1: every step on its own.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="AddRequest is refused (RESOURCE_EXHAUSTED) while this many requests wait here (0: no limit).",
)
@click.option(
    "--load-interval-ms",
    default=50,
    show_default=True,
    type=click.IntRange(10, 1000),
    help="Load report period (the cluster config's load_report_interval_ms range).",
)
@click.option("--last-stage-max-blocks", default=4, show_default=True, type=click.IntRange(1, 4096))
@click.option("--max-stages", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--pending-timeout", default=10.0, show_default=True, help="Seconds before a silent source's reservation is freed."
)
@click.option("--transfer-timeout", default=10.0, show_default=True, help="Seconds a stage may take.")
@click.option(
    "--stall-timeout",
    type=FiniteFloatRange(min=0),
    default=DEFAULT_STALL_TIMEOUT_S,
    show_default=True,
    help="Seconds a stage's transfer may go without a chunk completing before it fails (0: off, only"
    " --transfer-timeout bounds it).",
)
@click.option(
    "--output-heartbeat",
    type=FiniteFloatRange(min=0),
    default=HEARTBEAT_S,
    show_default=True,
    help="Seconds of silence after which a held request gets a token-less 'still here' output, so its frontend's"
    " idle timeout does not end a request queued here (0: never). Keep it below a third of that timeout.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=-1),
    default=0,
    show_default=True,
    help="Port of this instance's Prometheus /metrics (vLLM's metric names) on --host (0: any free port, named in"
    " the ready line; -1: off).",
)
@security_options
@click.option("--log-level", default="INFO", show_default=True)
def llumlet_command(
    instance_id: str,
    host: str,
    port: int,
    call_port: int,
    advertise_host: str,
    engine: str,
    model: str,
    vllm_dtype: str,
    vllm_max_model_len: int,
    vllm_kv_cache_bytes: int,
    vllm_gpu_memory_utilization: float | None,
    vllm_max_num_seqs: int | None,
    vllm_enforce_eager: bool,
    vllm_seed: int,
    profile: str,
    payload: bool,
    bytes_per_token: int | None,
    total_blocks: int | None,
    block_size: int | None,
    verify_kv: bool,
    prewarm_kv_mib: int,
    etcd: str,
    cluster: str,
    transport: str,
    lease_ttl: int,
    push_budget: float,
    sink_idle_close: float,
    stream_interval: int,
    max_waiting: int,
    load_interval_ms: int,
    last_stage_max_blocks: int,
    max_stages: int,
    pending_timeout: float,
    transfer_timeout: float,
    stall_timeout: float,
    output_heartbeat: float,
    metrics_port: int,
    log_level: str,
    **security: Any,
) -> None:
    """Run one engine instance (a llumlet). Secure by default: give its certificates (--tls-dir or --ca/--cert/--key;
    the certificate's id is the instance id) or --insecure."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = instance_id
    instance_id = instance_id or f"llumlet-{uuid.uuid4().hex[:8]}"
    settings = runtime.configure_from_cli("llumlet", instance_id, security, [host, advertise_host])
    instance_id = runtime.component_id(settings, given, instance_id, "--instance-id")
    opts = LlumletOptions(
        instance_id=instance_id,
        host=host,
        port=port,
        call_port=call_port,
        advertise_host=advertise_host,
        engine=engine,
        model=model,
        vllm_dtype=vllm_dtype,
        vllm_max_model_len=vllm_max_model_len,
        vllm_kv_cache_bytes=vllm_kv_cache_bytes or None,
        vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
        vllm_max_num_seqs=vllm_max_num_seqs,
        vllm_enforce_eager=vllm_enforce_eager,
        vllm_seed=vllm_seed,
        profile=profile,
        payload=payload,
        bytes_per_token=bytes_per_token,
        total_blocks=total_blocks,
        block_size=block_size,
        prewarm_kv_mib=prewarm_kv_mib,
        verify_kv=verify_kv,
        etcd=[e for e in etcd.split(",") if e],
        cluster=cluster,
        transport=transport,
        lease_ttl=lease_ttl,
        push_budget_s=push_budget,
        sink_idle_s=sink_idle_close,
        stream_interval=stream_interval,
        max_waiting=max_waiting,
        heartbeat_s=output_heartbeat,
        metrics_port=metrics_port,
        load_interval_ms=load_interval_ms,
        migration=MigrationSettings(
            limits=MigrationLimits(last_stage_max_blocks, max_stages),
            pending_timeout_s=pending_timeout,
            transfer_timeout_s=transfer_timeout,
            stall_timeout_s=stall_timeout or None,
        ),
    )
    sys.exit(asyncio.run(run_llumlet(opts)))
