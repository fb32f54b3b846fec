"""LocalProcessProvider with real child processes (standalone llumlets): the hard cap on instances, stopping the
children it started when it closes (--stop-instances-on-exit), and a log line for every child's exit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pyllumnix.control_plane.scheduler.provider import LocalProcessProvider
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


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_instances"):
        LocalProcessProvider([], max_instances=0)
