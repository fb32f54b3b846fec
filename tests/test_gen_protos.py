"""``make protos`` / ``make protos-check`` cover the Node client too: the TypeScript generated from protos/ is compared
with clients/node/gen (a stale, missing or extra file fails the check, naming it), written back by the generating
run, and where node is missing the TypeScript half is a note, except under CI where it fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyllumnix.tools import gen_protos

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node/npm not installed"
)


@pytest.fixture
def gen_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of clients/node/gen the functions under test use instead of the repository's."""
    copy = tmp_path / "gen"
    shutil.copytree(gen_protos.TS_GEN, copy)
    monkeypatch.setattr(gen_protos, "TS_GEN", copy)
    return copy


@needs_node
def test_check_passes_on_the_committed_code_and_names_stale_files(
    gen_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gen_protos.sync_ts(check=True) == 0, capsys.readouterr().out
    common = gen_copy / "llumnix" / "v1" / "common.ts"
    common.write_text(common.read_text().replace("instanceId", "instanceID", 1))
    (gen_copy / "llumnix" / "v1" / "leftover.ts").write_text("export {};\n")
    (gen_copy / "llumnix" / "v1" / "admin.ts").unlink()
    capsys.readouterr()
    assert gen_protos.sync_ts(check=True) == 1
    out = capsys.readouterr().out
    for name in ("common.ts", "leftover.ts", "admin.ts"):
        assert f"clients/node/gen/llumnix/v1/{name}" in out
    # the generating run (make protos) repairs all three
    assert gen_protos.sync_ts(check=False) == 0
    assert not (gen_copy / "llumnix" / "v1" / "leftover.ts").exists()
    assert gen_protos.sync_ts(check=True) == 0


def test_without_node_a_note_locally_and_a_failure_under_ci(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    monkeypatch.delenv("CI", raising=False)
    assert gen_protos.ts_step(check=True) == 0
    assert "NOTE: TypeScript client not generated/checked: node/npm not installed" in capsys.readouterr().err
    monkeypatch.setenv("CI", "true")
    assert gen_protos.ts_step(check=True) == 1
    assert "CI must check clients/node/gen" in capsys.readouterr().err
