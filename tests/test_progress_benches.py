"""Progress on the remaining long benchmarks (bench dataplane, bench sim): the bar and the summary line go to stderr,
stdout is the JSON report alone even with the bar forced on (``... | jq`` keeps working)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from pyllumnix.tools.cli import cli


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


@pytest.mark.parametrize("forced", ["0", "1"])
def test_bench_dataplane_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", forced)
    args = ["bench", "dataplane", "--sizes", "1", "--transports", "inproc", "--repeat", "1"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # nothing but the JSON
    assert report["gib_s"]["inproc"]["1"] > 0
    err = plain(res.stderr)
    assert err.strip().splitlines()[-1].startswith("dataplane 16MiB GiB/s:")
    if forced == "1":
        assert "bench dataplane" in err and "4/4" in err  # memcpy, memcpy_ring, socket, inproc
    else:
        assert "bench dataplane" not in err


def test_bench_sim_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    args = ["bench", "sim", "--instances", "2", "--instances", "3", "--requests", "20"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [r["instances"] for r in json.loads(res.stdout)["results"]] == [2, 3]
    err = plain(res.stderr)
    assert "bench sim" in err and "2/2" in err
    assert err.strip().splitlines()[-1].startswith("sim: 2 instances x 20 requests")


def test_bench_migration_stdout_is_the_json_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real llumlet processes (one secure phase, one length): one progress step per migration pair."""
    monkeypatch.setenv("LLUMNIX_PROGRESS", "1")
    args = ["bench", "migration", "--lengths", "64", "--repeats", "1", "--transport", "tcp", "--security", "mtls"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [row["seq_len"] for row in json.loads(res.stdout)["rows"]] == [64]
    err = plain(res.stderr)
    assert "bench migration" in err and "1/1" in err
    assert err.strip().splitlines()[-1].startswith("migration (mtls) downtime ms 64:")
