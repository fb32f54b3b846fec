"""Smoke test of ``llumnix bench migration`` with small numbers: real llumlet processes, real migrations, seconds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def test_bench_migration_reports_each_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the bench makes its llumlets' log folder
    out = tmp_path / "migration.json"
    args = ["bench", "migration", "--lengths", "64,256", "--repeats", "1", "--transport", "tcp", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    assert summary.startswith("migration (mtls) downtime ms 64:"), summary
    report = json.loads(out.read_text())
    # both phases in one run: the secure one (the default) at the top, plaintext beside it, compared per length
    assert report["security"] == "mtls" and report["security_check"]["llumlets_refuse_plaintext"] is True
    assert report["plaintext"]["security_check"]["llumlets_refuse_plaintext"] is False
    for rows in (report["rows"], report["plaintext"]["rows"]):
        assert [row["seq_len"] for row in rows] == [64, 256]
        for row in rows:
            assert row["downtime_ms"] > 0 and row["total_ms"] >= row["downtime_ms"] and row["stages"] >= 1
            assert row["blocking_copy_ms"] > 0 and row["recompute_ms"] > 0
            assert row["downtime_ms_all"] == [row["downtime_ms"]]
    ratios = report["mtls_vs_plaintext"]["downtime_ratio"]
    for plain, secure in zip(report["plaintext"]["rows"], report["rows"], strict=True):
        assert ratios[str(plain["seq_len"])] == pytest.approx(secure["downtime_ms"] / plain["downtime_ms"], abs=1e-3)
    assert "mTLS/plaintext downtime 64:" in summary
    # a good run removes the llumlets' logs (every CI run used to leave two folders in /tmp)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("bench-migration-")]
