"""Generates the code for protos/ (one command: ``python -m pyllumnix.tools.gen_protos``, ``make protos``): the
Python modules and the Node/TypeScript client's ``clients/node/gen`` (buf with ts-proto), so neither client can fall
behind the schema.

protoc writes absolute imports named after the proto path (``from llumnix.v1 import common_pb2``); they are rewritten
to the installed namespace (``pyllumnix.protos.llumnix.v1``) so the generated code imports from the one distribution.
``--check`` regenerates both into a temporary folder and fails if the committed files differ (CI's drift check,
``make protos-check``).

The TypeScript generator is the ts-proto plugin pinned in ``clients/node/package-lock.json``; when
``clients/node/node_modules`` is missing or older than the lock file it is installed with ``npm ci`` (the same install
``make test``'s Node client test does, so no other network access). Without node/npm the TypeScript part is skipped
with a note, and fails under ``CI=true`` (node is on the CI machines); ``--no-ts`` skips it on purpose.
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
NODE_DIR = REPO / "clients" / "node"
TS_GEN = NODE_DIR / "gen"
TS_PLUGIN = NODE_DIR / "node_modules" / ".bin" / "protoc-gen-ts_proto"


class TsUnavailableError(Exception):
    """The TypeScript generator cannot run here (no node/npm or buf)."""


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


def _tool_env() -> dict[str, str]:
    """PATH with the venv's bin first (buf lives there when installed into the venv)."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def ensure_ts_plugin() -> None:
    """Installs clients/node's pinned dependencies (ts-proto among them) with ``npm ci`` unless they are current."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise TsUnavailableError("node/npm not installed")
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if TS_PLUGIN.exists() and stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    print("installing clients/node dependencies (npm ci) for the TypeScript generator", file=sys.stderr)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600, stdout=sys.stderr)


def generate_ts(out: Path) -> list[Path]:
    """Generates the Node client's TypeScript into ``out/gen`` (buf + ts-proto, clients/node/buf.gen.yaml); returns
    the files written, relative to ``out/gen``."""
    ensure_ts_plugin()
    env = _tool_env()
    buf = shutil.which("buf", path=env["PATH"])
    if buf is None:
        raise TsUnavailableError("buf not installed (it comes with the dev extra: pip install -e '.[dev]')")
    cmd = [buf, "generate", "--template", "buf.gen.yaml", "-o", str(out), str(PROTOS)]
    subprocess.run(cmd, cwd=NODE_DIR, check=True, env=env, timeout=300)
    return sorted(p.relative_to(out / "gen") for p in (out / "gen").rglob("*.ts"))


def _ts_committed() -> set[Path]:
    return {p.relative_to(TS_GEN) for p in TS_GEN.rglob("*.ts")} if TS_GEN.is_dir() else set()


def sync_ts(check: bool) -> int:
    """Regenerates clients/node/gen (``check``: only compares); 0 when up to date or written, 1 when stale."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fresh = set(generate_ts(out))
        committed = _ts_committed()
        if check:
            stale = sorted(
                str(rel)
                for rel in fresh | committed
                if rel not in fresh
                or rel not in committed
                or not filecmp.cmp(out / "gen" / rel, TS_GEN / rel, shallow=False)
            )
            if stale:
                print(
                    "clients/node/gen differs from protos/ (run: make protos):",
                    *(f"clients/node/gen/{s}" for s in stale),
                    sep="\n  ",
                )
                return 1
            print(f"TypeScript client code is up to date ({len(fresh)} files)")
            return 0
        for rel in committed - fresh:
            (TS_GEN / rel).unlink()
        for rel in fresh:
            (TS_GEN / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "gen" / rel, TS_GEN / rel)
        print(f"wrote {len(fresh)} files under {TS_GEN}")
    return 0


def ts_step(check: bool) -> int:
    """The TypeScript half of a run: skipped with a note where node/npm/buf are missing, except under CI."""
    try:
        return sync_ts(check)
    except TsUnavailableError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            print(f"TypeScript client not generated: {exc} (CI must check clients/node/gen)", file=sys.stderr)
            return 1
        print(f"NOTE: TypeScript client not generated/checked: {exc}", file=sys.stderr)
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"TypeScript generation failed: {' '.join(map(str, exc.cmd))} exited {exc.returncode}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed generated code is stale")
    parser.add_argument("--no-ts", action="store_true", help="only the Python code (not clients/node/gen)")
    args = parser.parse_args(argv)
    python = _python_step(args.check)
    ts = 0 if args.no_ts else ts_step(args.check)
    return python or ts


def _python_step(check: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fresh = {p.relative_to(out) for p in generate(out)}
        if check:
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
