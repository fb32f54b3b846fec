"""Smoke test of ``llumnix bench dataplane`` with small numbers: real child processes, real transports, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_bench_dataplane_device_cuda_without_a_gpu_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    result = CliRunner().invoke(cli, ["bench", "dataplane", "--device", "cuda"])
    assert result.exit_code != 0
    assert "no usable CUDA GPU" in result.output


def test_bench_dataplane_device_rows_on_cpu(tmp_path: Path) -> None:
    """``--device cpu`` runs the device rows that need no GPU: the kernels, the old host-staged path, UCX."""
    pytest.importorskip("torch")
    out = tmp_path / "device.json"
    transports = "ucx" if ucx_available() else "tcp"
    args = ["bench", "dataplane", "--device", "cpu", "--sizes", "2", "--transports", transports, "--repeat", "1"]
    result = CliRunner().invoke(cli, [*args, "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("dataplane cpu 2MiB GiB/s:")
    report = json.loads(out.read_text())
    for name in ("device_copy", "gather", "gather_per_layer", "scatter", "host_staged"):
        assert report["gib_s"][name]["2"] > 0, name
    assert report["skipped"]["cuda_ipc_copy"] == "needs a CUDA device"
    if ucx_available():
        assert report["gib_s"]["ucx_host"]["2"] > 0
        assert report["ucx_lane"]["transports"], "UCX_PROTO_INFO tables must name a lane"
