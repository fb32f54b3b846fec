"""``llumnix serve``'s supervisor loop: what it costs while nothing happens, and that orphans are still reaped.

Issue #20 measured serve at ~8 ms of CPU per request under load: every 0.5 s tick scanned all of /proc for orphans.
The loop now scans every ``ADOPT_SCAN_S`` seconds, when a child exited, or when an unknown child's exit is pending.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from pyllumnix.tools import serve

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="serve's orphan reaping is Linux-only")


def _supervisor(tmp_path: Path, ticks: int, monkeypatch: pytest.MonkeyPatch, scans: list[int]) -> serve.Supervisor:
    """A supervisor with no components whose loop stops after ``ticks`` ticks; /proc scans are counted in ``scans``."""
    sup = serve.Supervisor({}, tmp_path)
    real_children_of = serve._children_of

    def counting_children_of(pid: int) -> list[int]:
        scans.append(pid)
        return real_children_of(pid)

    done = [0]

    def tick(_seconds: float) -> None:
        time.sleep(0.02)  # lets a spawned child exit between ticks
        done[0] += 1
        if done[0] > ticks:
            sup.signals.append(15)

    monkeypatch.setattr(serve, "_children_of", counting_children_of)
    monkeypatch.setattr(sup, "_sleep", tick)
    return sup


def test_idle_ticks_do_not_scan_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty quiet ticks (well within ADOPT_SCAN_S) scan /proc once, not twenty times (the old loop's cost)."""
    scans: list[int] = []
    sup = _supervisor(tmp_path, 20, monkeypatch, scans)
    sup.run()
    assert len(scans) == 1


def test_an_orphan_that_exits_between_scans_is_reaped_at_the_next_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child the supervisor did not start (what an orphan re-parented to serve is) exits after the first scan: its
    pending exit triggers a scan on the next tick, which adopts and reaps it (no zombie until the periodic scan)."""
    scans: list[int] = []
    sup = _supervisor(tmp_path, 25, monkeypatch, scans)
    pid = -1
    real_check = sup.check_children

    def check_then_spawn() -> bool:
        nonlocal pid
        exited = real_check()
        if pid < 0 and scans:  # after the first tick's scan: an unknown child that exits at once
            pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
        return exited

    monkeypatch.setattr(sup, "check_children", check_then_spawn)
    try:
        sup.run()
        assert pid > 0
        with pytest.raises(ChildProcessError):  # already reaped by the supervisor
            os.waitpid(pid, os.WNOHANG)
        assert 2 <= len(scans) <= 3, scans  # the first tick's scan, then the one the pending exit triggered
        assert pid not in sup.adopted
    finally:
        if pid > 0:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def test_serves_children_get_none_of_its_client_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FIXD: serve's own ``$LLUMNIX_CONTEXT`` (the client context file: admin API key, admin certificate paths) and
    a caller's ``$LLUMNIX_API_KEY`` / ``$LLUMNIX_ENDPOINT`` reached every component it started (etcd, schedulers and
    the llumlets their providers start, llumlets, frontend): a compromised one could read the admin key."""
    monkeypatch.setenv("LLUMNIX_CONTEXT", str(tmp_path / "context.yaml"))
    monkeypatch.setenv("LLUMNIX_API_KEY", "llx_secret")
    monkeypatch.setenv("LLUMNIX_ENDPOINT", "127.0.0.1:1")
    monkeypatch.setenv("FIXD_UNRELATED", "kept")
    sup = serve.Supervisor({}, tmp_path)
    env = sup.launcher.environment({"EXTRA": "1"})
    assert not {"LLUMNIX_CONTEXT", "LLUMNIX_API_KEY", "LLUMNIX_ENDPOINT"} & env.keys(), sorted(env)
    assert env["FIXD_UNRELATED"] == "kept" and env["EXTRA"] == "1"
    # etcd is started outside the launcher, with its own environment.
    given: list[dict[str, str]] = []

    def fake_spawn(cmd: list[str], **kwargs: object) -> None:
        env = kwargs["env"]
        assert isinstance(env, dict)
        given.append(env)

    monkeypatch.setattr(serve, "spawn", fake_spawn)
    etcd = serve.ServeEtcd(1, data_dir=tmp_path / "etcd-data")
    monkeypatch.setattr(etcd, "_command", lambda m, state: ["etcd"])
    etcd._spawn(etcd.members[0], "new")
    assert given and "LLUMNIX_CONTEXT" not in given[0] and "LLUMNIX_API_KEY" not in given[0]
    assert given[0]["FIXD_UNRELATED"] == "kept"
    # A launcher of tests or tools still passes them on (a ``serve`` it starts must write the file it was told to).
    from pyllumnix.infra.security.context import ENV_VAR
    from pyllumnix.tools.launch import CLIENT_ENV, Launcher
    from pyllumnix.tools.llmctl import ENV_API_KEY, ENV_ENDPOINT

    assert set(CLIENT_ENV) == {ENV_VAR, ENV_API_KEY, ENV_ENDPOINT}
    assert Launcher(tmp_path / "l", secure=None).environment()["LLUMNIX_CONTEXT"] == str(tmp_path / "context.yaml")


def test_serve_json_gives_each_metrics_endpoint_as_a_whole_url(tmp_path: Path) -> None:
    """A secure frontend bound beyond loopback serves HTTPS, /metrics included: ``metrics`` (host:port) left the
    scheme to the reader, who assumed http. ``metrics_url`` says it; schedulers' and llumlets' stay http."""
    from typing import Any, cast

    from pyllumnix.tools.launch import Component

    def child(kind: str, ready: dict[str, Any]) -> serve.Child:
        comp = Component(kind, cast(Any, None), tmp_path / f"{kind}.log", ready)
        return serve.Child(kind, kind, cast(Any, None), comp=comp)

    frontend = child("frontend", {"http_url": "https://127.0.0.1:8000", "grpc_address": "127.0.0.1:50051"})
    scheduler = child("scheduler", {"metrics_address": "127.0.0.1:9100", "grpc_address": "127.0.0.1:50060"})
    assert frontend.metrics_url() == "https://127.0.0.1:8000/metrics" and frontend.metrics_address() == "127.0.0.1:8000"
    assert scheduler.metrics_url() == "http://127.0.0.1:9100/metrics"
    assert child("etcd", {}).metrics_url() is None


def test_https_with_insecure_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """The frontend refuses ``--https --insecure``, but only after etcd, the schedulers and the llumlets started."""
    from click.testing import CliRunner

    result = CliRunner().invoke(serve.serve_command, ["--insecure", "--https", "--log-dir", str(tmp_path / "logs")])
    assert result.exit_code == 2 and "not with --insecure" in result.output, result.output
    assert not (tmp_path / "logs").exists(), "nothing was started"
