"""Under CI a skipped test fails the run (root conftest.py), so a missing dependency cannot silently skip its tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_module_skip.py").write_text("import pytest\n\npytest.importorskip('no_such_module_xyz')\n")
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n"
        "def test_skips():\n    pytest.skip('frobnicator not installed')\n\n"
        "@pytest.mark.skipif(True, reason='marker skip')\ndef test_marked():\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_skips_fail_under_ci(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, "true")
    # a skip in a test body, in a skipif marker, and a module's importorskip: each one fails the run
    assert done.returncode != 0, done.stdout + done.stderr
    for reason in ("frobnicator not installed", "marker skip", "no_such_module_xyz"):
        assert "unexpected skip under CI (" in done.stdout and reason in done.stdout, done.stdout


def test_skips_stay_skips_outside_ci(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 skipped" in done.stdout, done.stdout
