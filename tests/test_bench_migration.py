"""Smoke test of ``llumnix bench migration`` with small numbers: real llumlet processes, real migrations, seconds."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def test_bench_migration_reports_each_length(tmp_path: Path) -> None:
    out = tmp_path / "migration.json"
    args = ["bench", "migration", "--lengths", "64,256", "--repeats", "1", "--transport", "tcp", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("migration downtime ms 64:")
    report = json.loads(out.read_text())
    assert [row["seq_len"] for row in report["rows"]] == [64, 256]
    for row in report["rows"]:
        assert row["downtime_ms"] > 0 and row["total_ms"] >= row["downtime_ms"] and row["stages"] >= 1
        assert row["blocking_copy_ms"] > 0 and row["recompute_ms"] > 0
        assert row["downtime_ms_all"] == [row["downtime_ms"]]
