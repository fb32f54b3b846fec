"""RayInstanceProvider's option checks and the CLI wiring of ``--provider ray`` (the Ray cluster itself is exercised
in integration/test_multihost.py on emulated hosts)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pyllumnix.control_plane.scheduler.main import scheduler_command
from pyllumnix.control_plane.scheduler.provider_ray import RayInstanceProvider, _Placed
from pyllumnix.tools.serve import serve_command


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="placement must be 'spread' or 'pack'"):
        RayInstanceProvider("127.0.0.1:6379", [], placement="random")
    with pytest.raises(ValueError, match="an instance needs CPUs or GPUs"):
        RayInstanceProvider("127.0.0.1:6379", [], cpus=0, gpus=0)


def test_ray_provider_needs_an_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both the scheduler and serve refuse ``--provider ray`` without ``--ray-address`` before starting anything
    (serve not even its log folder: every CI run left an empty one in /tmp)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(scheduler_command, ["--etcd", "127.0.0.1:1", "--insecure", "--provider", "ray"])
    assert result.exit_code == 2 and "--provider ray needs --ray-address" in result.output
    result = runner.invoke(serve_command, ["--insecure", "--provider", "ray", "--llumlets", "0"])
    assert result.exit_code == 2 and "--provider ray needs --ray-address" in result.output
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------- start watch
class _NoRay:
    """What the teardown calls on Ray, as no-ops: the real ``ray.kill`` / ``remove_placement_group`` on these fakes
    auto-started a local Ray cluster (~40 s a test), whose worker then outlived the test run (a llumlet process
    left behind by a CI run)."""

    def __init__(self) -> None:
        self.killed: list[Any] = []
        self.removed: list[Any] = []

    def kill(self, actor: Any, *, no_restart: bool = False) -> None:
        self.killed.append(actor)

    def remove_placement_group(self, pg: Any) -> None:
        self.removed.append(pg)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> _NoRay:
    fake = _NoRay()
    monkeypatch.setattr(RayInstanceProvider, "_ray", lambda self: fake)
    ray_pg = pytest.importorskip("ray.util.placement_group")
    monkeypatch.setattr(ray_pg, "remove_placement_group", fake.remove_placement_group)
    return fake


class _Method:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1

        async def call() -> Any:
            if isinstance(self.answer, BaseException):
                raise self.answer
            if self.answer == "hang":
                await asyncio.sleep(3600)
            return self.answer

        return call()


class _Actor:
    """A Ray actor handle's surface the start watch and the teardown use (method.remote() -> awaitable)."""

    def __init__(self, returncode: Any) -> None:
        self.returncode = _Method(returncode)
        self.terminate = _Method(0)


def _provider_with(actor: _Actor, **kwargs: Any) -> tuple[RayInstanceProvider, _Placed]:
    provider = RayInstanceProvider(
        "127.0.0.1:6379", [], start_poll_interval=0.01, probe_timeout=0.05, probe_failures=2, **kwargs
    )
    placed = provider.instances["ray-1"] = _Placed(pg=object(), actor=actor, node_ip="10.0.0.2")
    placed.watch = asyncio.get_running_loop().create_task(provider._watch_start("ray-1", placed))
    return provider, placed


async def _ended(placed: _Placed) -> None:
    assert placed.watch is not None
    await asyncio.wait_for(placed.watch, 10)


@pytest.mark.parametrize(
    ("returncode", "why", "asked"),
    [
        (2, "the llumlet exited with code 2 before it registered", 1),
        (RuntimeError("RayActorError: the actor died"), "stopped answering", 0),
        ("hang", "stopped answering", 0),  # the node vanished: Ray itself would take ~64 s to say so
    ],
)
async def test_a_start_that_dies_before_registering_is_removed(
    returncode: Any, why: str, asked: int, no_ray: _NoRay
) -> None:
    """Before: ``starting()`` counted a llumlet that died before it registered as starting forever (the autoscaler
    never replaced it) and its actor and placement group stayed."""
    actor = _Actor(returncode)
    provider, placed = _provider_with(actor)
    await _ended(placed)
    assert provider.starting() == set() and "ray-1" not in provider.instances
    assert why in provider.start_failures["ray-1"], provider.start_failures
    # The teardown ran: the actor asked to stop the llumlet (not when it is unreachable: no waiting on a dead node),
    # then killed, the placement group removed.
    assert actor.terminate.calls == asked
    assert no_ray.killed == [actor] and no_ray.removed == [placed.pg]


async def test_a_start_that_never_registers_times_out() -> None:
    actor = _Actor(None)  # alive, never registering
    provider, placed = _provider_with(actor, register_timeout=0.2)
    assert provider.starting() == {"ray-1"}
    await _ended(placed)
    assert provider.starting() == set()
    assert "did not register within 0.2s" in provider.start_failures["ray-1"]


async def test_a_registered_start_is_left_alone() -> None:
    actor = _Actor(None)
    provider, placed = _provider_with(actor)
    await asyncio.sleep(0.05)
    provider.registered("ray-1")
    with contextlib.suppress(asyncio.CancelledError):
        await _ended(placed)
    assert provider.instances["ray-1"] is placed and provider.starting() == set()
    assert provider.start_failures == {} and actor.terminate.calls == 0


async def test_connect_adopts_a_ray_init_that_finished_after_its_caller_gave_up() -> None:
    """A Scale RPC that timed out while ``ray.init`` ran left Ray initialised but the provider unconnected; before,
    the next start called ``ray.init`` again and failed ("Maybe you called ray.init twice by accident?")."""

    class InitialisedRay:
        def is_initialized(self) -> bool:
            return True

        def init(self, **kwargs: Any) -> None:
            raise AssertionError("ray.init called twice")

    provider = RayInstanceProvider("127.0.0.1:9", [], ray_connect_timeout=1)  # nothing answers there
    provider._ray = InitialisedRay  # type: ignore[method-assign]
    await provider.connect()
    assert provider._connected


@pytest.mark.parametrize("option", ["--ray-cpus", "--instance-grace", "--leader-probe-interval"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_scheduler_durations_and_sizes_must_be_finite(option: str, value: str) -> None:
    """nan passes click's FloatRange (every comparison is false); the scheduler refuses it up front."""
    result = CliRunner().invoke(scheduler_command, ["--etcd", "127.0.0.1:1", "--insecure", option, value])
    assert result.exit_code == 2 and "finite" in result.output and option in result.output


def test_a_placed_llumlets_key_is_made_on_its_node_and_only_its_public_part_travels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the provider made the key and passed the PEM as the actor's constructor argument, which Ray keeps in its
    GCS with the actor's creation task. Now the actor (here: its body, in this process) makes the key in a 0700
    folder, gives out the public key, gets back the CA and a certificate for that key, and starts the llumlet with
    the three files; its folder goes when it is terminated."""
    import os
    import stat
    import subprocess

    import ray
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from pyllumnix.control_plane.scheduler import provider_ray
    from pyllumnix.control_plane.scheduler.provider_ray import LlumletSupervisor
    from pyllumnix.infra.security.bootstrap import bootstrap_local
    from pyllumnix.infra.security.ca import identities_in
    from pyllumnix.infra.security.runtime import from_options

    bootstrap_local(tmp_path / "pki", "c1")
    security = from_options("scheduler", "s0", tls_dir=tmp_path / "pki")
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    started: list[list[str]] = []

    class Proc:
        pid, returncode = 4242, 0

        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            started.append(cmd)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Proc)
    actor = LlumletSupervisor("ray-00000a", ["--etcd", "e:1"], True)
    public = actor.public_key()
    assert public is not None and b"PRIVATE" not in public
    assert actor._dir is not None and stat.S_IMODE(os.stat(actor._dir).st_mode) == 0o700
    assert actor.returncode() is None and not started, "nothing runs before its certificate came"
    pem = asyncio.run(RayInstanceProvider._certify(security, "ray-00000a", "10.0.0.7", public))
    assert pem is not None and set(pem) == {"ca", "cert"}
    cert = x509.load_pem_x509_certificate(pem["cert"])
    assert (
        cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        == public
    )
    assert [i.uri for i in identities_in(cert)] == ["llumnix://c1/llumlet/ray-00000a"]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.7" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert actor.start(pem) == ("10.0.0.7", 4242)
    cmd = started[0]
    folder = actor._dir
    assert cmd[cmd.index("--key") + 1] == f"{folder}/key.pem" and cmd[cmd.index("--cert") + 1] == f"{folder}/cert.pem"
    assert stat.S_IMODE(os.stat(f"{folder}/key.pem").st_mode) == 0o600
    assert actor.terminate(0.1) == 0 and not os.path.exists(folder)
    # A secure actor refuses to start without its certificate; an insecure one makes no key.
    bare = LlumletSupervisor("ray-00000b", [], True)
    with pytest.raises(ValueError, match="needs its certificate"):
        bare.start(None)
    bare.terminate(0.1)
    plain = LlumletSupervisor("ray-00000c", [], False)
    assert plain.public_key() is None and plain._dir is None
    plain.start(None)
    assert "--insecure" in started[-1]
    # A scheduler that cannot issue says so.
    assert security.paths is not None
    unable = from_options("scheduler", "s0", ca=security.paths.ca, cert=security.paths.cert, key=security.paths.key)
    with pytest.raises(provider_ray.ProviderError, match="cannot issue"):
        asyncio.run(RayInstanceProvider._certify(unable, "ray-00000d", "10.0.0.7", public))


class _StartingActor:
    """An actor handle for ``_start_one``: ``public_key`` answers, ``start`` does what the test says."""

    def __init__(self, start: Any) -> None:
        self.public_key = _Method(None)
        self.start = _Method(start)
        self.terminate = _Method(0)


def _startable(monkeypatch: pytest.MonkeyPatch, no_ray: _NoRay, actor: _StartingActor) -> RayInstanceProvider:
    """A provider whose Ray places at once and creates ``actor``."""
    ray_pg = pytest.importorskip("ray.util.placement_group")  # the module (``ray.util`` re-exports the function)

    class Group:
        async def ready(self) -> None:
            return None

    class Remote:
        def options(self, **kwargs: Any) -> Remote:
            return self

        def remote(self, *args: Any) -> _StartingActor:
            return actor

    monkeypatch.setattr(ray_pg, "placement_group", lambda *a, **k: Group())
    monkeypatch.setattr(no_ray, "remote", lambda **kwargs: lambda cls: Remote(), raising=False)
    provider = RayInstanceProvider("127.0.0.1:6379", [], probe_timeout=0.5, start_timeout=5)
    monkeypatch.setattr(provider, "_choose_node", lambda: "10.0.0.2")
    return provider


async def test_a_cancelled_or_failed_start_still_has_the_actor_remove_its_key(
    monkeypatch: pytest.MonkeyPatch, no_ray: _NoRay
) -> None:
    """Was: a start cancelled (a lost leadership, a stop) went straight to ``ray.kill``, which runs nothing of the
    actor's, so the node kept the llumlet's key folder. Now the actor is told to terminate first (in a task of its own
    when the start was cancelled), then killed and its placement group removed; a start that fails does the same."""
    hanging = _StartingActor("hang")
    provider = _startable(monkeypatch, no_ray, hanging)
    start = asyncio.ensure_future(provider._start_one("ray-00000e"))
    for _ in range(100):
        if hanging.start.calls:
            break
        await asyncio.sleep(0.01)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await provider.close()  # waits for the cleanup of the cancelled start
    assert hanging.terminate.calls == 1 and no_ray.killed == [hanging] and len(no_ray.removed) == 1
    assert not provider._discards and "ray-00000e" not in provider.instances
    failing = _StartingActor(RuntimeError("the actor died"))
    provider = _startable(monkeypatch, no_ray, failing)
    with pytest.raises(Exception, match="failed to start"):
        await provider._start_one("ray-00000f")
    assert failing.terminate.calls == 1 and no_ray.killed[-1] is failing and len(no_ray.removed) == 2


def test_a_terminated_actor_never_starts_its_llumlet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: terminate before start dropped the key folder, and a later start then ran the llumlet with --insecure."""
    import ray

    from pyllumnix.control_plane.scheduler.provider_ray import LlumletSupervisor

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    actor = LlumletSupervisor("ray-000010", [], True)
    assert actor.terminate(0.1) == 0
    with pytest.raises(RuntimeError, match="terminated before it started"):
        actor.start({"ca": b"x", "cert": b"y"})
    assert actor.proc is None
