"""``llumnix llumlet`` options of the reliability settings: validated up front, with a clear message."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
from click.testing import CliRunner

from pyllumnix.data_plane.llumlet import main
from pyllumnix.data_plane.llumlet.main import LlumletOptions, llumlet_command, run_llumlet
from pyllumnix.data_plane.llumlet.registration import InstanceRegistration
from pyllumnix.data_plane.transport.fusion import DEFAULT_STALL_TIMEOUT_S
from pyllumnix.infra import grpc_server
from pyllumnix.infra.etcd.errors import EtcdUnavailableError
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--push-budget", "0"], "--push-budget"),
        (["--sink-idle-close", "-1"], "--sink-idle-close"),
        (["--max-waiting", "-1"], "--max-waiting"),
        (["--lease-ttl", "0"], "--lease-ttl"),
        # nan passes click's FloatRange (every comparison is false): a nan budget would never run out
        (["--push-budget", "nan"], "--push-budget"),
        (["--sink-idle-close", "inf"], "--sink-idle-close"),
        (["--output-heartbeat", "nan"], "--output-heartbeat"),
        # REVIEW10 L1's other half: the period the llumlet registers, and its migration bounds, in the config's ranges
        (["--load-interval-ms", "0"], "--load-interval-ms"),
        (["--load-interval-ms", "2147483647"], "--load-interval-ms"),
        (["--max-stages", "0"], "--max-stages"),
        (["--last-stage-max-blocks", "-1"], "--last-stage-max-blocks"),
    ],
)
def test_bad_reliability_settings_are_refused_with_a_usage_error(args: list[str], option: str) -> None:
    result = CliRunner().invoke(llumlet_command, args)
    assert result.exit_code == 2
    assert option in result.output


def test_defaults_ride_out_short_stalls_and_slow_frontends() -> None:
    opts = LlumletOptions()
    assert opts.lease_ttl == 6 and opts.push_budget_s == 30.0 and opts.max_waiting == 256
    help_text = CliRunner().invoke(llumlet_command, ["--help"]).output
    for option in ("--push-budget", "--sink-idle-close", "--max-waiting", "--lease-ttl"):
        assert option in help_text


def test_stall_timeout_and_output_heartbeat_reach_the_llumlet_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--stall-timeout`` is the transport watchdog of every migration stage (MigrationSettings.stall_timeout_s, 0:
    off) and ``--output-heartbeat`` the llumlet's heartbeat period (0: off)."""
    seen: list[LlumletOptions] = []

    async def fake_run(opts: LlumletOptions, stop: object = None) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(main, "run_llumlet", fake_run)
    monkeypatch.setattr(runtime, "configure_from_cli", lambda *args, **kwargs: runtime.INSECURE)
    result = CliRunner().invoke(llumlet_command, ["--insecure", "--stall-timeout", "2.5", "--output-heartbeat", "3"])
    assert result.exit_code == 0, result.output
    given = seen[-1]
    assert given.migration.stall_timeout_s == 2.5 and given.heartbeat_s == 3.0
    result = CliRunner().invoke(llumlet_command, ["--insecure", "--stall-timeout", "0", "--output-heartbeat", "0"])
    assert result.exit_code == 0, result.output
    off = seen[-1]
    assert off.migration.stall_timeout_s is None and off.heartbeat_s == 0.0
    assert CliRunner().invoke(llumlet_command, ["--stall-timeout", "-1"]).exit_code == 2
    assert LlumletOptions().migration.stall_timeout_s == DEFAULT_STALL_TIMEOUT_S


def test_a_small_total_blocks_starts_with_a_lowered_max_model_len() -> None:
    """The 7B profile (792 blocks, max_model_len 12,288) with ``--total-blocks 520``: the llumlet used to die with a
    ValueError traceback; now its engine serves requests up to what 520 blocks hold above the watermark."""
    engine = main.make_engine(LlumletOptions(profile="llama-7b-a10", total_blocks=520, payload=False))
    assert engine.total_blocks == 520 and engine.max_model_len == (520 - 5) * 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--total-blocks", "0"], "total_blocks must be positive"),
        (["--bytes-per-token", "12"], "bytes_per_token must be a positive multiple of 8"),
        (["--profile", "nope"], "unknown engine profile 'nope'"),
    ],
)
def test_an_impossible_sim_engine_is_a_usage_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setattr(runtime, "configure_from_cli", lambda *args, **kwargs: runtime.INSECURE)
    result = CliRunner().invoke(llumlet_command, ["--insecure", "--no-payload", *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in result.output


def test_stream_interval_reaches_the_llumlet_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--stream-interval``: engine steps per push message (PushSettings.stream_interval); 0 is refused."""
    seen: list[LlumletOptions] = []

    async def fake_run(opts: LlumletOptions, stop: object = None) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(main, "run_llumlet", fake_run)
    monkeypatch.setattr(runtime, "configure_from_cli", lambda *args, **kwargs: runtime.INSECURE)
    result = CliRunner().invoke(llumlet_command, ["--insecure", "--stream-interval", "1"])
    assert result.exit_code == 0, result.output
    assert seen[-1].stream_interval == 1
    assert CliRunner().invoke(llumlet_command, ["--insecure"]).exit_code == 0
    assert seen[-1].stream_interval == LlumletOptions().stream_interval == 4
    refused = CliRunner().invoke(llumlet_command, ["--stream-interval", "0"])
    assert refused.exit_code == 2 and "--stream-interval" in refused.output


# F2 (review 7): UCX finds its interface by the bind host's IPv4 address (socket.gethostbyname); an IPv6 --host made
# ``--transport auto`` (UCX installed) and ``--transport ucx`` die with a bare socket.gaierror traceback.
@pytest.mark.parametrize(
    ("host", "advertise"), [("::1", ""), ("[::1]", ""), ("::", "::1"), ("[::]", "[::1]"), ("fe80::1", "")]
)
def test_auto_transport_on_an_ipv6_host_picks_tcp(monkeypatch: pytest.MonkeyPatch, host: str, advertise: str) -> None:
    monkeypatch.setattr(main, "ucx_available", lambda: True)
    kind, options = main.transport_options("auto", host, advertise)
    assert kind == "tcp"
    assert options["host"] == host and options["advertise_host"] == (advertise or None)


@pytest.mark.parametrize(
    ("host", "advertise", "named"), [("::1", "", "--host ::1"), ("::", "[::1]", "--advertise-host [::1]")]
)
def test_ucx_transport_on_an_ipv6_host_is_a_usage_error(host: str, advertise: str, named: str) -> None:
    with pytest.raises(click.UsageError) as refused:
        main.transport_options("ucx", host, advertise)
    assert "--transport ucx" in refused.value.message and named in refused.value.message


def test_ucx_transport_keeps_an_ipv4_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """What still picks UCX: an IPv4 literal or a name with an IPv4 address; a wildcard without an advertised host
    leaves UCX its interfaces."""
    monkeypatch.setattr(main, "ucx_available", lambda: True)
    assert main.transport_options("auto", "127.0.0.2") == ("ucx", {"host": "127.0.0.2"})
    assert main.transport_options("ucx", "localhost") == ("ucx", {"host": "127.0.0.1"})
    assert main.transport_options("ucx", "0.0.0.0") == ("ucx", {})


def test_auto_transport_on_a_secure_cluster_is_tls_tcp_and_ucx_only_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """REVIEW18-2: UCX has no TLS, yet ``auto`` picked it whenever it was installed, a secure cluster's KV caches
    (which can be inverted back to prompts) then crossing hosts in the clear. Secure by default: TCP in mutual TLS."""
    monkeypatch.setattr(main, "ucx_available", lambda: True)
    pki = bootstrap_local(tmp_path / "pki", "c1")
    previous = runtime.configure(runtime.from_options("llumlet", "l0", tls_dir=str(pki.directory), env={}))
    try:
        kind, options = main.transport_options("auto", "127.0.0.2")
        assert kind == "tcp" and options["ssl_server"] is not None and options["ssl_client"] is not None
        assert main.transport_options("ucx", "127.0.0.2") == ("ucx", {"host": "127.0.0.2"})  # asked for by name
    finally:
        runtime.configure(previous)


def test_llumlet_cli_with_ucx_on_an_ipv6_host_exits_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI: exit 2 with one line naming both options, no traceback (the engine is built before the transport)."""
    monkeypatch.setattr(runtime, "configure_from_cli", lambda *args, **kwargs: runtime.INSECURE)
    result = CliRunner().invoke(
        llumlet_command, ["--insecure", "--no-payload", "--host", "::1", "--port", "0", "--transport", "ucx"]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--transport ucx" in result.output and "--host ::1" in result.output
    assert "Traceback" not in result.output and "gaierror" not in result.output


def test_a_llumlet_that_cannot_reach_etcd_at_start_exits_with_one_line() -> None:
    """Attack 9 B5: etcd unreachable at start printed the whole EtcdUnavailableError traceback, then "Event loop is
    closed" and "coroutine 'AioServer.shutdown' was never awaited" (the server was stopped after the loop closed).
    Now: one line naming etcd, exit 1, everything shut down inside the loop. A real process (the loop's teardown is
    what went wrong), against a port that refuses connections: the etcd client's 2.5 s budget, then the exit."""
    with socket.socket() as closed:  # bound, never listening: connections are refused while the test holds it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLUMNIX_")}
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "from pyllumnix.data_plane.llumlet.main import llumlet_command; llumlet_command()",
                *["--insecure", "--etcd", f"127.0.0.1:{port}", "--profile", "tiny", "--no-payload"],
                *["--transport", "tcp", "--metrics-port", "-1"],
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert f"llumlet: etcd unavailable: lease_grant failed on every endpoint [127.0.0.1:{port}]" in run.stderr
    for noise in ("Traceback", "Event loop is closed", "never awaited"):
        assert noise not in run.stderr, run.stderr


async def test_orders_sent_while_the_llumlet_registers_meet_the_fence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review9 F2 (attack 9 B3 at start): with --etcd, the server served before registration, and the fence's
    ``leader_of`` (and the MigrateOut registry check) were set only after it: an order with a made-up term 2^62 sent
    while etcd was slow was admitted (OK), and that term then outranked the real leader's for good. Now both are in
    place when the server starts, so the term must be proven in etcd, which cannot answer here: UNAVAILABLE.

    The whole ``run_llumlet``, against an etcd port that refuses connections; the order is sent from inside the
    registration (as a slow etcd would leave it pending), which then fails, so the llumlet exits 1."""
    at_start: dict[str, Any] = {}
    real_start_server = grpc_server.start_server

    async def recording_start_server(bindings: Sequence[Any], host: str, port: int) -> Any:
        servicer = bindings[0][1]
        at_start["leader_of"], at_start["registry"] = servicer.fence.leader_of, servicer.registry
        server = await real_start_server(bindings, host, port)
        at_start["port"] = server.port
        return server

    real_etcd_client = runtime.etcd_client
    monkeypatch.setattr(main, "start_server", recording_start_server)
    # a short retry budget: the proof's etcd read fails in 0.5 s instead of 2.5 s
    monkeypatch.setattr(runtime, "etcd_client", lambda e: real_etcd_client(e, call_timeout=0.2, retry_budget=0.5))
    answers: list[grpc.StatusCode] = []

    async def an_order_arrives_while_registering(self: InstanceRegistration) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{at_start['port']}") as channel:
            stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
            try:
                await stub.SetInstanceState(
                    llumlet_pb2.SetInstanceStateRequest(state=common_pb2.INSTANCE_STATE_ACTIVE),
                    metadata=term_metadata(2**62),
                    timeout=20,
                )
                answers.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                answers.append(exc.code())
        raise EtcdUnavailableError("lease_grant", [self.client.endpoints[0]], 0.0, "refused (test)")

    monkeypatch.setattr(InstanceRegistration, "start", an_order_arrives_while_registering)
    with socket.socket() as closed:  # bound, never listening: connections are refused while the test holds it
        closed.bind(("127.0.0.1", 0))
        etcd = f"127.0.0.1:{closed.getsockname()[1]}"
        opts = LlumletOptions(
            instance_id="fenced-1", etcd=[etcd], profile="tiny", payload=False, transport="tcp", metrics_port=-1
        )
        assert await asyncio.wait_for(run_llumlet(opts), 60) == 1
    assert answers == [grpc.StatusCode.UNAVAILABLE], "a made-up term was admitted before the fence could prove it"
    assert at_start["leader_of"] is not None and at_start["registry"] is not None


@pytest.mark.parametrize("taken", ["--port", "--metrics-port"])
async def test_the_etcd_client_is_closed_when_the_llumlet_cannot_serve(
    monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """The etcd client is made before the gRPC server now (review9 F2); a port that is taken ends the start with the
    bind error, and the client (its gRPC channel) is closed, not left open."""
    made: list[Any] = []
    real_etcd_client = runtime.etcd_client

    def recording_etcd_client(endpoints: Sequence[str]) -> Any:
        made.append(real_etcd_client(endpoints))
        return made[-1]

    monkeypatch.setattr(runtime, "etcd_client", recording_etcd_client)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        opts = LlumletOptions(
            instance_id="unbound-1",
            etcd=["127.0.0.1:2379"],
            profile="tiny",
            payload=False,
            transport="tcp",
            port=port if taken == "--port" else 0,
            metrics_port=port if taken == "--metrics-port" else -1,
        )
        with pytest.raises((OSError, RuntimeError), match=r"bind|address"):  # grpc's bind error is a RuntimeError
            await asyncio.wait_for(run_llumlet(opts), 60)
    assert len(made) == 1
    assert made[0]._closed, "the etcd client was left open"


def test_the_instance_id_is_the_certificates(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A llumlet given its certificate with --ca/--cert/--key runs under the certificate's id (peers know it by its
    certificate: a destination serves only the source its caller's certificate names), and refuses an --instance-id
    that differs, as the scheduler refuses a --replica-id (it used to run under any id it was given)."""
    from pyllumnix.infra.security.bootstrap import bootstrap_local

    paths = bootstrap_local(tmp_path / "pki", "c1").ensure("llumlet", "i-7")
    seen: list[str] = []

    async def fake_run(opts: LlumletOptions, stop: object = None) -> int:
        seen.append(opts.instance_id)
        return 0

    monkeypatch.setattr(main, "run_llumlet", fake_run)
    monkeypatch.setitem(runtime._state, "current", runtime.current())  # configure_from_cli sets the process's
    tls = ["--ca", str(paths.ca), "--cert", str(paths.cert), "--key", str(paths.key), "--profile", "tiny"]
    result = CliRunner().invoke(llumlet_command, tls)
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen == ["i-7"]
    assert CliRunner().invoke(llumlet_command, [*tls, "--instance-id", "i-7"]).exit_code == 0
    refused = CliRunner().invoke(llumlet_command, [*tls, "--instance-id", "i-8"])
    assert refused.exit_code == 2 and "--instance-id i-8 is not the certificate's id 'i-7'" in refused.output
    assert refused.exception is not None and not isinstance(refused.exception, AssertionError)
    assert seen == ["i-7", "i-7"]
