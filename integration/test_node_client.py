"""The Node/TypeScript client (clients/node) against a live, secure `llumnix serve` cluster (mutual TLS, API keys, as
serve runs by default), run by `npm test`. The Node client finds the cluster and its credentials in the client context
file serve writes (here into the test's folder, never the user's).

Its tests stream a completion, follow a live migration token-exact, call the admin API and survive a graceful and a
SIGKILLed leader change (the Node test kills the leader by the pid serve reports in serve.json). Skipped only where
node/npm are absent (under CI=true that skip fails the run: node is on the CI machines). `npm ci` runs when
node_modules is missing or older than package-lock.json. A second test checks that the committed generated code
(clients/node/gen) is what buf generates from protos/ today.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyllumnix.infra.security.ca import CertificateAuthority, Identity
from pyllumnix.tools.launch import Component, Launcher

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "clients" / "node"
VENV_BIN = Path(sys.executable).parent
NODE = shutil.which("node")
NPM = shutil.which("npm")

needs_node = pytest.mark.skipif(NODE is None or NPM is None, reason="node/npm not installed")


def run_in_group(args: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs a command in its own process group; on timeout the whole group (npm, node, a serve it started) goes."""
    proc = subprocess.Popen(
        args, cwd=NODE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} timed out after {timeout:g} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def node_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # buf, llumnix
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """clients/node/node_modules, installed from package-lock.json by `npm ci` unless already current."""
    assert NPM is not None
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        done = run_in_group([NPM, "ci", "--no-audit", "--no-fund"], env=node_env(), timeout=600)
        assert done.returncode == 0, done.stdout[-4000:]
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Component]:
    launcher = Launcher(tmp_path_factory.mktemp("node-serve"))
    serve = launcher.start(
        "serve",
        "serve",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--transport",
        "tcp",
        "--log-dir",
        str(launcher.log_dir / "components"),
        "--context",
        str(launcher.log_dir / "context.yaml"),
        timeout=120,
        env={"LLUMNIX_INSECURE": ""},  # serve decides for itself: secure, its own PKI under the log dir
    )
    try:
        yield serve
    finally:
        assert serve.terminate(30) == 0, serve.log()[-2000:]


@needs_node
def test_generated_code_matches_the_protos(node_modules: Path, tmp_path: Path) -> None:
    """gen/ is committed; regenerating from protos/ must give the same files (else run `npm run generate`)."""
    done = run_in_group(
        [str(VENV_BIN / "buf"), "generate", "--template", "buf.gen.yaml", "-o", str(tmp_path), str(ROOT / "protos")],
        env=node_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout
    fresh, committed = tmp_path / "gen", NODE_DIR / "gen"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*.ts"))
    committed_files = sorted(p.relative_to(committed) for p in committed.rglob("*.ts"))
    assert fresh_files == committed_files
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, [str(p) for p in fresh_files], shallow=False)
    assert not mismatch and not errors, f"clients/node/gen is stale ({mismatch or errors}): run `npm run generate`"


def tls_material(directory: Path) -> Path:
    """The project's CA, a scheduler (server) certificate and an admin (client) certificate, for the Node TLS tests."""
    ca = CertificateAuthority.create()
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    ca.issue(Identity("default", "scheduler", "s-0")).write(directory, directory / "ca.pem", name="server")
    ca.issue(Identity("default", "admin", "ops")).write(directory, directory / "ca.pem", name="client")
    return directory


@needs_node
def test_node_client_against_a_live_cluster(node_modules: Path, cluster: Component, tmp_path: Path) -> None:
    assert NPM is not None
    assert cluster.ready.get("secure") is True, cluster.ready
    env = node_env(
        LLUMNIX_FRONTENDS=str(cluster.ready["grpc"]),
        LLUMNIX_SCHEDULERS=",".join(cluster.ready["schedulers"]),
        LLUMNIX_SERVE_STATUS=str(cluster.ready["status_file"]),
        LLUMNIX_CONTEXT_FILE=str(cluster.ready["context"]),
        LLUMNIX_TEST_TLS_DIR=str(tls_material(tmp_path)),
    )
    done = run_in_group([NPM, "test"], env=env, timeout=480)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-8000:]
    # every Node test ran (none skipped for want of the cluster or the TLS material) and passed
    counts = dict(re.findall(r"^# (tests|pass|fail|skipped|cancelled) (\d+)$", done.stdout, re.MULTILINE))
    assert counts.get("fail") == "0" and counts.get("skipped") == "0" and counts.get("cancelled") == "0", counts
    assert int(counts.get("pass", "0")) >= 15, counts
