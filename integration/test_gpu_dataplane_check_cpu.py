"""The GPU check's two-process migration (integration/gpu_dataplane_check.py), run on this host's CPU: the same
choreography, layouts, real transports and hash verification, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyllumnix.data_plane.transport import ucx_available

pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parent / "gpu_dataplane_check.py"


def test_two_processes_migrate_between_layer_major_and_block_major(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    transports = "ucx,tcp" if ucx_available() else "tcp,tcp"
    args = ["--device", "cpu", "--blocks", "40", "--migrate", "12", "--transports", transports, "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["migrations"]) == 2
    for m in report["migrations"]:
        assert m["hashes_equal"] and m["nonzero"], m
        assert m["sent"]["nbytes"] == m["received"]["nbytes"] == 12 * 32 * 65536
    assert {m["direction"] for m in report["migrations"]} == {
        "layer-major -> block-major",
        "block-major -> layer-major",
    }
    assert all(info["fused"] for info in report["layouts"])
    assert "dtype" in report["mismatch_refused"]


def test_cuda_on_a_gpu_less_host_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda"], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "no usable CUDA GPU" in proc.stderr
