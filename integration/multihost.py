"""Two emulated hosts on one machine: network namespaces joined by a veth pair, each with its own Ray node.

Host A (``<prefix>.1``) runs the Ray head and etcd; host B (``<prefix>.2``) a Ray worker. Each Ray node runs under
``unshare --pid --fork --mount-proc``, so killing that PID namespace's init (by PID) stops exactly that host, never
another Ray on the machine. The subnet (``10.77.<n>``) and the names are unique per run. Everything is removed on
exit, also when a test fails: the namespaces' inits and etcd are killed by PID, the namespaces deleted (the veth pair
goes with them). Traffic stays inside these namespaces.

The Ray cluster authenticates with a token of its own (``RAY_AUTH_MODE=token``, a fresh token in the work folder named
by ``RAY_AUTH_TOKEN_PATH``, in every Ray and driver process's environment): Ray otherwise reads ``~/.ray/auth_token``,
and a token some earlier Ray run left there switched the head to token mode while the drivers sent none
(InvalidAuthToken). Nothing here reads or writes the user's ``~/.ray``.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyllumnix.infra.etcd.embedded import etcd_binary

VENV_BIN = Path(sys.executable).parent
RAY_PORT = 6379
HOST_CPUS = 4  # Ray CPUs per emulated host (room for a test's extra placements beside the scheduler's instances)
ETCD_PORT = 2379


class NamespacesUnavailable(Exception):
    """This machine cannot create network namespaces (not root, no ``ip``): the tests skip with this reason."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def can_create_namespaces() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"llxprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"ip netns add failed: {e}"
    with contextlib.suppress(Exception):
        _ip("netns", "del", probe)
    return None


def _pidns_init(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """The PID (in our namespace) of the init of the PID namespace ``unshare --fork`` created under ``proc``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
        if proc.poll() is not None:
            raise RuntimeError(f"unshare exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("unshare did not fork its PID namespace's init")


@dataclass
class Host:
    name: str  # network namespace
    ip: str
    veth: str
    init_pid: int | None = None  # of its Ray node's PID namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, *cmd: str, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*cmd), check=False, capture_output=True, text=True, timeout=timeout, env=env)

    def spawn(self, *cmd: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.argv(*cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        self.procs.append(proc)
        return proc

    def link_down(self) -> None:
        """Emulates the host vanishing from the network (its processes keep running, unreachable)."""
        _ip("-n", self.name, "link", "set", self.veth, "down")

    def stop_ray(self) -> None:
        """Kills this host's Ray node: the init of its PID namespace (the kernel then kills the rest of it)."""
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            self.init_pid = None


@dataclass
class TwoHosts:
    a: Host
    b: Host
    workdir: Path
    etcd: str = ""

    @property
    def ray_token_path(self) -> Path:
        """This cluster's Ray authentication token (made by ``two_hosts``, removed with the work folder)."""
        return self.workdir / "ray-auth-token"

    @property
    def ray_address(self) -> str:
        return f"{self.a.ip}:{RAY_PORT}"

    def env(self) -> dict[str, str]:
        """The environment for Ray and llumnix processes here: fast node-death detection (3 s, not 64 s)."""
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)  # a caller's token would take precedence over the path
        env.update(
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="500",
            RAY_health_check_failure_threshold="3",
            RAY_USAGE_STATS_ENABLED="0",
            # The cluster's own token, never the user's ~/.ray/auth_token (see the module docstring).
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.ray_token_path),
            PYTHONUNBUFFERED="1",
            # Both emulated hosts are one kernel: UCX would take them for one host and pick shared memory / CMA,
            # which cannot cross the PID namespaces ("Endpoint timeout"); real separate hosts reach each other only
            # over the network, as here.
            UCX_TLS="tcp,self",
        )
        return env


def _ray_start(host: Host, resource: str, head_address: str | None, log: Path, env: dict[str, str]) -> None:
    cmd = [
        "unshare", "--pid", "--fork", "--mount-proc",
        str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", host.ip,
        "--num-cpus", str(HOST_CPUS), "--object-store-memory", "100000000", "--disable-usage-stats",
        "--resources", f'{{"{resource}": 1}}',
    ]  # fmt: skip
    if head_address is None:
        cmd += ["--head", "--port", str(RAY_PORT), "--include-dashboard=false"]
    else:
        cmd += ["--address", head_address]
    proc = host.spawn(*cmd, log=log, env=env)
    host.init_pid = _pidns_init(proc)


def wait_in(host: Host, address: str, timeout: float) -> None:
    """Waits until a TCP ``address`` answers from inside ``host``."""
    h, p = address.rsplit(":", 1)
    probe = (
        "import socket,sys,time\n"
        f"d=time.monotonic()+{timeout}\n"
        "while True:\n"
        "  try:\n"
        f"    socket.create_connection(({h!r},{p}),1).close(); break\n"
        "  except OSError:\n"
        "    if time.monotonic()>d: sys.exit(1)\n"
        "    time.sleep(0.2)\n"
    )
    done = host.run(sys.executable, "-c", probe, timeout=timeout + 10)
    if done.returncode != 0:
        raise RuntimeError(f"{address} did not answer from {host.name} within {timeout}s")


@contextlib.contextmanager
def two_hosts(workdir: Path | None = None) -> Iterator[TwoHosts]:
    """Makes the namespaces, the veth pair, etcd and Ray on A, a Ray worker on B; removes all of it on exit."""
    why = can_create_namespaces()
    if why is not None:
        raise NamespacesUnavailable(why)
    tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
    n = random.randrange(1, 255)
    prefix = f"10.77.{n}"
    # A folder made here is removed on exit (every CI run left one in /tmp); a caller's folder is the caller's.
    owned = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="llx-multihost-"))
    hosts = TwoHosts(
        Host(f"llx{tag}a", f"{prefix}.1", f"lx{tag}a"), Host(f"llx{tag}b", f"{prefix}.2", f"lx{tag}b"), work
    )
    made: list[str] = []
    try:
        for host in (hosts.a, hosts.b):
            _ip("netns", "add", host.name)
            made.append(host.name)
        _ip("link", "add", hosts.a.veth, "type", "veth", "peer", "name", hosts.b.veth)
        for host in (hosts.a, hosts.b):
            _ip("link", "set", host.veth, "netns", host.name)
            _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", host.veth)
            _ip("-n", host.name, "link", "set", host.veth, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        # As `ray get-auth-token --generate` makes one (256 random bits, hex), created readable by the owner only.
        with open(os.open(hosts.ray_token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as token:
            token.write(secrets.token_hex(32))
        env = hosts.env()
        hosts.etcd = f"{hosts.a.ip}:{ETCD_PORT}"
        hosts.a.spawn(
            str(etcd_binary()),
            f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls=http://{hosts.etcd}",
            f"--advertise-client-urls=http://{hosts.etcd}",
            f"--listen-peer-urls=http://{hosts.a.ip}:2380",
            f"--initial-advertise-peer-urls=http://{hosts.a.ip}:2380",
            f"--initial-cluster=default=http://{hosts.a.ip}:2380",
            log=work / "etcd.log",
        )
        _ray_start(hosts.a, "host_a", None, work / "ray-a.log", env)
        wait_in(hosts.a, hosts.ray_address, 60)
        wait_in(hosts.a, hosts.etcd, 30)
        _ray_start(hosts.b, "host_b", hosts.ray_address, work / "ray-b.log", env)
        yield hosts
    finally:
        for host in (hosts.a, hosts.b):
            host.stop_ray()
            for proc in host.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for name in made:
            with contextlib.suppress(Exception):
                _ip("netns", "del", name)
        hosts.ray_token_path.unlink(missing_ok=True)  # also from a caller's folder: a credential outlives nothing
        if owned:
            shutil.rmtree(work, ignore_errors=True)
