"""``llumnix frontend``: the OpenAI HTTP API and gRPC Generate in front of the scheduler and the llumlets.

Dispatch goes to the scheduler leader (``--scheduler``, redirects followed); when no leader answers it falls back to
a bypass choice among the instances in the etcd registry (``--etcd``). With ``--etcd`` the frontend also registers
its output sink (``frontends/<id>/<sink address>``, bound to a lease), so the scheduler leader tells it about every
lost instance even if no load report ever named it (its requests end with the lost-instance error, not the idle
timeout). Prints one JSON line ``{"event": "ready", ...}``
on stdout once both servers listen; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from pyllumnix.clients.channel import TlsConfig
from pyllumnix.control_plane.frontend.channels import ChannelPool
from pyllumnix.control_plane.frontend.cluster_metrics import ClusterMetrics
from pyllumnix.control_plane.frontend.core import Frontend
from pyllumnix.control_plane.frontend.dispatch import Dispatcher, RegistryResolver, RegistrySource
from pyllumnix.control_plane.frontend.http import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, start_http
from pyllumnix.control_plane.frontend.routing import (
    BypassDispatcher,
    EtcdRegistrySource,
    FallbackDispatcher,
    LeaderDispatcher,
    StaticRegistrySource,
)
from pyllumnix.control_plane.frontend.service import start_grpc
from pyllumnix.control_plane.frontend.sink import ElectionLeader
from pyllumnix.control_plane.frontend.tokenizer import HfTokenizer, SimTokenizer, Tokenizer
from pyllumnix.infra import tracing
from pyllumnix.infra.cli_types import FiniteFloatRange
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.grpc_server import advertised_address, is_loopback_host
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.apikeys import ApiKeyStore
from pyllumnix.infra.security.ca import role_name
from pyllumnix.infra.security.runtime import security_options
from pyllumnix.infra.security.tls import server_ssl_context

log = logging.getLogger(__name__)


@dataclass
class FrontendOptions:
    schedulers: list[str] = field(default_factory=list)
    etcd: list[str] = field(default_factory=list)
    cluster: str = "default"
    # This frontend's id (its certificate's; its registry key is under it) and its registry lease's TTL, seconds.
    frontend_id: str = "f0"
    lease_ttl: int = 6
    host: str = "127.0.0.1"
    advertise_host: str = ""
    http_port: int = 8000
    grpc_port: int = 0
    # The llumlets' framed output stream's port (0: any free one; -1: not offered).
    stream_port: int = 0
    model: str = "llama-7b-a10"
    max_model_len: int = 4096
    tokenizer: str = "sim"
    # hf: the tokenizer directory (default: ``model``, the model path as vLLM is given it).
    tokenizer_path: str = ""
    vocab_size: int = 32_000
    dispatch_timeout: float = 0.5
    # Seconds a request may go without output (or a client without reading) before it is ended and aborted; 0: never.
    idle_timeout: float = 30.0
    # Overall deadline of a request, seconds; 0: none.
    request_timeout: float = 0.0
    max_inflight: int = 256
    # Requests one API key may have in flight (None: a quarter of max_inflight; 0: no cap).
    max_requests_per_key: int | None = None
    # 0: derived from the prompt cap (``http.body_cap``).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Seconds a client has to send its request body (HTTP 408 beyond).
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    # 0: derived from max_model_len.
    max_prompt_bytes: int = 0
    max_grpc_message_bytes: int = 4 << 20
    # HTTPS for the OpenAI API with this component's certificate (secure mode only); see :func:`choose_https`.
    https: bool = False
    # Secure mode: API keys (in etcd) on the OpenAI API and the public gRPC port; False only for tests of the rest.
    api_keys: bool = True


def choose_https(https: bool | None, secure: bool, host: str) -> bool:
    """Whether the OpenAI API is served over HTTPS. Users send their API keys with every request, so a secure frontend
    bound where the network reaches it serves HTTPS unless told ``--no-https`` (a TLS proxy in front; then warned);
    on loopback it serves plain HTTP by default (nothing leaves the machine). ``--https`` needs certificates."""
    if https and not secure:
        raise click.UsageError("--https serves the OpenAI API with this frontend's certificate: not with --insecure")
    if https is not None:
        if secure and not https and not is_loopback_host(host):
            log.warning(
                "--no-https on %s: API keys reach the OpenAI API in the clear unless a TLS proxy is in front", host
            )
        return https
    return secure and not is_loopback_host(host)


def make_tokenizer(opts: FrontendOptions) -> Tokenizer:
    if opts.tokenizer == "sim":
        return SimTokenizer(opts.vocab_size)
    if opts.tokenizer == "hf":
        path = opts.tokenizer_path or opts.model
        try:
            return HfTokenizer(path)
        except (OSError, ValueError, ImportError) as exc:
            raise click.BadParameter(
                f"cannot load a tokenizer from {path!r}: {exc}", param_hint="--tokenizer-path"
            ) from exc
    raise click.BadParameter(f"unknown tokenizer {opts.tokenizer!r} (available: sim, hf)", param_hint="--tokenizer")


def calls_made(leader: LeaderDispatcher | None, channels: ChannelPool) -> dict[tuple[str, str], int]:
    """(method, transport) -> calls made, for ``llumnix_frontend_calls_total``."""
    calls = {("AddRequest", "framed"): channels.framed_adds, ("AddRequest", "grpc"): channels.grpc_adds}
    if leader is not None:
        calls[("Dispatch", "framed")] = leader.framed_dispatches
        calls[("Dispatch", "grpc")] = leader.grpc_dispatches
    return calls


async def run_frontend(opts: FrontendOptions, stop: asyncio.Event | None = None) -> int:
    """Serves until ``stop`` is set (or SIGTERM/SIGINT); returns the process exit code."""
    stop = stop or asyncio.Event()
    tracing.configure("llumnix-frontend")  # before any server or channel (on only when an exporter is configured)
    etcd_client = None
    source: RegistrySource = StaticRegistrySource()
    security = runtime.current()
    api_keys: ApiKeyStore | None = None
    if not opts.etcd:
        log.warning(
            "no --etcd: this frontend is not registered, so the scheduler leader tells it about a lost instance only "
            "after a load report named one of its requests (others end by the idle timeout), and it cannot bypass "
            "the leader (registry dispatch) when none answers"
        )
    if opts.etcd:
        from pyllumnix.infra.etcd.registry import InstanceRegistry

        etcd_client = runtime.etcd_client(opts.etcd)
        source = EtcdRegistrySource(InstanceRegistry(etcd_client, KeyLayout(opts.cluster)))
        if security.secure and opts.api_keys:
            api_keys = ApiKeyStore(etcd_client, KeyLayout(opts.cluster))
    bypass = BypassDispatcher(source)
    tls = (
        # The leader's certificate must name the scheduler role, not merely its host (infra.security.ca.role_name).
        TlsConfig.from_files(security.paths.ca, security.paths.cert, security.paths.key, role_name("scheduler"))
        if security.paths is not None
        else None
    )
    # Framed calls carry no trace context: with tracing on, every dispatch and add stays a (traced) gRPC call.
    framed = not tracing.enabled()
    leader = (
        LeaderDispatcher(opts.schedulers, tls=tls, timeout=opts.dispatch_timeout, framed=framed)
        if opts.schedulers
        else None
    )
    dispatcher: Dispatcher = bypass
    if leader is not None:
        dispatcher = FallbackDispatcher(leader, bypass, leader_timeout=opts.dispatch_timeout)
    frontend = Frontend(
        model=opts.model,
        max_model_len=opts.max_model_len,
        tokenizer=make_tokenizer(opts),
        dispatcher=dispatcher,
        resolver=RegistryResolver(source),
        channels=ChannelPool(framed=framed),
        idle_timeout=opts.idle_timeout or None,
        request_timeout=opts.request_timeout or None,
        max_inflight=opts.max_inflight,
        max_requests_per_key=opts.max_requests_per_key,
        max_prompt_bytes=opts.max_prompt_bytes,
    )
    if etcd_client is not None:
        frontend.scheduler_leader = ElectionLeader(etcd_client, KeyLayout(opts.cluster))
    frontend.metrics.count_calls(lambda: calls_made(leader, frontend.channels))
    grpc_server = await start_grpc(
        frontend,
        opts.host,
        opts.grpc_port,
        opts.advertise_host,
        max_message_bytes=opts.max_grpc_message_bytes,
        api_keys=api_keys,
        stream_port=None if opts.stream_port < 0 else opts.stream_port,
    )
    registration = None
    if etcd_client is not None:
        from pyllumnix.infra.etcd.registration import LeasedRegistration

        registration = LeasedRegistration(
            etcd_client,
            KeyLayout(opts.cluster).frontend_key(opts.frontend_id, frontend.sink_address),
            frontend.sink_address.encode(),
            opts.lease_ttl,
            name=f"frontend {opts.frontend_id} ({frontend.sink_address})",
        )
        registration.start_soon()  # serving does not wait for etcd; lost-instance notices do
    ssl_context = None
    if opts.https and security.paths is not None:
        ssl_context = server_ssl_context(security.paths, require_client_cert=False)
    http_server = await start_http(
        frontend,
        opts.host,
        opts.http_port,
        max_body_bytes=opts.max_body_bytes,
        api_keys=api_keys,
        ssl_context=ssl_context,
        body_timeout=opts.body_timeout,
    )
    cluster_metrics = None
    if leader is not None:
        cluster_metrics = ClusterMetrics(leader.pool)
        frontend.metrics.add_collector(cluster_metrics)
        cluster_metrics.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ready = {
        "event": "ready",
        "model": opts.model,
        "http_port": http_server.port,
        "http_url": http_server.url,
        "grpc_address": advertised_address(opts.host, opts.advertise_host, grpc_server.port),
        "sink_address": frontend.sink_address,
        # the llumlets' framed output stream (empty: --stream-port -1)
        "stream_address": grpc_server.sink_servicer.stream_address if grpc_server.sink_servicer else "",
        "secure": security.secure,
        "api_keys": api_keys is not None,
        "schedulers": opts.schedulers,
    }
    print(json.dumps(ready), flush=True)
    await stop.wait()
    log.info("stopping frontend")
    if cluster_metrics is not None:
        await cluster_metrics.stop()
    await http_server.stop()
    await grpc_server.stop()
    await frontend.close()
    if leader is not None:
        await leader.close()
    if registration is not None:
        await registration.close()
    if etcd_client is not None:
        await etcd_client.close()
    return 0


SECONDS = FiniteFloatRange(min=0)
POSITIVE_SECONDS = FiniteFloatRange(min=0, min_open=True)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("frontend")
@click.option("--scheduler", default="", help="Comma-separated scheduler replica addresses (host:port).")
@click.option("--etcd", default="", help="Comma-separated etcd endpoints, for bypass dispatch when no leader answers.")
@click.option("--cluster", default="default", show_default=True, help="Cluster name (etcd key prefix).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind host of both servers.")
@click.option("--advertise-host", default="", help="Host llumlets use to push outputs here (default: --host).")
@click.option("--http-port", default=8000, show_default=True, help="OpenAI HTTP API port (0: any free port).")
@click.option("--grpc-port", default=0, show_default=True, help="gRPC port: Generate and the output sink.")
@click.option(
    "--stream-port",
    default=0,
    show_default=True,
    type=click.IntRange(min=-1, max=65535),
    help="Port of the llumlets' framed output stream, beside the sink (0: any free port; -1: none, llumlets push "
    "over gRPC's StreamOutputs).",
)
@click.option("--model", default="llama-7b-a10", show_default=True, help="The served model's name.")
@click.option("--max-model-len", default=4096, show_default=True, help="Prompt + output token limit.")
@click.option(
    "--tokenizer",
    type=click.Choice(["sim", "hf"]),
    default="sim",
    show_default=True,
    help="sim: the sim engine's; hf: a Hugging Face tokenizer directory (real models).",
)
@click.option("--tokenizer-path", default="", help="hf: the tokenizer directory (default: --model, a model path).")
@click.option("--vocab-size", default=32_000, show_default=True, help="Vocabulary of the sim tokenizer.")
@click.option(
    "--dispatch-timeout",
    default=0.5,
    show_default=True,
    type=POSITIVE_SECONDS,
    help="Deadline of one Dispatch call, seconds.",
)
@click.option(
    "--idle-timeout",
    default=30.0,
    show_default=True,
    type=SECONDS,
    help="End (and abort) a request that gets no output, or whose client reads nothing, for this long; 0: never.",
)
@click.option(
    "--request-timeout",
    default=0.0,
    show_default=True,
    type=SECONDS,
    help="Overall deadline per request, s; 0: none.",
)
@click.option(
    "--body-timeout",
    default=DEFAULT_BODY_TIMEOUT_S,
    show_default=True,
    type=POSITIVE_SECONDS,
    help="Seconds a client has to send its HTTP request body (408 and the connection closed beyond).",
)
@click.option(
    "--max-inflight",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests served at once; beyond it HTTP 429 / RESOURCE_EXHAUSTED with Retry-After.",
)
@click.option(
    "--max-requests-per-key",
    default=None,
    type=click.IntRange(min=0),
    help="Requests one user API key may have in flight; beyond it HTTP 429 / RESOURCE_EXHAUSTED, so one client "
    "cannot starve the others (admin keys, the operator's benchmarks and drills, are exempt). Default: a quarter of "
    "--max-inflight; 0: no cap.",
)
@click.option(
    "--max-body-bytes",
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    type=click.IntRange(min=0),
    help="HTTP body cap (413); 0: 4x the prompt cap, at least 1 MiB.",
)
@click.option(
    "--max-prompt-bytes",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Prompt text cap, checked before tokenising (413); 0: 32 bytes per --max-model-len token, at least 64 KiB.",
)
@click.option(
    "--max-grpc-message-bytes",
    default=4 << 20,
    show_default=True,
    type=click.IntRange(min=1024),
    help="gRPC message cap.",
)
@click.option(
    "--frontend-id",
    default="",
    help="This frontend's id; with a certificate, its id (the default then; with --tls-dir or --insecure: f0).",
)
@click.option(
    "--lease-ttl",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="TTL of this frontend's etcd registry lease, s (with --etcd; renewed every TTL/3).",
)
@click.option(
    "--https/--no-https",
    default=None,
    help="Serve the OpenAI API over HTTPS with this frontend's certificate. Default: HTTPS when secure and --host is "
    "not loopback (API keys must not cross a network in the clear), plain HTTP on loopback.",
)
@security_options
@click.option("--log-level", default="INFO", show_default=True)
def frontend_command(
    scheduler: str,
    etcd: str,
    cluster: str,
    host: str,
    advertise_host: str,
    http_port: int,
    grpc_port: int,
    stream_port: int,
    model: str,
    max_model_len: int,
    tokenizer: str,
    tokenizer_path: str,
    vocab_size: int,
    dispatch_timeout: float,
    idle_timeout: float,
    request_timeout: float,
    body_timeout: float,
    max_inflight: int,
    max_requests_per_key: int | None,
    max_body_bytes: int,
    max_prompt_bytes: int,
    max_grpc_message_bytes: int,
    frontend_id: str,
    lease_ttl: int,
    https: bool | None,
    log_level: str,
    **security: Any,
) -> None:
    """Run a frontend (OpenAI HTTP + gRPC Generate). Secure by default: give its certificates (--tls-dir or
    --ca/--cert/--key) or --insecure; with certificates, callers need an API key (kept in etcd: give --etcd)."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if 0 < max_body_bytes < 1024:
        raise click.BadParameter(f"{max_body_bytes} is below 1024 (0: derived)", param_hint="--max-body-bytes")
    if not scheduler and not etcd:
        raise click.UsageError("give --scheduler and/or --etcd: there is nothing to dispatch to otherwise")
    given = frontend_id
    frontend_id = frontend_id or "f0"
    settings = runtime.configure_from_cli("frontend", frontend_id, security, [host, advertise_host])
    frontend_id = runtime.component_id(settings, given, frontend_id, "--frontend-id")
    if settings.secure and not etcd:
        raise click.UsageError("a secure frontend checks API keys, which live in etcd: give --etcd")
    opts = FrontendOptions(
        schedulers=_split(scheduler),
        etcd=_split(etcd),
        cluster=cluster,
        frontend_id=frontend_id,
        lease_ttl=lease_ttl,
        host=host,
        advertise_host=advertise_host,
        http_port=http_port,
        grpc_port=grpc_port,
        stream_port=stream_port,
        model=model,
        max_model_len=max_model_len,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        vocab_size=vocab_size,
        dispatch_timeout=dispatch_timeout,
        idle_timeout=idle_timeout,
        request_timeout=request_timeout,
        body_timeout=body_timeout,
        max_inflight=max_inflight,
        max_requests_per_key=max_requests_per_key,
        max_body_bytes=max_body_bytes,
        max_prompt_bytes=max_prompt_bytes,
        max_grpc_message_bytes=max_grpc_message_bytes,
        https=choose_https(https, settings.secure, host),
    )
    sys.exit(asyncio.run(run_frontend(opts)))
