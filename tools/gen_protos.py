"""Generates the Python code for protos/ (one command: ``python -m pyllumnix.tools.gen_protos``).

protoc writes absolute imports named after the proto path (``from llumnix.v1 import common_pb2``); they are rewritten
to the installed namespace (``pyllumnix.protos.llumnix.v1``) so the generated code imports from the one distribution.
``--check`` regenerates into a temporary folder and fails if the committed files differ (CI's drift check).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
# Proto trees generated into Python: (root handed to protoc as -I, sub-folder of proto files, import prefix).
TREES: tuple[tuple[Path, str], ...] = (
    (PROTOS, "llumnix"),
    (PROTOS / "third_party", "etcd"),
)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _rewrite_imports(text: str, prefix: str) -> str:
    # "from llumnix.v1 import x_pb2" / "import llumnix.v1.x_pb2" -> under pyllumnix.protos[.third_party]
    text = re.sub(
        r"^from (llumnix|etcd)(\.[\w.]+)? import",
        lambda m: f"from {prefix}.{m.group(1)}{m.group(2) or ''} import",
        text,
        flags=re.M,
    )
    text = re.sub(r"^import (llumnix|etcd)\.", lambda m: f"import {prefix}.{m.group(1)}.", text, flags=re.M)
    return text


def generate(out: Path) -> list[Path]:
    """Generates every tree into ``out`` (mirroring protos/); returns the files written."""
    written: list[Path] = []
    for root, sub in TREES:
        src = root / sub
        if not src.is_dir():
            continue
        files = sorted(p.relative_to(root).as_posix() for p in src.rglob("*.proto"))
        rel_root = root.relative_to(PROTOS)
        dest = out / rel_root
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={dest}",
            f"--grpc_python_out={dest}",
            f"--mypy_out={dest}",
            f"--mypy_grpc_out={dest}",
            *files,
        ]
        # protoc finds the mypy plugins on PATH; the venv's bin folder is not on it when run as .venv/bin/python.
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        prefix = "pyllumnix.protos" + ("" if str(rel_root) == "." else "." + ".".join(rel_root.parts))
        for path in sorted((dest / sub).rglob("*")):
            if path.is_dir():
                (path / "__init__.py").touch()
            elif path.name.endswith(GENERATED_SUFFIXES):
                path.write_text(_rewrite_imports(path.read_text(), prefix))
                written.append(path)
        (dest / sub / "__init__.py").touch()
        written.extend(sorted((dest / sub).rglob("__init__.py")))
    return written


def _generated_in_repo() -> set[Path]:
    found: set[Path] = set()
    for root, sub in TREES:
        if (root / sub).is_dir():
            for p in (root / sub).rglob("*"):
                if p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py":
                    found.add(p.relative_to(PROTOS))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fresh = {p.relative_to(out) for p in generate(out)}
        if args.check:
            stale = sorted(
                str(rel)
                for rel in fresh | _generated_in_repo()
                if not (out / rel).exists()
                or not (PROTOS / rel).exists()
                or not filecmp.cmp(out / rel, PROTOS / rel, shallow=False)
            )
            if stale:
                print(
                    "generated code differs from protos/ (run: python -m pyllumnix.tools.gen_protos):",
                    *stale,
                    sep="\n  ",
                )
                return 1
            print(f"generated code is up to date ({len(fresh)} files)")
            return 0
        for rel in _generated_in_repo() - fresh:
            (PROTOS / rel).unlink()
        for rel in fresh:
            (PROTOS / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, PROTOS / rel)
        print(f"wrote {len(fresh)} files under {PROTOS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
