"""``llumnix frontend`` wiring: the process entry serves HTTP + gRPC and answers 503 while no scheduler is reachable."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from pyllumnix.control_plane.frontend.main import FrontendOptions, frontend_command, run_frontend


async def test_run_frontend_serves_and_stops(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Without --etcd it serves, and says once at start what it goes without (no registration: lost-instance notices
    only once a load report named it; no registry bypass)."""
    caplog.set_level(logging.WARNING, logger="pyllumnix.control_plane.frontend.main")
    stop = asyncio.Event()
    opts = FrontendOptions(schedulers=["127.0.0.1:1"], http_port=0, model="m", max_model_len=64, dispatch_timeout=0.2)
    task = asyncio.create_task(run_frontend(opts, stop))
    for _ in range(200):
        out = capsys.readouterr().out
        if out:
            break
        await asyncio.sleep(0.01)
    ready = json.loads(out.splitlines()[0])
    assert ready["event"] == "ready" and ready["grpc_address"]
    url = f"http://127.0.0.1:{ready['http_port']}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "m"
        async with session.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}) as resp:
            assert resp.status == 503  # no leader, and the (empty) registry offers no bypass target
            assert "Retry-After" in resp.headers
        async with session.get(f"{url}/livez") as resp:
            assert resp.status == 200
        async with session.get(f"{url}/health") as resp:  # readiness: nothing to dispatch to
            reason = (await resp.json())["reason"]
            assert resp.status == 503 and "scheduler leader" in reason and "bypass" in reason
            assert "127.0.0.1:1" not in reason, reason  # a public answer names no address (the log does)
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 503
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    warned = [r.getMessage() for r in caplog.records if "no --etcd" in r.getMessage()]
    assert len(warned) == 1 and "lost instance" in warned[0] and "registry" in warned[0], warned
    not_ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not ready")]
    assert len(not_ready) == 1 and "127.0.0.1:1" in not_ready[0], not_ready  # once for two probes


def test_command_needs_somewhere_to_dispatch() -> None:
    result = CliRunner().invoke(frontend_command, [])
    assert result.exit_code != 0 and "--scheduler" in result.output
    help_text = CliRunner().invoke(frontend_command, ["--help"]).output
    for flag in ("--max-model-len", "--idle-timeout", "--request-timeout", "--max-inflight", "--max-body-bytes"):
        assert flag in help_text
    assert "--max-prompt-bytes" in help_text and "--max-grpc-message-bytes" in help_text


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--idle-timeout", "nan"),
        ("--idle-timeout", "-1"),
        ("--idle-timeout", "inf"),
        ("--request-timeout", "nan"),
        ("--request-timeout", "-5"),
        ("--dispatch-timeout", "nan"),
        ("--dispatch-timeout", "0"),
        ("--body-timeout", "nan"),
        ("--body-timeout", "0"),
        ("--max-body-bytes", "100"),
    ],
)
def test_timeouts_must_be_finite_and_not_negative(flag: str, value: str) -> None:
    """A usage error (exit 2) naming the option, before anything starts. Was accepted: ``--idle-timeout nan`` made
    every waiting request's idle timer re-arm at once forever (a spinning event loop), a negative one ended every
    request as timed out at once."""
    # No --scheduler/--etcd: the command stops (a usage error naming those) right after parsing, so an accepted
    # value fails this test at once instead of starting a frontend.
    result = CliRunner().invoke(frontend_command, [flag, value])
    assert result.exit_code == 2, result.output
    assert flag in result.output and "--scheduler" not in result.output


def test_the_frontend_id_is_the_certificates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend given its certificate with --ca/--cert/--key runs under the certificate's id (it registers under it
    in etcd, where its role may write only its own key), and refuses a --frontend-id that differs, as the scheduler
    and the llumlet do (it used to run as f0 whatever its certificate said)."""
    from pyllumnix.control_plane.frontend import main
    from pyllumnix.infra.security import runtime
    from pyllumnix.infra.security.bootstrap import bootstrap_local

    paths = bootstrap_local(tmp_path / "pki", "c1").ensure("frontend", "f7")
    seen: list[str] = []

    async def fake_run(opts: FrontendOptions) -> int:
        seen.append(opts.frontend_id)
        return 0

    monkeypatch.setattr(main, "run_frontend", fake_run)
    monkeypatch.setitem(runtime._state, "current", runtime.current())  # configure_from_cli sets the process's
    tls = ["--ca", str(paths.ca), "--cert", str(paths.cert), "--key", str(paths.key), "--etcd", "127.0.0.1:1"]
    result = CliRunner().invoke(frontend_command, tls)
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen == ["f7"]
    refused = CliRunner().invoke(frontend_command, [*tls, "--frontend-id", "f8"])
    assert refused.exit_code == 2 and "--frontend-id f8 is not the certificate's id 'f7'" in refused.output
    assert seen == ["f7"]


@pytest.mark.parametrize(
    ("flag", "secure", "host", "https"),
    [
        (None, True, "127.0.0.1", False),  # loopback: nothing leaves the machine
        (None, True, "::1", False),
        (None, True, "[::1]", False),
        (None, True, "localhost", False),
        (None, True, "0.0.0.0", True),  # the network reaches it: API keys only over TLS
        (None, True, "::", True),
        (None, True, "10.1.2.3", True),
        (None, True, "node-a.example", True),
        (None, False, "0.0.0.0", False),  # --insecure: nothing to serve TLS with
        (True, True, "127.0.0.1", True),
        (False, True, "0.0.0.0", False),  # the operator's TLS proxy in front (warned)
    ],
)
def test_the_openai_api_is_https_wherever_the_network_reaches_it(
    flag: bool | None, secure: bool, host: str, https: bool
) -> None:
    """Was plain HTTP unless ``--https``: a secure frontend bound on 0.0.0.0 took every user's API key in the clear."""
    from pyllumnix.control_plane.frontend.main import choose_https

    assert choose_https(flag, secure, host) is https


def test_https_without_certificates_and_no_https_on_a_public_host_are_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``--https --insecure`` was accepted and served plain HTTP; now a usage error. ``--no-https`` on a host the
    network reaches is honoured with a warning; the default there serves HTTPS."""
    from pyllumnix.control_plane.frontend import main
    from pyllumnix.infra.security import runtime
    from pyllumnix.infra.security.bootstrap import bootstrap_local

    seen: list[bool] = []

    async def fake_run(opts: FrontendOptions) -> int:
        seen.append(opts.https)
        return 0

    monkeypatch.setattr(main, "run_frontend", fake_run)
    monkeypatch.setitem(runtime._state, "current", runtime.current())
    refused = CliRunner().invoke(frontend_command, ["--insecure", "--https", "--scheduler", "127.0.0.1:1"])
    assert refused.exit_code == 2 and "--https" in refused.output and "--insecure" in refused.output
    assert seen == []
    paths = bootstrap_local(tmp_path / "pki", "c1").ensure("frontend", "f7")
    tls = ["--ca", str(paths.ca), "--cert", str(paths.cert), "--key", str(paths.key), "--etcd", "127.0.0.1:1"]
    caplog.set_level(logging.WARNING, logger="pyllumnix.control_plane.frontend.main")
    for extra in (["--host", "0.0.0.0"], ["--host", "0.0.0.0", "--no-https"], []):
        result = CliRunner().invoke(frontend_command, [*tls, *extra])
        assert result.exit_code == 0, (result.output, result.exception)
    assert seen == [True, False, False]
    warned = [r.getMessage() for r in caplog.records if "--no-https" in r.getMessage()]
    assert len(warned) == 1 and "in the clear" in warned[0], warned
