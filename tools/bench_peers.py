"""``llumnix bench peers``: this project against the routers users can ``pip install`` (vllm-router, sglang-router),
on the same simulated engines, measured by one client (``bench serving``'s OpenAI mode).

Systems:

- ``llumnix`` / ``infaas++``: ``llumnix serve`` (4 llumlets, one scheduler, a frontend) with its default security
  (mutual TLS inside, plain-HTTP API with the API key from the context file it writes) -- measured as users get it;
- ``vllm-router:<policy>`` / ``sglang-router:<policy>``: the router in front of one worker per engine instance, each
  worker a llumlet + a frontend of its own (``--insecure``, loopback only, behind the router; the JSON says so).
  The routers are installed at pinned versions into a throwaway virtualenv (``--peers-venv``; never ``.venv``).

Each system is started once and serves all its runs: a warm-up replay (not measured), an idle CPU sample, then every
workload ``--repeats`` times in rounds (``schedule``). After each run the cluster must drain -- every request ended at
every frontend and llumlet, every KV block free, every process alive (``bench_peers_drain``) -- else the run fails
loudly and the next run gets a fresh cluster. The report holds the median and the spread (min, max) of TTFT / TPOT /
e2e P50-P99, throughput, and CPU seconds (utime + stime from /proc, so robust to other load on the machine) per
request and per streamed token, per component, of every process the benchmark started, and the total wall time.
``--smoke`` runs this project only, the warm-up and one tiny run on its cluster (CI). ``--plot`` writes a chart
(matplotlib) of TTFT P99 and CPU per request, drawn from the JSON the run writes.

stdout is the JSON report alone; the per-run lines, the summary and the progress bar (one step per run, the replay's
requests beneath it; a terminal only, ``LLUMNIX_PROGRESS`` forces) go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from pyllumnix.infra.processes import stop_group
from pyllumnix.tools.bench_peers_drain import Probes, preemptions, wait_drained
from pyllumnix.tools.bench_serving import replay_openai
from pyllumnix.tools.launch import Launcher, spawn
from pyllumnix.tools.metrics import summarize
from pyllumnix.tools.progress import Steps, progress_bar
from pyllumnix.tools.workload import RequestArrival, generate

PEER_PINS = {"vllm-router": "0.1.17", "sglang-router": "0.3.2"}
DEFAULT_SYSTEMS = (
    "llumnix",
    "infaas++",
    "vllm-router:round_robin",
    "vllm-router:power_of_two",
    "vllm-router:cache_aware",
    "sglang-router:cache_aware",
)
# The paper's power-law (Zipf) lengths, S-S (means 128/128) capped at 256 tokens: heavy-tailed (median output 76
# tokens, 24 % at the cap), 240 requests at 16 req/s: ~15 s of arrivals and a longest decode of ~20 s, so one run
# takes ~35 s and 6 systems x 2 workloads x 3 repeats fit in 30 minutes here (20.9 min in session 12). At 16 req/s
# the 520-block instances run out of KV memory (every system preempts), which is where dispatch policies differ; at
# 8 req/s nothing preempts and they all tie (docs/bench-peers/README.md, session 12). Other workloads (the issue's
# M-M with len_max=1024, ~100 s a run; sharegpt) with --workload.
DEFAULT_WORKLOADS = (
    "S-S:poisson:rate=16:n=240:len_max=256",
    "S-S:gamma:rate=16:cv=4:n=240:len_max=256",
)
_POLICY_NAMES = {"llumnix": "llumnix", "infaas++": "infaas++"}
_CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_SAMPLE_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of one process's live threads, summed by thread: "main" (the thread whose id is the pid: the
    event loop of this project's components) and the others by name (gRPC's ``event_engine`` I/O threads and its
    ``python``-named poller, ...); {} when the process is gone. Why: it splits a component's CPU into its own Python
    work and gRPC's threads (a thread that exited takes its share out of this split, not out of ``cpu_seconds``)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = "main" if tid == str(pid) else stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@dataclass
class Proc:
    """A process the benchmark started (or one its ``llumnix serve`` started), by component kind."""

    name: str
    kind: str  # llumlet | frontend | scheduler | etcd | router | serve
    pid: int


@dataclass
class System:
    """One running system: its OpenAI base URL, API key, the processes to account for and how to stop it."""

    name: str
    url: str
    api_key: str | None
    procs: list[Proc]
    notes: dict[str, Any] = field(default_factory=dict)
    stoppers: list[Any] = field(default_factory=list)
    probes: Probes = field(default_factory=Probes)  # where the drain check between runs reads emptiness

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception as exc:  # stop the rest anyway
                click.echo(f"bench peers: stopping {self.name}: {exc}", err=True)


# -- installing the peers ----------------------------------------------------------------------------------------
def ensure_peers(venv: Path) -> Path:
    """A virtualenv with the pinned routers (created once, reused); returns its bin folder."""
    bin_dir = venv / "bin"
    marker = venv / f".pins-{'-'.join(f'{k}{v}' for k, v in sorted(PEER_PINS.items()))}"
    if marker.exists():
        return bin_dir
    if ".venv" in venv.resolve().parts:
        raise click.UsageError(f"refusing to install the peers into {venv} (the project's .venv)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pins = [f"{k}=={v}" for k, v in PEER_PINS.items()]
    subprocess.run([str(bin_dir / "pip"), "install", "-q", *pins], check=True)
    marker.write_text("\n".join(pins) + "\n")
    return bin_dir


# -- starting the systems ----------------------------------------------------------------------------------------
def _wait_http(url: str, timeout: float, what: str, procs: Sequence[Proc]) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not alive(p.pid):
                raise RuntimeError(f"{what}: {p.name} (pid {p.pid}) exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what}: {url} not ready within {timeout:g} s")


def start_project(policy: str, work: Path, blocks: int, instances: int) -> System:
    """``llumnix serve`` with its default security; the dispatch policy set through llmctl (as a user would)."""
    log_dir = work / f"serve-{policy.replace('+', 'p')}"
    context = log_dir / "context.yaml"
    env = {**os.environ, "LLUMNIX_CONTEXT": str(context), "PYTHONUNBUFFERED": "1"}
    args = ["serve", "--llumlets", str(instances), "--schedulers", "1", "--transport", "tcp"]
    args += [
        "--llumlet-args",
        f"--total-blocks {blocks}" if blocks else "",
        "--log-dir",
        str(log_dir),
        "--context",
        str(context),
    ]
    # Ports chosen by the OS at bind time (serve reports them when ready): a port picked here and bound later can be
    # taken in between by any connection's ephemeral port (seen: EADDRINUSE between two systems of one run).
    args += ["--http-port", "0", "--grpc-port", "0", "--provider", "none"]
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "serve.stdout", "wb")  # noqa: SIM115 (closed by the stopper)
    err = open(log_dir / "serve.stderr", "wb")  # noqa: SIM115
    proc = spawn(
        [sys.executable, "-m", "pyllumnix.tools.cli", *args], stdout=out, stderr=err, env=env, die_with_parent=True
    )

    def stop() -> None:
        stop_group(proc, 30)
        out.close()
        err.close()

    system = System(policy, "", None, [], stoppers=[stop])
    try:
        deadline = time.monotonic() + 180
        ready: dict[str, Any] | None = None
        while ready is None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"llumnix serve exited {proc.returncode}: {(log_dir / 'serve.stderr').read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("llumnix serve not ready within 180 s")
            for line in (log_dir / "serve.stdout").read_text().splitlines():
                if line.startswith("{") and '"ready"' in line:
                    ready = json.loads(line)
            time.sleep(0.2)
        system.url = str(ready["http"])
        from pyllumnix.infra.security.context import load_context

        ctx = load_context(path=context)
        system.api_key = ctx.api_key if ctx is not None else None
        for comp in ready.get("components", []):
            kind = str(comp.get("kind", ""))
            if comp.get("pid") and kind in ("llumlet", "frontend", "scheduler", "etcd"):
                system.procs.append(Proc(str(comp.get("name", kind)), kind, int(comp["pid"])))
            if kind == "llumlet" and comp.get("metrics"):
                system.probes.llumlet_metrics[str(comp.get("name", kind))] = str(comp["metrics"])
        system.probes.frontends = [system.url]
        system.procs.append(Proc("serve", "serve", proc.pid))
        if policy != "llumnix":
            set_policy(policy, env)
        system.notes = {
            "security": "default (llumnix serve: mutual TLS between components, API key from the context file)",
            "dispatch_policy": policy,
            "command": ["llumnix", *args],
        }
        _wait_http(f"{system.url}/readyz", 60, policy, system.procs)
    except BaseException:
        system.stop()
        raise
    return system


def set_policy(policy: str, env: dict[str, str], timeout: float = 60.0, llmctl: str | None = None) -> None:
    """``llmctl config set dispatch.policy``, as a user would. serve is ready once its components listen, which can be
    before the scheduler replica has won its first election: llmctl then exits 3 (no leader reachable), so that exit
    is retried until ``timeout``; any other failure, or the deadline, raises with llmctl's message."""
    cmd = [
        llmctl or str(Path(sys.executable).parent / "llmctl"),
        "config",
        "set",
        "dispatch.policy",
        _PB_POLICY[policy],
    ]
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if done.returncode != 3 or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(cmd[1:])} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        time.sleep(0.5)


_PB_POLICY = {"infaas++": "DISPATCH_POLICY_INFAAS_PP", "llumnix": "DISPATCH_POLICY_LLUMNIX"}


def worker_args(blocks: int) -> tuple[list[str], list[str]]:
    """(llumlet args, frontend args) of a router's worker: the engine settings ``llumnix serve`` gives its own
    llumlets and frontend (``serve.engine_settings`` on serve's defaults), so both sides run the same engines.

    Why it matters: a llumlet started without serve's ``--bytes-per-token 8192`` writes the profile's full 512 KiB of
    sim KV payload per token, 64x the bytes, inside its event loop on every prefill and recompute; under the routers'
    load those writes stalled the workers' llumlets for seconds (AddRequest past the frontend's 2 s, lost leases)."""
    from pyllumnix.tools.serve import DEFAULTS, engine_settings

    llumlet, frontend, _env = engine_settings({**DEFAULTS, "transport": "tcp"})
    llumlet = [*llumlet, "--transport", "tcp", "--host", "127.0.0.1"]
    if blocks:
        llumlet += ["--total-blocks", str(blocks)]
    return llumlet, [*frontend, "--host", "127.0.0.1"]


def start_router(spec: str, work: Path, blocks: int, instances: int, peers_bin: Path) -> System:
    """One worker (llumlet + frontend, ``--insecure`` on loopback) per instance, then the router in front; each worker
    configured as ``llumnix serve`` configures its own components (``worker_args``)."""
    router, policy = spec.split(":", 1)
    log_dir = work / spec.replace(":", "-")
    # Opted out of security: the workers run --insecure (loopback, behind a third-party router that speaks plaintext).
    launcher = Launcher(log_dir, die_with_parent=True, secure=False)
    from pyllumnix.infra.etcd.embedded import EmbeddedEtcd

    etcd = EmbeddedEtcd(1, data_dir=log_dir / "etcd")
    system = System(spec, "", None, [], stoppers=[etcd.stop, launcher.stop_all])
    try:
        etcd.start()
        assert etcd.members[0].process is not None
        system.procs.append(Proc("etcd", "etcd", etcd.members[0].process.pid))
        endpoints = ",".join(etcd.endpoints)
        llumlet_args, frontend_args = worker_args(blocks)
        urls: list[str] = []
        for i in range(instances):
            common = ["--etcd", endpoints, "--cluster", f"peer{i}"]
            ll = launcher.start(
                f"llumlet-{i}", "llumlet", *common, "--instance-id", f"instance-{i}", *llumlet_args, timeout=120
            )
            port = free_port()
            fe = launcher.start(
                f"frontend-{i}", "frontend", *common, "--frontend-id", f"f{i}", "--http-port", str(port),
                "--grpc-port", "0", *frontend_args, timeout=120,
            )  # fmt: skip
            system.procs += [Proc(f"llumlet-{i}", "llumlet", ll.pid), Proc(f"frontend-{i}", "frontend", fe.pid)]
            urls.append(f"http://127.0.0.1:{fe.ready.get('http_port', port)}")
            if ll.ready.get("metrics_address"):
                system.probes.llumlet_metrics[f"llumlet-{i}"] = str(ll.ready["metrics_address"])
        system.probes.frontends = list(urls)
        for u in urls:
            _wait_http(f"{u}/readyz", 60, spec, system.procs)
        rport = free_port()
        exe = peers_bin / router
        sub = ["launch"] if router == "sglang-router" else []  # sglang-router 0.3: `launch` = router only
        cmd = [str(exe), *sub, "--host", "127.0.0.1", "--port", str(rport), "--policy", policy, "--worker-urls", *urls]
        rlog = open(log_dir / "router.log", "wb")  # noqa: SIM115 (closed by the stopper)
        rproc = spawn(
            cmd, stdout=rlog, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"}, die_with_parent=True
        )

        def stop_router() -> None:
            stop_group(rproc, 10)
            rlog.close()

        system.stoppers.append(stop_router)
        system.procs.append(Proc(router, "router", rproc.pid))
        system.url = f"http://127.0.0.1:{rport}"
        _wait_http(f"{system.url}/v1/models", 60, spec, system.procs)
        version = subprocess.run([str(exe), "--version"], check=False, capture_output=True, text=True).stdout.strip()
        system.notes = {
            "router": router,
            "version": PEER_PINS[router],
            "version_reported": version,
            "policy": policy,
            "command": cmd,
            "workers": "one llumlet + one frontend per instance, each worker --insecure on 127.0.0.1 behind the router",
            "worker_llumlet_args": llumlet_args,
            "worker_frontend_args": frontend_args,
        }
    except BaseException:
        system.stop()
        raise
    return system


# -- one run ------------------------------------------------------------------------------------------------------
def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in (50, 90, 95, 99)}
    arr = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) for p in (50, 90, 95, 99)}


def idle_rates(system: System, seconds: float = IDLE_SAMPLE_S) -> dict[str, float]:
    """CPU seconds per second of each component kind with nothing to do (load reports, heartbeats, health checks):
    sampled once per system on its warm, drained cluster, and taken out of the token path's net figure."""
    idle0 = {p.pid: cpu_seconds(p.pid) for p in system.procs}
    time.sleep(seconds)
    rate: dict[str, float] = {}
    for p in system.procs:
        rate[p.kind] = rate.get(p.kind, 0.0) + (cpu_seconds(p.pid) - idle0[p.pid]) / seconds
    return rate


def run_once(system: System, arrivals: Sequence[RequestArrival], idle_rate: dict[str, float]) -> dict[str, Any]:
    """Replays the workload once; CPU per component over the replay; every process checked alive afterwards (the
    drain check that follows is the caller's: ``check_drained``)."""
    import asyncio

    preempted0 = preemptions(system.probes)
    before = {p.pid: cpu_seconds(p.pid) for p in system.procs}
    threads_before = {p.pid: thread_cpu_seconds(p.pid) for p in system.procs}
    t = time.monotonic()
    outcomes, duration = asyncio.run(replay_openai(system.url, arrivals, "llama-7b-a10", system.api_key))
    wall = time.monotonic() - t
    preempted1 = preemptions(system.probes)
    cpu_by_kind: dict[str, float] = {}
    cpu_by_thread: dict[str, dict[str, float]] = {}
    for p in system.procs:
        cpu_by_kind[p.kind] = cpu_by_kind.get(p.kind, 0.0) + cpu_seconds(p.pid) - before[p.pid]
        threads = cpu_by_thread.setdefault(p.kind, {})
        for name, secs in thread_cpu_seconds(p.pid).items():
            threads[name] = threads.get(name, 0.0) + secs - threads_before[p.pid].get(name, 0.0)
    dead = [f"{p.name} (pid {p.pid})" for p in system.procs if not alive(p.pid)]
    done = [o for o in outcomes if not o.error and o.record.finish_time is not None]
    ttft = [o.record.first_token_time - o.record.arrival for o in done if o.record.first_token_time is not None]
    e2e = [o.record.finish_time - o.record.arrival for o in done if o.record.finish_time is not None]
    tpot = [
        (o.record.finish_time - o.record.first_token_time) / (o.record.num_output_tokens - 1)
        for o in done
        if o.record.num_output_tokens > 1 and o.record.first_token_time is not None and o.record.finish_time
    ]
    tokens = sum(o.record.num_output_tokens for o in done)
    n = max(1, len(done))
    total_cpu = sum(cpu_by_kind.values())
    token_path = cpu_by_kind.get("llumlet", 0.0) + cpu_by_kind.get("frontend", 0.0)
    token_idle = (idle_rate.get("llumlet", 0.0) + idle_rate.get("frontend", 0.0)) * wall
    return {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "dead_processes": dead,
        "duration_s": duration,
        "wall_s": wall,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": tokens / duration if duration else 0.0,
        "output_tokens": tokens,
        "ttft_s": _percentiles(ttft),
        "tpot_s": _percentiles(tpot),
        "e2e_s": _percentiles(e2e),
        "cpu_s": cpu_by_kind,
        "cpu_ms_per_request": {k: 1000 * v / n for k, v in cpu_by_kind.items()} | {"total": 1000 * total_cpu / n},
        # The same split by thread (see ``thread_cpu_seconds``): the event loop ("main") vs gRPC's threads.
        "cpu_ms_per_request_by_thread": {
            kind: {name: 1000 * max(0.0, secs) / n for name, secs in sorted(threads.items())}
            for kind, threads in cpu_by_thread.items()
        },
        "cpu_ms_per_token_llumlet_frontend": 1000 * token_path / max(1, tokens),
        # The same less what those processes burn idle over as long (their background work is not the token path).
        "cpu_ms_per_token_llumlet_frontend_net_of_idle": 1000 * max(0.0, token_path - token_idle) / max(1, tokens),
        "idle_cpu_s_per_s": idle_rate,
        # Preemptions on every instance over the run (KV blocks ran out; None when a llumlet's /metrics is unreadable).
        "preemptions": preempted1 - preempted0 if preempted0 is not None and preempted1 is not None else None,
        "summary": summarize([o.record for o in outcomes])["overall"],
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread (min, max) of every numeric leaf over the repeats."""

    def leaves(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in d.items():
            if k == "summary":
                continue
            if isinstance(v, dict):
                out.update(leaves(v, f"{prefix}{k}."))
            elif isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = float(v)
        return out

    flat = [leaves(r) for r in runs]
    keys = sorted({k for f in flat for k in f})
    agg: dict[str, Any] = {}
    for k in keys:
        vals = [f[k] for f in flat if k in f]
        agg[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return agg


def plot(report: dict[str, Any], path: Path) -> None:
    """TTFT P99 and whole-cluster CPU per request of every system on every workload: bars at the median over the
    repeats, whiskers from the fastest to the slowest repeat; the title names the run (start, repeats, wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(report["results"])
    systems = list(report["systems"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(1, len(systems))
    ttfts: list[float] = []  # the positive TTFT P99 medians: a log axis only when they span more than 20x

    def stat(w: str, name: str, key: str) -> tuple[float, float, float]:
        cell = report["results"][w].get(name, {}).get("median", {}).get(key, {})
        return (cell.get("median", np.nan), cell.get("min", np.nan), cell.get("max", np.nan))

    for j, name in enumerate(systems):
        xs = np.arange(len(workloads)) + j * width
        for ax, key in zip(axes, ("ttft_s.p99", "cpu_ms_per_request.total"), strict=True):
            med, lo, hi = (np.array(v, dtype=float) for v in zip(*(stat(w, name, key) for w in workloads), strict=True))
            if key == "ttft_s.p99":
                ttfts += [float(v) for v in med if np.isfinite(v) and v > 0]
            ax.bar(xs, med, width, label=name)
            # whiskers drawn apart from the bars (matplotlib's bar(yerr=) warns on a one-workload (2, 1) array)
            yerr = [[float(v) for v in np.nan_to_num(med - lo)], [float(v) for v in np.nan_to_num(hi - med)]]
            ax.errorbar(xs, med, yerr=yerr, fmt="none", ecolor="black", capsize=2, linewidth=0.8)
    repeats = report.get("repeats", "?")
    titles = (f"TTFT P99 (s), median of {repeats} (whiskers: min-max)", "CPU per request, whole cluster (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2)
        ax.set_xticklabels([w.split(":n=")[0] for w in workloads], rotation=15, fontsize=7)
    # A log axis over no positive value raises (a run where every request failed still gets a chart); over a narrow
    # range it makes small gaps look large.
    if ttfts and max(ttfts) > 20 * min(ttfts):
        axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    wall = report.get("wall_s")
    fig.suptitle(
        f"llumnix bench peers, started {report.get('started_at', '?')}"
        + (f", {wall / 60:.1f} min wall" if isinstance(wall, int | float) else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("peers")
@click.option("--systems", default=",".join(DEFAULT_SYSTEMS), show_default=True, help="Comma-separated systems.")
@click.option("--workload", "workloads", multiple=True, help="Workload spec (repeatable; default: two).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--instances", default=4, show_default=True)
@click.option(
    "--total-blocks",
    default=520,
    show_default=True,
    help="KV blocks per sim instance, as in the issue (the engine lowers its max_model_len to fit); 0: the profile's.",
)
@click.option(
    "--peers-venv",
    type=click.Path(path_type=Path),
    default=Path(tempfile.gettempdir()) / "llumnix-bench-peers",
    show_default=True,
    help="Throwaway virtualenv for the pinned routers (never the project's .venv).",
)
@click.option("--smoke", is_flag=True, help="CI: this project only (llumnix), warm-up and one run of 8 requests.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
def bench_peers(
    systems: str,
    workloads: tuple[str, ...],
    repeats: int,
    seed: int,
    instances: int,
    total_blocks: int,
    peers_venv: Path,
    smoke: bool,
    json_path: Path | None,
    plot_path: Path | None,
) -> None:
    """This project vs vllm-router and sglang-router on the same sim engines: JSON on stdout, summary on stderr."""
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    names = [s for s in systems.split(",") if s]
    wl = list(workloads) or list(DEFAULT_WORKLOADS)
    if smoke:
        names, wl, repeats = ["llumnix"], [SMOKE_WORKLOAD], 1
    if repeats < 1:
        raise click.UsageError("--repeats must be at least 1")
    for n in names:
        if n not in _POLICY_NAMES and n.split(":", 1)[0] not in PEER_PINS:
            raise click.UsageError(f"unknown system {n!r}")
    peers_bin = ensure_peers(peers_venv) if any(n.split(":")[0] in PEER_PINS for n in names) else None
    work = Path(tempfile.mkdtemp(prefix="llumnix-bench-peers-"))
    report: dict[str, Any] = {
        "started_at": started,
        "systems": {},
        "workloads": wl,
        "repeats": repeats,
        "seed": seed,
        "instances": instances,
        "total_blocks": total_blocks,
        "transport": "tcp",
        "cpu": "utime+stime from /proc of every process started (llumlets, frontends, scheduler, etcd, serve, router)",
        "procedure": PROCEDURE,
        "warmup_workload": WARMUP_WORKLOAD,
        "run_order": [f"run {k + 1}: {w} repeat {r + 1}" for k, (r, w) in enumerate(schedule(wl, repeats))],
        "results": {w: {} for w in wl},
    }
    try:
        with progress_bar() as bar:  # closed before the JSON: while it draws, rich routes stdout to stderr
            steps = Steps(bar, "bench peers", total=len(names) * len(wl) * repeats)
            _run_all(names, wl, repeats, seed, instances, total_blocks, peers_bin, work, report, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [
        f"{name} {w} run {k + 1}"
        for w in wl
        for name in names
        for k, r in enumerate(report["results"][w][name]["runs"])
        if not run_ok(r)
    ]
    failed += [f"{name} warm-up" for name in names if not report["systems"].get(name, {}).get("warmup_ok", False)]
    report["failed_runs"] = failed
    report["wall_s"] = time.monotonic() - t0
    _finish(report, names, wl, json_path, plot_path)
    if failed:
        sys.exit(1)


SMOKE_WORKLOAD = "fixed:poisson:rate=4:n=8:in=64:out=16"
# Replayed once on each freshly started cluster before its measured runs (not measured): every system's first
# measured run then meets warm connections, imports and caches, as every later run does.
WARMUP_WORKLOAD = "fixed:poisson:rate=4:n=8:in=64:out=16"
DRAIN_TIMEOUT_S = 30.0
PROCEDURE = (
    "each system is started once; a warm-up replay (not measured), then an idle CPU sample, then its runs in rounds "
    "(every workload once per round) against the same cluster; after each run every request must have ended at every "
    "frontend and llumlet, every KV block be free again and every process alive (else the run fails, and the next "
    "run gets a freshly started cluster)"
)


def schedule(workloads: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The order of one system's runs on its one cluster, as (repeat, workload): round by round (every workload
    once, then again). Why: a drift over the system's window (host load, the cluster's own warm state) then weighs on
    every workload's repeats alike, rather than on all the repeats of whichever workload ran last."""
    return [(r, w) for r in range(repeats) for w in workloads]


def run_arrivals(workload: str, index: int, seed: int, repeat: int) -> list[RequestArrival]:
    """The workload's seeded arrivals (the same times and lengths every repeat) with request ids tagged by workload and
    repeat, which changes the prompts' text (``text_prompt_of`` salts with the id) but not their token counts. Why: a
    cache-aware router keeps its prefix tree across runs on a warm cluster; a repeat's prompts must not match an
    earlier run's (on a freshly started cluster they had nothing to match)."""
    return [dataclasses.replace(a, request_id=f"w{index}r{repeat}-{a.request_id}") for a in generate(workload, seed)]


def run_ok(run: dict[str, Any]) -> bool:
    """Every request done, every process alive, the cluster drained after it."""
    return not run["failed"] and not run["dead_processes"] and bool(run.get("drain", {}).get("ok", True))


def check_drained(system: System, timeout: float = DRAIN_TIMEOUT_S) -> dict[str, Any]:
    """``wait_drained`` on the system's frontends and llumlets, with its processes' liveness."""
    return wait_drained(
        system.probes, lambda: [f"{p.name} (pid {p.pid})" for p in system.procs if not alive(p.pid)], timeout
    )


def _start(name: str, work: Path, total_blocks: int, instances: int, peers_bin: Path | None) -> System:
    """The system, refused unless the drain check can read every llumlet and a frontend (else it would pass blind)."""
    if name in _POLICY_NAMES:
        system = start_project(name, work, total_blocks, instances)
    else:
        assert peers_bin is not None
        system = start_router(name, work, total_blocks, instances, peers_bin)
    if len(system.probes.llumlet_metrics) != instances or not system.probes.frontends:
        system.stop()
        raise RuntimeError(f"{name}: no /metrics for every llumlet or no frontend to check drains: {system.probes}")
    return system


def _run_all(
    names: list[str],
    wl: list[str],
    repeats: int,
    seed: int,
    instances: int,
    total_blocks: int,
    peers_bin: Path | None,
    work: Path,
    report: dict[str, Any],
    steps: Steps | None = None,
) -> None:
    """Every system, one after the other, each on one cluster for all its runs (``_run_system``); then the median
    and spread of each cell. ``steps`` advances once per run."""
    steps = steps or Steps()
    for w in wl:
        for name in names:
            report["results"][w][name] = {"runs": []}
    for name in names:
        _run_system(name, wl, repeats, seed, instances, total_blocks, peers_bin, work, report, steps)
    for w in wl:
        for name in names:
            cell = report["results"][w][name]
            cell["median"] = _aggregate(cell["runs"])


def _run_system(
    name: str,
    wl: list[str],
    repeats: int,
    seed: int,
    instances: int,
    total_blocks: int,
    peers_bin: Path | None,
    work: Path,
    report: dict[str, Any],
    steps: Steps,
) -> None:
    """One system's runs (``schedule``) on one cluster, a drain check after each; a run after which the cluster does
    not drain (or a process died) is reported as failed, loudly, and the system is restarted for the next run."""
    t0 = time.monotonic()
    system: System | None = None
    idle: dict[str, float] = {}
    starts = 0
    notes: dict[str, Any] = {}
    try:
        for k, (r, w) in enumerate(schedule(wl, repeats)):
            if system is None:
                steps.describe(f"{name}: starting")
                system = _start(name, work, total_blocks, instances, peers_bin)
                starts += 1
                warm = run_once(system, run_arrivals(WARMUP_WORKLOAD, -1, 0, starts), {})
                warm_drain = check_drained(system)
                idle = idle_rates(system)
                notes = {
                    **system.notes,
                    "warmup_ok": warm["completed"] == len(generate(WARMUP_WORKLOAD, 0)) and warm_drain["ok"],
                    "warmup": {"completed": warm["completed"], "errors": warm["errors"], "drain": warm_drain},
                    "idle_cpu_s_per_s": idle,
                    "drain_probes": dataclasses.asdict(system.probes),
                }
                if not notes["warmup_ok"]:
                    click.echo(f"bench peers: {name}: WARM-UP FAILED: {notes['warmup']}", err=True)
            steps.describe(f"{name} {w.split(':n=')[0]} run {r + 1}/{repeats}")
            res = run_once(system, run_arrivals(w, wl.index(w), seed, r), idle)
            res["drain"] = check_drained(system)
            res["repeat"] = r + 1
            res["order"] = k + 1
            res["cluster_start"] = starts
            res["dead_processes"] = sorted(set(res["dead_processes"]) | set(res["drain"]["dead"]))
            report["results"][w][name]["runs"].append(res)
            steps.step()
            _echo_run(name, w, r, repeats, res)
            if not res["drain"]["ok"]:
                system.stop()  # the next run (if any) gets a fresh cluster: this one is not back to empty
                system = None
    finally:
        if system is not None:
            system.stop()
        notes["cluster_starts"] = starts
        notes["wall_s"] = time.monotonic() - t0
        report["systems"][name] = notes


def _echo_run(name: str, w: str, r: int, repeats: int, res: dict[str, Any]) -> None:
    drain = res.get("drain", {"ok": True, "seconds": 0.0, "left": [], "dead": []})
    click.echo(
        f"{name} {w} run {r + 1}/{repeats}: {res['completed']}/{res['completed'] + res['failed']} done, TTFT p99 "
        f"{res['ttft_s']['p99'] or float('nan'):.2f} s, "
        f"CPU {res['cpu_ms_per_request']['total']:.1f} ms/req, "
        f"llumlet+frontend {res['cpu_ms_per_token_llumlet_frontend']:.3f} ms/token, "
        f"{res.get('preemptions')} preemptions, "
        + (
            f"drained in {drain['seconds']:.1f} s"
            if drain["ok"]
            else f"NOT DRAINED after {drain['seconds']:.0f} s: {drain['left'][:4]} (the cluster is restarted)"
        )
        + (f", DEAD: {res['dead_processes']}" if res["dead_processes"] else ""),
        err=True,
    )


def _finish(
    report: dict[str, Any], names: list[str], wl: list[str], json_path: Path | None, plot_path: Path | None
) -> None:
    text = json.dumps(report, indent=1)
    if json_path is not None:
        json_path.write_text(text + "\n")
    if plot_path is not None:
        plot(json.loads(text), plot_path)  # from the very JSON written: the chart cannot disagree with it
    click.echo(text)
    for w in wl:
        parts = []
        for name in names:
            m = report["results"][w][name]["median"]
            parts.append(
                f"{name} TTFT p99 {m['ttft_s.p99']['median']:.2f} s "
                f"CPU {m['cpu_ms_per_request.total']['median']:.0f} ms/req"
                if "ttft_s.p99" in m
                else f"{name} -"
            )
        click.echo(f"peers {w}: " + "; ".join(parts), err=True)
    runs = sum(len(report["results"][w][n]["runs"]) for w in wl for n in names)
    click.echo(
        f"peers total wall {report['wall_s']:.0f} s ({report['wall_s'] / 60:.1f} min): {len(names)} system(s), "
        f"{runs} run(s)" + (f"; FAILED: {report['failed_runs']}" if report["failed_runs"] else ""),
        err=True,
    )
