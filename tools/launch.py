"""Starts components as child processes (``python -m pyllumnix.tools.cli <component> ...``) and waits until each
prints its ``{"event": "ready", ...}`` line. Used by ``llumnix serve`` and by the integration tests.

Each child runs in its own session (its own process group, out of reach of a terminal's Ctrl-C, so its supervisor
decides the stop order) and is stopped through that group: whatever the component started in its group goes with it,
and nothing is ever signalled by name. Its stderr goes to ``<log_dir>/<name>.log`` and its stdout to
``<log_dir>/<name>.out`` (a file, not a pipe: a chatty child never blocks on a pipe nobody reads after startup). A
child that exits or stays silent past the deadline raises with the tail of its log, and is stopped first (SIGTERM to
its group, SIGKILL after a grace period), so a failed start leaves nothing behind: a ``serve`` that does not become
ready stops its own etcd, schedulers and llumlets.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1

SECURITY_ENV = ("LLUMNIX_TLS_DIR", "LLUMNIX_INSECURE", "LLUMNIX_CERT_ISSUER")
"""The variables that tell a component how to secure itself (``infra.security.runtime``); set by :class:`Launcher`."""
CLIENT_ENV = ("LLUMNIX_CONTEXT", "LLUMNIX_API_KEY", "LLUMNIX_ENDPOINT")
"""A client's credentials and target (the context file with the admin API key and certificate paths:
``infra.security.context.ENV_VAR``; llmctl's and bench's key and endpoint): what ``serve`` withholds from the cluster's
components, which need none of them (a compromised component must not find the admin key through them)."""

_SESSION_PKI: dict[str, Any] = {}


def session_pki(cluster: str = "llumnix") -> Any:
    """A throwaway local PKI (CA, token secret, default certificates) shared by every secure :class:`Launcher` of this
    process that names no ``pki_dir``: made on first use, removed when the process exits. One per process keeps
    secure-by-default cheap (a test session issues its CA once); the etcd key prefix, not the CA, keeps the clusters
    of one process apart."""
    pki = _SESSION_PKI.get(cluster)
    if pki is None:
        import atexit
        import shutil
        import tempfile

        from pyllumnix.infra.security.bootstrap import bootstrap_local

        directory = Path(tempfile.mkdtemp(prefix=f"llumnix-pki-{cluster}-"))
        atexit.register(shutil.rmtree, directory, True)
        pki = _SESSION_PKI[cluster] = bootstrap_local(directory, cluster)
    return pki


class LaunchError(RuntimeError):
    """A component did not become ready."""


class LaunchInterrupted(LaunchError):
    """Waiting for a component was cut short by the caller (``should_stop`` became true)."""


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still there (zombies count until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    """Sends ``sig`` to a process group we created; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library (for prctl), loaded once."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _pdeathsig_preexec(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to send ``sig`` to the child when its parent dies (Linux), so the children
    of a supervisor that is SIGKILLed still stop. The libc handle is resolved before the fork."""
    prctl = libc().prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def spawn(
    argv: list[str],
    *,
    stdout: Any,
    stderr: Any,
    env: dict[str, str] | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Popen in a new session (own process group); optionally SIGTERMed by the kernel when this process dies."""
    preexec = _pdeathsig_preexec(signal.SIGTERM) if die_with_parent and sys.platform == "linux" else None
    return subprocess.Popen(
        argv,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=preexec,  # noqa: PLW1509 (prctl only; resolved before the fork)
    )


@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)
    out_path: Path | None = None

    @property
    def address(self) -> str:
        return str(self.ready["grpc_address"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        """The component's process group (its own session: the group id is its pid)."""
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the component's whole process group (a crash: nothing gets to clean up)."""
        if self.alive() or group_alive(self.pgid):
            signal_group(self.pgid, signal.SIGKILL)
        if self.proc.returncode is None:
            self.proc.wait(10)

    def terminate(
        self, timeout: float = 10.0, hurry: Callable[[], bool] | None = None, *, signalled: bool = False
    ) -> int:
        """SIGTERM to the process group (unless the caller ``signalled`` it already: a second SIGTERM can hit a
        component whose handlers are gone mid-shutdown), SIGKILL to the group after ``timeout`` (or as soon as
        ``hurry()`` is true); then waits for the group to be empty. Returns the component's exit code."""
        if self.alive():
            if not signalled:
                signal_group(self.pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline and not (hurry is not None and hurry()):
                time.sleep(0.02)
        if self.proc.poll() is None:
            signal_group(self.pgid, signal.SIGKILL)
            self.proc.wait(10)
        # The leader is gone; anything it left in its group (a helper process) gets a moment, then SIGKILL.
        deadline = time.monotonic() + 2.0
        while group_alive(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if group_alive(self.pgid):
            signal_group(self.pgid, signal.SIGKILL)
        return self.proc.returncode

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.out_path is not None and self.out_path.exists():
            out = self.out_path.read_text(errors="replace")
            if out.strip():
                text += f"\n--- stdout ---\n{out}"
        return text


class Launcher:
    """Tracks every started component; ``stop_all`` ends them in reverse start order.

    ``die_with_parent``: children get SIGTERM from the kernel if this process dies (``llumnix serve`` sets it; only
    for launchers used from the main thread, since the kernel ties it to the thread that forked).

    ``secure`` (the default, True): every child gets a local PKI (``pki_dir``, else this process's throwaway
    :func:`session_pki`) through ``$LLUMNIX_TLS_DIR``; the folder holds the CA key, so each component issues its own
    certificate for its role and id, and they talk mutual TLS with role checks; the caller reaches them with
    :meth:`channel` / :meth:`security`. ``secure=False`` is the explicit opt-out: children run ``--insecure``
    (``$LLUMNIX_INSECURE``). ``secure=None``: the caller gives each child its own ``--tls-dir``/``--insecure`` (what
    ``serve`` does): the launcher passes neither variable on. In no mode are the variables of the launcher's own
    environment inherited (a ``serve --insecure`` must not hand its children the PKI of a secure launcher that
    started it, nor a secure launcher's children an ``$LLUMNIX_INSECURE`` of the test process). A ``serve`` child of
    a secure launcher decides for itself too (it makes its own PKI, or runs ``--insecure``).
    """

    def __init__(
        self,
        log_dir: Path,
        die_with_parent: bool = False,
        *,
        secure: bool | None = True,
        pki_dir: Path | None = None,
        cluster: str = "llumnix",
        withheld_env: Sequence[str] = (),
    ) -> None:
        """``withheld_env``: variables of this process's environment its children do not inherit (besides
        ``SECURITY_ENV``; ``serve`` gives ``CLIENT_ENV``)."""
        self.log_dir = log_dir
        self.withheld_env = frozenset(SECURITY_ENV) | frozenset(withheld_env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.components: list[Component] = []
        self.die_with_parent = die_with_parent
        self.secure = secure
        self.pki: Any = None  # ClusterSecurity (imported lazily: serve's supervisor need not load cryptography)
        if secure:
            if pki_dir is not None:
                from pyllumnix.infra.security.bootstrap import bootstrap_local

                self.pki = bootstrap_local(pki_dir, cluster)
            else:
                self.pki = session_pki(cluster)

    def child_env(self) -> dict[str, str]:
        """The environment that tells a child how to secure itself (see the class docstring); empty when the
        caller passes security flags itself."""
        if self.pki is not None:
            return {"LLUMNIX_TLS_DIR": str(self.pki.directory)}
        if self.secure is False:
            return {"LLUMNIX_INSECURE": "1"}
        return {}

    def environment(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """A child's whole environment: this process's, less the security variables (the launcher alone says how a
        child secures itself: an inherited one would override its mode) and ``withheld_env``, plus :meth:`child_env` and
        ``env``."""
        inherited = {k: v for k, v in os.environ.items() if k not in self.withheld_env}
        return {**inherited, "PYTHONUNBUFFERED": "1", **self.child_env(), **(env or {})}

    def security(self, role: str = "admin", id: str = "harness") -> Any:
        """``SecuritySettings`` for this process acting as ``role`` (certificate issued on first use); insecure
        settings when the launcher is not secure. Pass to ``open_channel(..., settings=)`` or ``start_server``."""
        from pyllumnix.infra.security.runtime import INSECURE, SecuritySettings, identity_of

        if self.pki is None:
            return INSECURE
        paths = self.pki.ensure(role, id)
        return SecuritySettings(paths, identity_of(paths.cert), tls_dir=self.pki.directory)

    def channel(self, address: str, role: str = "admin", options: Any = (), peer: str | None = None) -> Any:
        """A grpc.aio channel to a component (of role ``peer``: its certificate must name it), as ``role`` (mutual TLS
        when secure)."""
        from pyllumnix.infra.security.runtime import open_channel

        return open_channel(address, options, peer=peer, settings=self.security(role, f"harness-{role}"))

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Component:
        """Starts a component without waiting for it (see :meth:`wait_ready`); its logs are appended to."""
        log_path = self.log_dir / f"{name}.log"
        out_path = self.log_dir / f"{name}.out"
        full_env = self.environment(env)
        out_path.write_bytes(b"")  # the ready line of this start, not of an earlier one
        with open(log_path, "ab") as log, open(out_path, "ab") as out:
            proc = spawn(
                [sys.executable, "-m", "pyllumnix.tools.cli", *args],
                stdout=out,
                stderr=log,
                env=full_env,
                die_with_parent=self.die_with_parent,
            )
        comp = Component(name, proc, log_path, out_path=out_path)
        self.components.append(comp)
        return comp

    def start(
        self,
        name: str,
        *args: str,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Component:
        comp = self.spawn(name, *args, env=env)
        comp.ready = self.wait_ready(comp, timeout, should_stop)
        return comp

    @staticmethod
    def wait_ready(comp: Component, timeout: float, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The component's ready line; on exit, deadline or ``should_stop()`` the component is stopped and this
        raises (:class:`LaunchInterrupted` for ``should_stop``)."""
        assert comp.out_path is not None
        deadline = time.monotonic() + timeout
        offset = 0
        buf = b""
        while True:
            with open(comp.out_path, "rb") as out:
                out.seek(offset)
                chunk = out.read()
            offset += len(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    return msg
            if comp.proc.poll() is not None:
                comp.terminate(0)  # its group may still hold processes it started
                raise LaunchError(f"{comp.name} exited with {comp.proc.returncode}:\n{comp.log()[-3000:]}")
            if should_stop is not None and should_stop():
                comp.terminate(5.0)
                raise LaunchInterrupted(f"{comp.name}: start interrupted")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        # A graceful stop first: a component that started children of its own (serve) stops them.
        comp.terminate(10.0)
        raise LaunchError(f"{comp.name} not ready within {timeout:g} s:\n{comp.log()[-3000:]}")

    def stop_all(self, timeout: float = 10.0) -> None:
        for comp in reversed(self.components):
            comp.terminate(timeout)
