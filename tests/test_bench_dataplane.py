"""Smoke test of ``llumnix bench dataplane`` with small numbers: real child processes, real transports, seconds."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pyllumnix.data_plane.transport import ucx_available
from pyllumnix.tools.cli import cli


def test_bench_dataplane_reports_every_reference_and_transport(tmp_path: Path) -> None:
    out = tmp_path / "dataplane.json"
    kinds = ["tcp", "inproc"] + (["ucx"] if ucx_available() else [])
    args = ["bench", "dataplane", "--sizes", "1", "--transports", ",".join(kinds), "--repeat", "1", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("dataplane 16MiB GiB/s:")
    report = json.loads(out.read_text())
    for name in ("memcpy", "memcpy_ring", "socket", *kinds):
        assert report["gib_s"][name]["1"] > 0, name
    assert set(report["meets"]) == set(report["targets"]) == {"ucx16_over_memcpy_ring16", "ucx16_over_socket16"}
    assert report["skipped"] == {}
