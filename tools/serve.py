"""``llumnix serve``: a complete local cluster in one command.

Embedded etcd (unless ``--etcd`` is given), scheduler replicas (default 2, so failover works out of the box), N
llumlets (default 4: the simulated engine with the LLaMA-7B-on-A10 latency profile, in real time) and a frontend
(OpenAI HTTP API + gRPC). Each component is a child process in its own process group with its own log file under
``--log-dir``.

serve supervises them: every exit is logged with its exit code or signal and the tail of the component's log; a
crashed component is restarted with backoff (0.5 s doubling to 30 s; a scheduler replica and the frontend on their
first addresses, a llumlet as a new instance ``instance-<i>-r<n>``); a llumlet that exits 0 (drained) stays gone.
Ctrl-C/SIGTERM/SIGHUP stops everything in reverse order (frontend, llumlets, scheduler replicas, which stop the
llumlets their provider started, then etcd), each through its process group; a second signal SIGKILLs what is left.
The ready line (stdout) and ``<log-dir>/serve.json`` (rewritten on every change) list each component with its pid,
process group, address and restarts, so operators and tests signal processes by pid, never by name.

Secure by default: serve makes (or reuses) a local PKI and alone holds its CA key; every child is started with a
folder of its own (``<log-dir>/certs/<role>-<id>``: the CA certificate, its certificate and key), and the llumlets a
scheduler replica's provider starts get theirs from serve's issuer (``infra.security.issuer``), so no child is given a
way to mint certificates.

A YAML ``--config`` file may set any option (keys are the option names with dashes or underscores); flags given on
the command line win over the file.

The sim engine's KV payload is scaled down by default (``--bytes-per-token 8192``: 128 KiB blocks instead of 7B's
8 MiB), so four instances fit in a laptop's memory; the latency model stays LLaMA-7B. Pass ``--bytes-per-token
524288`` for full-size KV.

``--engine vllm --model PATH`` serves a real model (a local Hugging Face directory) with vLLM V1: every llumlet gets
``--engine vllm --model PATH --max-model-len N`` and the CPU settings that work on a small machine (one OpenMP thread
per instance, no thread pinning, in-process engine core, offline hub; any already set in the environment win), and the
frontend gets the model's own tokenizer (``--tokenizer hf``) and the same maximum length. The OpenAI model id is PATH.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from pyllumnix.infra.etcd.embedded import EmbeddedEtcd, Member
from pyllumnix.infra.grpc_server import advertised_host
from pyllumnix.infra.processes import describe_exit
from pyllumnix.tools.launch import CLIENT_ENV, SECURITY_ENV, Component, Launcher, LaunchError, libc, signal_group, spawn

DEFAULTS: dict[str, Any] = {
    "etcd": "",
    "cluster": "default",
    "schedulers": 2,
    "llumlets": 4,
    "engine": "sim",
    "profile": "llama-7b-a10",
    "model": "",
    "max_model_len": 0,
    "bytes_per_token": 8192,
    "transport": "auto",
    "host": "127.0.0.1",
    "https": None,  # the frontend's default: HTTPS when secure and --host is not loopback
    "http_port": 8000,
    "grpc_port": 50051,
    "log_dir": "",
    "provider": "local",
    "ray_address": "",
    "llumlet_args": "",
    "insecure": False,
    "tls_dir": "",
    "context": "",
}


def load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option: value", param_hint="--config")
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise click.BadParameter(f"unknown keys in {path}: {', '.join(unknown)}", param_hint="--config")
    return config


def resolve(ctx: click.Context, file_config: dict[str, Any]) -> dict[str, Any]:
    """Defaults < config file < flags given on the command line (or their environment variables)."""
    merged = dict(DEFAULTS)
    merged.update(file_config)
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if name in DEFAULTS and source in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        ):
            merged[name] = value
    return merged


# vLLM on a CPU machine (docs: PLATFORM.md): one OpenMP thread per instance and no pinning, or instances fight over
# the cores; the engine core in the llumlet's process; no hub access; quiet logs.
VLLM_CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
VLLM_MAX_MODEL_LEN = 512


def _model_max_len(path: str) -> int | None:
    """The model's own limit (config.json's max_position_embeddings), when it has one."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def engine_settings(opts: dict[str, Any]) -> tuple[list[str], list[str], dict[str, str]]:
    """(llumlet args, frontend args, environment of every child) for the chosen engine."""
    engine = str(opts["engine"])
    if engine == "vllm":
        model = str(opts["model"])
        if not model:
            raise click.UsageError("--engine vllm needs --model PATH (a local Hugging Face model directory)")
        max_len = int(opts["max_model_len"] or 0)
        if not max_len:
            max_len = min(VLLM_MAX_MODEL_LEN, _model_max_len(model) or VLLM_MAX_MODEL_LEN)
        llumlet = ["--engine", "vllm", "--model", model, "--max-model-len", str(max_len)]
        frontend = ["--model", model, "--tokenizer", "hf", "--tokenizer-path", model, "--max-model-len", str(max_len)]
        env = {k: v for k, v in VLLM_CPU_ENV.items() if k not in os.environ}
        return llumlet, frontend, env
    llumlet = ["--engine", engine, "--profile", str(opts["profile"])]
    if opts["bytes_per_token"]:
        llumlet += ["--bytes-per-token", str(opts["bytes_per_token"])]
    if opts["model"] and engine != "sim":
        llumlet += ["--model", str(opts["model"])]
    frontend = ["--model", str(opts["model"] or opts["profile"])]
    if engine == "sim":
        from pyllumnix.data_plane.engine.profile import get_profile

        max_len = int(opts["max_model_len"] or 0) or get_profile(str(opts["profile"])).max_model_len
        frontend += ["--max-model-len", str(max_len)]
    return llumlet, frontend, {}


SCHEDULER_STOP_FLAG = "--stop-instances-on-exit"
# Restart backoff of a crashed component: 0.5 s, doubling per consecutive crash, at most 30 s; a component that ran
# for RESET_AFTER seconds starts again from the shortest delay.
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
RESET_AFTER = 30.0
STOP_TIMEOUT = 10.0
# A scheduler replica stops the llumlets its provider started before it exits (up to its own --stop-timeout, 10 s).
SCHEDULER_STOP_TIMEOUT = 25.0
# Seconds between two scans of /proc for orphans re-parented to serve. A scan reads every process's stat file (~4 ms
# with ~100 processes); at every 0.5 s tick it was all of serve's CPU while the cluster served (~1 % of a core).
# Between scans, an exited orphan is still noticed at the next tick (``_unknown_child_exited``).
ADOPT_SCAN_S = 10.0
PR_SET_CHILD_SUBREAPER = 36

log = logging.getLogger("pyllumnix.serve")


class ServeEtcd(EmbeddedEtcd):
    """The embedded etcd member in its own session (Ctrl-C reaches serve only, which stops etcd last) and SIGTERMed
    by the kernel should serve die."""

    def _spawn(self, m: Member, state: str) -> None:
        m.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(m.log_path, "ab") as out:
            withheld = (*SECURITY_ENV, *CLIENT_ENV)  # etcd is given its files only, and no client credentials
            env = {k: v for k, v in os.environ.items() if k not in withheld}
            m.process = spawn(
                self._command(m, state), stdout=out, stderr=subprocess.STDOUT, env=env, die_with_parent=True
            )


@dataclass
class Child:
    """One supervised component: how to start incarnation n, whether it comes back after a clean exit."""

    name: str
    kind: str  # etcd | scheduler | llumlet | frontend
    launch: Callable[[int], Component]
    # A drained llumlet exits 0 on purpose and stays gone; the other components exit only when told to.
    restart_on_success: bool = True
    comp: Component | None = None
    incarnation: int = 0
    failures: int = 0
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    last_exit: str = ""

    def metrics_address(self) -> str | None:
        comp = self.comp
        if comp is None:
            return None
        if "metrics_address" in comp.ready:
            return str(comp.ready["metrics_address"])
        if "http_url" in comp.ready:
            return str(comp.ready["http_url"]).split("://", 1)[-1].rstrip("/")
        return None

    def metrics_url(self) -> str | None:
        comp = self.comp
        if comp is not None and "http_url" in comp.ready and "metrics_address" not in comp.ready:
            return f"{str(comp.ready['http_url']).rstrip('/')}/metrics"
        address = self.metrics_address()
        return None if address is None else f"http://{address}/metrics"

    def info(self) -> dict[str, Any]:
        comp = self.comp
        state = "stopped"
        if self.restart_at is not None:
            state = "restarting"
        elif comp is not None and comp.alive():
            state = "running"
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": comp.pid if comp is not None else None,
            "pgid": comp.pgid if comp is not None else None,
            "address": comp.ready.get("grpc_address") if comp is not None else None,
            "instance_id": comp.ready.get("instance_id") if comp is not None else None,
            # host:port of its Prometheus /metrics (schedulers, llumlets; the frontend's is on its HTTP port)
            "metrics": self.metrics_address(),
            # the whole URL: the frontend's may be https (a secure frontend bound beyond loopback)
            "metrics_url": self.metrics_url(),
            "log": str(comp.log_path) if comp is not None else None,
            "state": state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc), i.e. processes this process may wait for."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class Supervisor:
    """``llumnix serve``'s process supervisor, single-threaded and signal-safe.

    Signal handlers only append the signal to a list; ``signal.set_wakeup_fd`` writes a byte to a pipe, which the
    loop ``select``s on (SIGCHLD too, so a child's death wakes it at once). Nothing waits on a lock a handler could
    need (a ``threading.Event`` set from a handler deadlocks when the handler interrupts the waiter inside the
    event's own lock). On Linux serve is a child subreaper: llumlets a crashed scheduler replica started are
    re-parented to serve, reaped as they exit and stopped with the rest.
    """

    def __init__(self, opts: dict[str, Any], log_dir: Path) -> None:
        self.opts = opts
        self.log_dir = log_dir
        # Each child gets its security flags (below) and none of serve's client credentials (``$LLUMNIX_CONTEXT``
        # names the admin API key and certificate: serve writes that file, its components need none of it).
        self.launcher = Launcher(log_dir, die_with_parent=True, secure=None, withheld_env=CLIENT_ENV)
        self.pki: Any = None  # ClusterSecurity when secure (the default)
        self.issuer: Any = None  # IssuerServer: the llumlets the scheduler replicas' providers start get theirs here
        self._issue_lock = threading.Lock()
        self._may_issue: dict[int, Component] = {}  # the scheduler replicas' processes, by pid
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.etcd: ServeEtcd | None = None
        self.status_path = log_dir / "serve.json"
        self.state = "starting"
        self.info: dict[str, Any] = {"log_dir": str(log_dir), "pid": os.getpid(), "status_file": str(self.status_path)}
        self.adopted: set[int] = set()
        self._signals_installed = False
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._next_scan = float("-inf")  # time.monotonic() of the next /proc scan for orphans

    # -- signals ----------------------------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_child)
        self._signals_installed = True
        if sys.platform == "linux":
            libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def ignore_late_signals(self) -> None:
        """Once stopped, a further SIGINT/SIGTERM/SIGHUP is ignored: nothing is left to stop, and serve's exit code
        must say how the stop went. Left to Python, interpreter shutdown restores SIGINT/SIGTERM to SIG_DFL before the
        process exits, so a late Ctrl-C (or the rest of a signal storm) killed serve during its own exit."""
        if self._signals_installed:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # no locks here: runs between two bytecodes of whatever the main thread does

    def _on_child(self, _signum: int, _frame: object) -> None:
        """Nothing: the wakeup fd already woke the loop."""

    def stopping(self) -> bool:
        return bool(self.signals)

    def _hurry(self) -> bool:
        """A second Ctrl-C/SIGTERM: SIGKILL what is left instead of waiting."""
        return len(self.signals) > 1

    def _sleep(self, seconds: float) -> None:
        """Waits on the wakeup pipe (a signal or a child's death cuts it short)."""
        if seconds > 0:
            select.select([self._wake_r], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        info = dict(self.info)
        info["state"] = self.state
        info["components"] = [c.info() for c in self.children]
        info["instances"] = [
            c.comp.ready["instance_id"]
            for c in self.children
            if c.kind == "llumlet" and c.comp is not None and c.comp.alive() and "instance_id" in c.comp.ready
        ]
        return info

    def write_status(self) -> None:
        """``<log-dir>/serve.json``: every component with its pid, process group, address, state and restarts,
        replaced atomically on every change (for operators and tests: signal what you mean by PID)."""
        tmp = self.status_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        os.replace(tmp, self.status_path)

    # -- starting ---------------------------------------------------------------------------------------------
    def add(self, child: Child) -> Child:
        """Starts a child's first incarnation and supervises it from then on."""
        self.children.append(child)
        child.started_at = time.monotonic()
        try:
            child.comp = child.launch(0)
        finally:
            self.write_status()
        log.info("started %s (pid %d)%s", child.name, child.comp.pid, self._where(child.comp))
        return child

    @staticmethod
    def _where(comp: Component) -> str:
        address = comp.ready.get("grpc_address")
        return f" at {address}" if address else ""

    def _launcher_start(
        self, name: str, args: list[str], timeout: float, env: dict[str, str], *, may_issue: bool = False
    ) -> Component:
        comp = self.launcher.spawn(name, *args, env=env)
        if may_issue:  # from its first instruction: its provider may ask before it is ready
            self._may_issue = {pid: c for pid, c in self._may_issue.items() if c.alive()} | {comp.pid: comp}
        # The launcher keeps only live incarnations; serve stops children itself, tier by tier.
        self.launcher.components = [c for c in self.launcher.components if c.alive()]
        comp.ready = self.launcher.wait_ready(comp, timeout, self.stopping)
        return comp

    def setup_security(self) -> None:
        """Secure by default: a local PKI (CA reused across restarts of serve) with a certificate for every component.
        serve alone holds the CA key: each child gets a folder with only its own certificate and key and the CA
        certificate (:meth:`security_flags`), and the llumlets a scheduler replica's provider starts are issued by
        serve too (:meth:`start_issuer`). ``--insecure``: none of it, with a warning."""
        opts = self.opts
        if opts["insecure"]:
            log.warning("--insecure: plaintext gRPC and etcd, no certificates, no API keys; for isolated development")
            self.info["secure"] = False
            return
        from pyllumnix.infra.security.bootstrap import RBAC_FILE, bootstrap_local

        tls_dir = Path(str(opts["tls_dir"])) if opts["tls_dir"] else self.log_dir / "pki"
        # An earlier serve's etcd roles: certificates issued before this run's etcd is up must not wait on that one;
        # the embedded etcd's start sets them up again for every certificate (start_cluster).
        (tls_dir / RBAC_FILE).unlink(missing_ok=True)
        cluster = str(opts["cluster"])
        components = {
            "etcd": ["etcd"],
            "scheduler": [f"scheduler-{i}" for i in range(int(opts["schedulers"]))],
            "frontend": ["f0"],
            "admin": ["admin"],
        }
        host = str(opts["host"])
        # A wildcard bind advertises the host name: peers check the certificates against it.
        hosts = ["localhost", "127.0.0.1", "::1", advertised_host(host).strip("[]")]
        self.pki = bootstrap_local(
            tls_dir,
            cluster,
            components=components,
            llumlets=[f"instance-{i}" for i in range(int(opts["llumlets"]))],
            hosts=hosts,
        )
        self.pki.handout_root = self.log_dir / "certs"
        self.info["secure"] = True
        self.info["tls_dir"] = str(tls_dir)

    def hand_out(self, role: str, id: str, hosts: Sequence[str] = ()) -> Any:
        """A child's own files (``CertPaths``) in its folder under ``<log-dir>/certs``, issued if need be (with its
        etcd user under etcd auth); serve's main loop and the issuer's thread both issue, one at a time."""
        with self._issue_lock:
            return self.pki.hand_out(role, id, hosts)

    def certify(self, role: str, id: str, hosts: Sequence[str], public_key_pem: bytes) -> tuple[bytes, bytes]:
        """(CA, certificate) PEMs for a key a Ray-placed llumlet made on its node; one issue at a time, as above."""
        assert self.pki is not None
        with self._issue_lock:
            ca_pem, cert_pem = self.pki.certify(role, id, hosts, public_key_pem)
            return bytes(ca_pem), bytes(cert_pem)

    def security_flags(self, role: str, id: str) -> list[str]:
        """A child's security flags: its own folder (no CA key, no other component's key), or ``--insecure``."""
        if self.pki is None:
            return ["--insecure"]
        return ["--tls-dir", str(self.hand_out(role, id).cert.parent)]

    def start_issuer(self) -> dict[str, str]:
        """Serves certificates to the scheduler replicas' providers (llumlets only, to serve's scheduler processes
        only); returns the environment that tells a replica where to ask."""
        if self.pki is None or self.opts["provider"] == "none":
            return {}
        from pyllumnix.infra.security.issuer import ISSUER_ENV, IssuerServer

        def may_ask(pid: int) -> bool:
            comp = self._may_issue.get(pid)
            return comp is not None and comp.alive()

        self.issuer = IssuerServer(self.hand_out, may_ask, certify=self.certify).start()
        return {ISSUER_ENV: str(self.issuer.path)}

    def provision_admin(self) -> None:
        """Creates the admin API key (in etcd, hashed) and writes the client context file (0600) that ``llmctl`` and
        the client library read when given no flags."""
        if self.pki is None:
            return
        import asyncio

        from pyllumnix.infra.etcd.keys import KeyLayout
        from pyllumnix.infra.security import runtime
        from pyllumnix.infra.security.apikeys import ApiKeyStore
        from pyllumnix.infra.security.bootstrap import provision_admin

        paths = self.pki.ensure("admin", "admin")
        admin = runtime.SecuritySettings(paths, runtime.identity_of(paths.cert))
        etcd = [e for e in str(self.info["etcd"]).split(",") if e]

        async def provision() -> tuple[str, Path]:
            client = runtime.etcd_client(etcd, admin)
            try:
                store = ApiKeyStore(client, KeyLayout(str(self.opts["cluster"])))
                return await provision_admin(
                    self.pki,
                    store,
                    context_path=str(self.opts["context"]) or None,
                    scheduler=list(self.info["schedulers"]),
                    frontend=[str(self.info["grpc"])],
                    http=str(self.info["http"]),
                    etcd=etcd,
                )
            finally:
                await client.close()

        _, path = asyncio.run(provision())
        self.info["context"] = str(path)

    def start_cluster(self) -> None:
        opts = self.opts
        engine_args, frontend_args, env = engine_settings(opts)
        self.setup_security()
        etcd_endpoints = str(opts["etcd"])
        if not etcd_endpoints:
            etcd_tls = None
            if self.pki is not None:
                from pyllumnix.infra.etcd.embedded import EtcdServerTls

                server = self.hand_out("etcd", "etcd")  # etcd too is given its own pair only
                health = self.pki.ensure("admin", "admin")  # serve's own health checks
                etcd_tls = EtcdServerTls(server.ca, server.cert, server.key, health.cert, health.key)
            etcd = ServeEtcd(1, data_dir=self.log_dir / "etcd-data", tls=etcd_tls)
            self.etcd = etcd

            def launch_etcd(n: int) -> Component:
                if n == 0:
                    etcd.start()
                    if self.pki is not None:
                        # Each certificate may touch only its own part of the keyspace (infra.etcd.rbac), before any
                        # component connects: a user etcd does not know yet is refused everything.
                        from pyllumnix.infra.etcd.keys import KeyLayout

                        urls = [f"https://{e}" for e in etcd.endpoints]
                        self.pki.enable_etcd_rbac(urls, KeyLayout(str(opts["cluster"])))
                else:
                    etcd.restart_member(0)
                    etcd.wait_healthy(30.0)
                m = etcd.members[0]
                assert m.process is not None
                return Component("etcd", m.process, m.log_path, ready={"grpc_address": m.endpoint})

            self.add(Child("etcd", "etcd", launch_etcd))
            scheme = "https://" if etcd_tls is not None else ""
            etcd_endpoints = ",".join(scheme + e for e in etcd.endpoints)
            self.info["embedded_etcd"] = etcd.endpoints
        self.info["etcd"] = etcd_endpoints
        common = ["--etcd", etcd_endpoints, "--cluster", str(opts["cluster"])]
        scheduler_env = {**env, **self.start_issuer()}
        llumlet_args = [*engine_args, "--transport", str(opts["transport"]), "--host", str(opts["host"])]
        llumlet_args += str(opts["llumlet_args"]).split()
        host = str(opts["host"])

        schedulers: list[str] = []
        for i in range(int(opts["schedulers"])):
            args = [*common, *self.security_flags("scheduler", f"scheduler-{i}"), "--replica-id", f"scheduler-{i}"]
            args += ["--host", host]
            if opts["provider"] == "local":
                # no security flags: the provider gives each llumlet its own files (issued by serve), or --insecure
                args += ["--provider", "local", "--llumlet-args", shlex.join([*llumlet_args, *common])]
                # the replica's provider stops the llumlets it started when the replica exits
                args += ["--log-dir", str(self.log_dir), SCHEDULER_STOP_FLAG]
            elif opts["provider"] == "ray":
                # Ray-placed llumlets bind and advertise their node's IP, and get their certificate as PEM from the
                # replica (this host's PKI paths mean nothing there): no --host and no security flags of ours.
                ray_llumlet = [*engine_args, "--transport", str(opts["transport"]), *str(opts["llumlet_args"]).split()]
                ray_llumlet += ["--etcd", etcd_endpoints, "--cluster", str(opts["cluster"])]
                args += ["--provider", "ray", "--ray-address", str(opts["ray_address"])]
                args += ["--llumlet-args", shlex.join(ray_llumlet), SCHEDULER_STOP_FLAG]
            launch = self._scheduler_launch(f"scheduler-{i}", args, scheduler_env)
            child = self.add(Child(f"scheduler-{i}", "scheduler", launch))
            assert child.comp is not None
            schedulers.append(child.comp.address)
            if self.stopping():
                return
        self.info["schedulers"] = schedulers

        timeout = 300.0 if opts["engine"] == "vllm" else 120.0
        for i in range(int(opts["llumlets"])):

            def launch_llumlet(n: int, i: int = i) -> Component:
                # A restarted llumlet is a new instance: the old id's lease must expire so the leader reports the
                # requests that died with it failed, instead of waiting on them forever.
                iid = f"instance-{i}" if n == 0 else f"instance-{i}-r{n}"
                args = ["llumlet", *common, *self.security_flags("llumlet", iid), "--instance-id", iid, *llumlet_args]
                return self._launcher_start(f"llumlet-{i}", args, timeout, env)

            self.add(Child(f"llumlet-{i}", "llumlet", launch_llumlet, restart_on_success=False))
            if self.stopping():
                return

        ports = {"http": str(opts["http_port"]), "grpc": str(opts["grpc_port"])}
        frontend_security = self.security_flags("frontend", "f0")

        def launch_frontend(n: int) -> Component:
            args = ["frontend", *common, *frontend_security, "--scheduler", ",".join(schedulers), "--host", host]
            args += ["--frontend-id", "f0"]
            args += ["--http-port", ports["http"], "--grpc-port", ports["grpc"], *frontend_args]
            if opts["https"] is not None:
                args.append("--https" if opts["https"] else "--no-https")
            comp = self._launcher_start("frontend", args, 120.0, env)
            # A restart comes back on the same ports (chosen by the OS the first time when 0 was asked).
            ports["http"] = str(comp.ready["http_port"])
            ports["grpc"] = str(comp.ready["grpc_address"]).rsplit(":", 1)[1]
            return comp

        frontend = self.add(Child("frontend", "frontend", launch_frontend))
        assert frontend.comp is not None
        # The frontend's own URL: loopback for a wildcard bind (``http://0.0.0.0:...`` names no host to dial).
        self.info["http"] = str(frontend.comp.ready["http_url"])
        self.info["grpc"] = frontend.comp.ready["grpc_address"]
        if not self.stopping():
            self.provision_admin()

    def _scheduler_launch(self, name: str, args: list[str], env: dict[str, str]) -> Callable[[int], Component]:
        port: list[str] = []

        def launch(n: int) -> Component:
            # A restarted replica binds its first address again: the frontend and llmctl know replicas by address.
            args_now = ["scheduler", *args, *(["--port", port[0]] if port else [])]
            comp = self._launcher_start(name, args_now, 60.0, env, may_issue=True)
            if not port:
                port.append(comp.address.rsplit(":", 1)[1])
            return comp

        return launch

    # -- supervising ------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Until a signal: notes every exit, restarts crashed components with backoff, reaps adopted orphans."""
        while not self.stopping():
            self._sleep(0.5)
            if self.stopping():
                break
            exited = self.check_children()
            now = time.monotonic()
            scan = exited or now >= self._next_scan or self._unknown_child_exited()
            if scan:
                self._next_scan = now + ADOPT_SCAN_S
            self.reap_adopted(scan=scan)

    def _unknown_child_exited(self) -> bool:
        """Whether a child serve did not start (an adopted orphan) has exited and waits to be reaped: one waitid
        that reaps nothing (WNOWAIT), instead of a /proc scan at every tick."""
        if sys.platform != "linux":
            return False
        try:
            # WNOWAIT reaps nothing, so Popen still reaps (and sees the status of) the children serve started.
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        if info is None:
            return False
        known = {c.comp.pid for c in self.children if c.comp is not None}
        return info.si_pid not in known and info.si_pid not in self.adopted  # an adopted one is reaped anyway

    def check_children(self) -> bool:
        """Notes exits and restarts what is due; True when a child exited (its own children may now be orphans)."""
        now = time.monotonic()
        changed = exited = False
        for child in self.children:
            comp = child.comp
            if child.restart_at is None and comp is not None and not comp.alive():
                changed = exited = True
                self._note_exit(child, comp, now)
            if child.restart_at is not None and now >= child.restart_at and not self.stopping():
                changed = True
                self._restart(child)
        if changed:
            self.write_status()
        return exited

    def _note_exit(self, child: Child, comp: Component, now: float) -> None:
        child.last_exit = describe_exit(comp.proc.returncode)
        ran = now - child.started_at
        try:
            text = comp.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        tail = " | ".join(text.strip().splitlines()[-3:]) or "(empty)"
        log.warning(
            "%s (pid %d) exited: %s after %.1f s; log tail: %s", child.name, comp.pid, child.last_exit, ran, tail
        )
        comp.terminate(0)  # anything left in its process group
        if comp.proc.returncode == 0 and not child.restart_on_success:
            log.info("%s left on purpose (exit code 0, e.g. drained); not restarted", child.name)
            return
        child.failures = 1 if ran >= RESET_AFTER else child.failures + 1
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (child.failures - 1))
        child.restart_at = now + delay
        log.info("restarting %s in %.1f s (restart %d)", child.name, delay, child.restarts + 1)

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.incarnation += 1
        child.restarts += 1
        child.started_at = time.monotonic()
        try:
            child.comp = child.launch(child.incarnation)
        except (LaunchError, RuntimeError, TimeoutError, OSError) as exc:
            if self.stopping():
                return
            child.failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (child.failures - 1))
            child.restart_at = time.monotonic() + delay
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("restart of %s failed (%s); next try in %.1f s", child.name, first, delay)
            return
        log.info("restarted %s (pid %d)%s", child.name, child.comp.pid, self._where(child.comp))

    def reap_adopted(self, *, scan: bool = True) -> None:
        """Orphans re-parented to serve (it is a subreaper): logged once, reaped when they exit. ``scan``: look for new
        orphans in /proc (costly); without it only the orphans already known are reaped."""
        if sys.platform != "linux":
            return
        if scan:
            known = {c.comp.pid for c in self.children if c.comp is not None}
            for pid in _children_of(os.getpid()):
                if pid in known or pid in self.adopted:
                    continue
                self.adopted.add(pid)
                log.info("adopted orphan pid %d (%s)", pid, _cmdline(pid)[:200])
        for pid in list(self.adopted):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.adopted.discard(pid)
                continue
            if done:
                self.adopted.discard(pid)
                log.info("adopted pid %d exited: %s", pid, describe_exit(os.waitstatus_to_exitcode(status)))

    # -- stopping ---------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Reverse start order, one tier at a time (frontend, llumlets, schedulers, etcd): SIGTERM to each process
        group of the tier, SIGKILL to what is left after STOP_TIMEOUT (at once on a second signal); then whatever
        was re-parented to serve. Every exit is logged."""
        self.state = "stopping"
        with contextlib.suppress(OSError):
            self.write_status()
        for kind in ("frontend", "llumlet", "scheduler", "etcd"):
            tier = [c for c in self.children if c.kind == kind and c.comp is not None]
            for child in tier:
                child.restart_at = None
                assert child.comp is not None
                if child.comp.alive():
                    signal_group(child.comp.pgid, signal.SIGTERM)
            for child in tier:
                assert child.comp is not None
                was_running = child.comp.proc.returncode is None
                timeout = SCHEDULER_STOP_TIMEOUT if kind == "scheduler" else STOP_TIMEOUT
                code = child.comp.terminate(timeout, hurry=self._hurry, signalled=True)
                if was_running:
                    child.last_exit = describe_exit(code)
                    log.info("stopped %s (pid %d): %s", child.name, child.comp.pid, child.last_exit)
        self.reap_adopted()
        self._stop_adopted()
        if self.issuer is not None:  # the schedulers are gone: nobody may ask any more
            self.issuer.close()
        if self.pki is not None and self.etcd is not None:
            # The embedded etcd is gone: a certificate issued later from this folder must not wait on its users.
            self.pki.rbac_path.unlink(missing_ok=True)
        self.ignore_late_signals()
        self.state = "stopped"
        with contextlib.suppress(OSError):
            self.write_status()

    def _stop_adopted(self) -> None:
        if not self.adopted:
            return
        for pid in self.adopted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.adopted and time.monotonic() < deadline and not self._hurry():
            time.sleep(0.05)
            self.reap_adopted()
        for pid in list(self.adopted):
            log.warning("adopted pid %d did not stop; SIGKILL", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.adopted.clear()


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML file with any of these options; flags override it.",
)
@click.option("--etcd", default=DEFAULTS["etcd"], help="etcd endpoints (default: start an embedded etcd).")
@click.option("--cluster", default=DEFAULTS["cluster"], show_default=True)
@click.option("--schedulers", type=int, default=DEFAULTS["schedulers"], show_default=True, help="Scheduler replicas.")
@click.option("--llumlets", type=int, default=DEFAULTS["llumlets"], show_default=True, help="Engine instances.")
@click.option("--engine", default=DEFAULTS["engine"], show_default=True, help="sim or vllm.")
@click.option("--profile", default=DEFAULTS["profile"], show_default=True, help="Sim engine latency profile.")
@click.option("--model", default=DEFAULTS["model"], help="Model name (sim) or path (vllm).")
@click.option(
    "--max-model-len",
    type=int,
    default=DEFAULTS["max_model_len"],
    help=f"Prompt + output limit (default: the sim profile's; vllm: min({VLLM_MAX_MODEL_LEN}, the model's)).",
)
@click.option(
    "--bytes-per-token",
    type=int,
    default=DEFAULTS["bytes_per_token"],
    show_default=True,
    help="Sim engine KV payload per token (0: the profile's full size).",
)
@click.option("--transport", default=DEFAULTS["transport"], show_default=True, help="Data plane: auto|ucx|tcp.")
@click.option("--host", default=DEFAULTS["host"], show_default=True, help="Bind host for every component.")
@click.option(
    "--https/--no-https",
    default=DEFAULTS["https"],
    help="The frontend's OpenAI API over HTTPS (default: when secure and --host is not loopback; --no-https for a TLS "
    "proxy in front).",
)
@click.option("--http-port", type=int, default=DEFAULTS["http_port"], show_default=True)
@click.option("--grpc-port", type=int, default=DEFAULTS["grpc_port"], show_default=True)
@click.option("--log-dir", default=DEFAULTS["log_dir"], help="Per-component logs (default: a temp dir).")
@click.option(
    "--provider",
    type=click.Choice(["local", "none", "ray"]),
    default=DEFAULTS["provider"],
    show_default=True,
    help="Instance provider for autoscaling and `llmctl scale` (ray: llumlets placed on a Ray cluster, --ray-address;"
    " give --host an address the Ray nodes reach).",
)
@click.option("--ray-address", default=DEFAULTS["ray_address"], help="HOST:PORT of the Ray head for --provider ray.")
@click.option("--llumlet-args", default=DEFAULTS["llumlet_args"], help="Extra arguments for every llumlet.")
@click.option(
    "--insecure",
    is_flag=True,
    default=DEFAULTS["insecure"],
    envvar="LLUMNIX_INSECURE",
    help="No TLS, no certificates, no API keys (isolated development only). Default: a local PKI, mutual TLS on "
    "every hop, etcd with client certificates, an admin API key in the client context file. Env: LLUMNIX_INSECURE=1 "
    "(what an insecure test launcher sets).",
)
@click.option("--tls-dir", default=DEFAULTS["tls_dir"], help="The local PKI folder (default: <log-dir>/pki; reused).")
@click.option(
    "--context",
    default=DEFAULTS["context"],
    help="Client context file to write (default: $LLUMNIX_CONTEXT or ~/.config/llumnix/context.yaml).",
)
@click.pass_context
def serve_command(ctx: click.Context, /, config_path: Path | None, **_: Any) -> None:
    """Run a complete local cluster: etcd, schedulers, llumlets and a frontend (supervised: a crashed component is
    restarted with backoff; Ctrl-C/SIGTERM stops everything in reverse order)."""
    opts = resolve(ctx, load_config(config_path))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s serve: %(message)s")
    engine_settings(opts)  # bad engine options fail here, before anything starts (or any folder is made)
    if opts["https"] and opts["insecure"]:  # the frontend refuses it too, but only after everything else started
        raise click.UsageError("--https serves the OpenAI API with the frontend's certificate: not with --insecure")
    if opts["provider"] == "ray" and not opts["ray_address"]:
        raise click.UsageError("--provider ray needs --ray-address HOST:PORT (the Ray head)")
    log_dir = Path(opts["log_dir"]) if opts["log_dir"] else Path(tempfile.mkdtemp(prefix="llumnix-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(opts, log_dir)
    supervisor.install_signals()
    code = 0
    try:
        supervisor.start_cluster()
        if not supervisor.stopping():
            supervisor.state = "running"
            supervisor.write_status()
            info = supervisor.status()
            click.echo(json.dumps({"event": "ready", **info}))
            sys.stdout.flush()
            click.echo(
                f"llumnix serving: OpenAI API at {info['http']}/v1, gRPC at {info['grpc']}, "
                f"admin (llmctl -e) at {','.join(info['schedulers'])}; logs and serve.json in {log_dir}",
                err=True,
            )
            if info.get("context"):
                click.echo(
                    f"secure (mutual TLS, PKI in {info['tls_dir']}); client context with the admin API key: "
                    f"{info['context']} (llmctl uses it with no flags; the key: "
                    f"`python -m pyllumnix.infra.security.context api-key`)",
                    err=True,
                )
            supervisor.run()
        if supervisor.signals:
            log.info("%s received; stopping the cluster", signal.Signals(supervisor.signals[0]).name)
    except (LaunchError, RuntimeError, TimeoutError, OSError) as exc:  # a component (or etcd) did not start
        if not supervisor.stopping() or not isinstance(exc, LaunchError):
            click.echo(f"error: {exc}", err=True)
            code = 1
    finally:
        supervisor.stop()
    sys.exit(code)
