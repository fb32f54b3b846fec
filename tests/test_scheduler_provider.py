"""LocalProcessProvider with real child processes (standalone llumlets): the hard cap on instances, stopping the
children it started when it closes (--stop-instances-on-exit), and a log line for every child's exit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from pyllumnix.control_plane.scheduler.provider import LocalProcessProvider
from pyllumnix.infra.security.ca import CertPaths
from pyllumnix.infra.security.issuer import IssuerError
from pyllumnix.tools.launch import group_alive

# No --etcd: the llumlets run unregistered until signalled.
STANDALONE = ["--profile", "tiny", "--transport", "tcp", "--no-payload"]


async def test_cap_and_stop_on_close(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyllumnix.control_plane.scheduler.provider")
    provider = LocalProcessProvider(STANDALONE, tmp_path, max_instances=2, stop_on_close=True, stop_timeout=20)
    try:
        ids = await provider.start_instances(5)
        assert len(ids) == 2 and len(provider.alive()) == 2  # the cap, not the request, bounds the children
        assert any("leaves room for 2" in r.getMessage() for r in caplog.records)
        assert await provider.start_instances(1) == []  # full
        procs = list(provider.processes.values())
    finally:
        await provider.close()
    assert all(p.returncode is not None for p in procs), "a child outlived its provider"
    assert not any(group_alive(p.pid) for p in procs)
    exits = [r.getMessage() for r in caplog.records if " exited: " in r.getMessage()]
    assert sorted(e.split()[1] for e in exits) == sorted(ids), exits


async def test_children_are_left_running_without_stop_on_close(tmp_path: Path) -> None:
    provider = LocalProcessProvider(STANDALONE, tmp_path, max_instances=1)
    [iid] = await provider.start_instances(1)
    proc = provider.processes[iid]
    await provider.close()
    try:
        assert proc.returncode is None  # the default keeps them serving after the replica exits
    finally:
        stopper = LocalProcessProvider(STANDALONE, tmp_path, stop_timeout=20)
        stopper.processes[iid] = proc
        await stopper.stop_instance(iid)
    assert proc.returncode is not None


async def _until(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (callable(check) and check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_llumlets_that_exit_before_registering_hold_further_starts_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ATTACK10 L3: a llumlet that crashes on start (here: an unknown flag) holds starts back 1 s, then 2 s, ...;
    one that registers ends the run. Before, every scaling pass spawned another one at once (a new certificate folder
    and log file each time) and ``processes`` kept the dead children."""
    caplog.set_level(logging.INFO, logger="pyllumnix.control_plane.scheduler.provider")
    now = [0.0]
    provider = LocalProcessProvider(
        [*STANDALONE, "--no-such-flag"], tmp_path, stop_on_close=True, stop_timeout=20, clock=lambda: now[0]
    )
    try:
        [first] = await provider.start_instances(1)
        await _until(lambda: provider.early_exits == 1, "the first llumlet's exit")
        assert first not in provider.processes and provider.starting() == set()
        assert await provider.start_instances(1) == []  # held for 1 s
        assert await provider.start_instances(1) == []
        now[0] = 1.5
        [second] = await provider.start_instances(1)
        await _until(lambda: provider.early_exits == 2, "the second llumlet's exit")
        now[0] = 3.0  # held 2 s from 1.5
        assert await provider.start_instances(1) == []
        now[0] = 3.6
        [third] = await provider.start_instances(1)
        provider.registered(third)  # it came up (before its exit): the run ends, no hold
        proc = provider.processes[third]
        await _until(lambda: proc.returncode is not None, "the third llumlet's exit")
        await asyncio.sleep(0.1)
        assert provider.early_exits == 0 and len(await provider.start_instances(1)) == 1
    finally:
        await provider.close()
    messages = [r.getMessage() for r in caplog.records]
    assert f"llumlet {first} exited before registering (1 in a row): no llumlet is started for 1s" in messages
    assert f"llumlet {second} exited before registering (2 in a row): no llumlet is started for 2s" in messages
    held = [m for m in messages if m.startswith("not starting llumlets for")]
    assert len(held) == 2 and "the last 1 exited before registering" in held[0], held  # once per hold
    assert len(await asyncio.to_thread(lambda: list(tmp_path.glob("*.log")))) == 4


class _BrokenIssuer:
    """Security settings whose certificate issuing fails (serve's issuer or etcd auth broken)."""

    def __init__(self) -> None:
        self.asked = 0

    def ensure(self, role: str, id: str, hosts: Sequence[str] = ()) -> None:
        self.asked += 1
        raise IssuerError("the issuer refused: etcd auth is broken")


async def test_a_failed_certificate_issue_holds_further_starts_back(caplog: pytest.LogCaptureFixture) -> None:
    """REVIEW10 L3: a start whose certificate cannot be issued counts as an early exit (1 s, then 2 s, ...). Before,
    the issuer was asked again on every scaling pass (a key generation and etcdctl calls every 100 ms)."""
    now = [0.0]
    issuer = _BrokenIssuer()
    provider = LocalProcessProvider(STANDALONE, security=cast(Any, issuer), clock=lambda: now[0])
    with pytest.raises(IssuerError):
        await provider.start_instances(1)
    assert (await provider.start_instances(1), issuer.asked, provider.early_exits) == ([], 1, 1)  # held for 1 s
    now[0] = 1.5
    with pytest.raises(IssuerError):
        await provider.start_instances(1)
    now[0] = 3.0  # held 2 s from 1.5
    assert (await provider.start_instances(1), issuer.asked, provider.early_exits) == ([], 2, 2)
    assert not provider.processes
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("no certificate for llumlet auto-") and m.endswith("(2 in a row): no llumlet is started for 2s")
        for m in messages
    ), messages


class _FolderIssuer:
    """Security settings that hand each llumlet a folder of its own (``llumlet-<id>``, as ``issuer.hand_out``) and run
    it insecure (these children crash on an unknown flag before they would read it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: list[Path] = []

    def ensure(self, role: str, id: str, hosts: Sequence[str] = ()) -> CertPaths:
        folder = self.root / f"{role}-{id}"
        folder.mkdir(parents=True)
        paths = CertPaths(folder / "ca.pem", folder / f"{role}-{id}.pem", folder / f"{role}-{id}-key.pem")
        for path in paths.ca, paths.cert, paths.key:
            path.write_bytes(b"-")
        self.folders.append(folder)
        return paths

    def child_args(self, own: CertPaths | None) -> list[str]:
        return ["--insecure"]


async def test_an_ended_llumlets_certificate_folder_is_removed(tmp_path: Path) -> None:
    """An autoscaled llumlet's own folder (its private key) goes when its process ends: a provider never reuses an id.
    Before, the folders stayed until serve stopped (one per start, REVIEW10/FIXE L4); folders of others stay."""
    issuer = _FolderIssuer(tmp_path / "issued")
    other = tmp_path / "issued" / "llumlet-instance-0"
    other.mkdir(parents=True)
    provider = LocalProcessProvider([*STANDALONE, "--no-such-flag"], tmp_path / "logs", security=cast(Any, issuer))
    try:
        [iid] = await provider.start_instances(1)
        [folder] = issuer.folders
        assert folder.name == f"llumlet-{iid}"
        await _until(lambda: provider.early_exits == 1, "the llumlet's exit")
        await _until(lambda: not folder.exists(), "its folder's removal")
        assert other.exists()
    finally:
        await provider.close()


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_instances"):
        LocalProcessProvider([], max_instances=0)
