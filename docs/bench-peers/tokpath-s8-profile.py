"""Profile of the busy token path under ``bench peers``'s real load (session 8): starts the cluster exactly as
``llumnix bench peers --systems llumnix`` does, replays the workload once (``run_once``, so the CPU figures are the
benchmark's), and while it runs records one llumlet and the frontend with py-spy (``--threads --nonblocking``, raw
folded stacks, on-CPU samples only unless ``--idle``) from ``--spy-after`` seconds into the run for ``--spy-seconds``.
Also samples each traced process's per-thread CPU over the same window from /proc.

    PYTHONPATH=<tree> .venv/bin/python docs/bench-peers/tokpath-s8-profile.py --out /tmp/prof --json prof.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from pyllumnix.tools.bench_peers import idle_rates, run_once, start_project, thread_cpu_seconds
from pyllumnix.tools.workload import generate


def wakeups(pid: int) -> dict[str, int]:
    """Voluntary context switches per thread name (summed): each is a blocking wait that ended, i.e. a wake-up."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        name = fields.get("Name", "?").strip()
        out[name] = out.get(name, 0) + int(fields.get("voluntary_ctxt_switches", "0"))
    return out


@click.command()
@click.option("--workload", default="M-M:poisson:rate=4:n=100:len_max=1024", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--spy-after", default=10.0, show_default=True)
@click.option("--spy-seconds", default=40, show_default=True)
@click.option("--rate", default=200, show_default=True)
@click.option("--idle", is_flag=True, help="Also record off-CPU samples.")
@click.option("--strace", "strace_s", default=0, help="Also strace the traced processes' main threads this long.")
@click.option("--spy/--no-spy", default=True, help="Without py-spy: only /proc's per-thread CPU and wake-ups.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(
    workload: str,
    seed: int,
    spy_after: float,
    spy_seconds: int,
    rate: int,
    idle: bool,
    spy: bool,
    strace_s: int,
    out_dir: Path,
    json_path: Path | None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrivals = generate(workload, seed)
    with tempfile.TemporaryDirectory(prefix="tokpath-s8-") as work:
        system = start_project("llumnix", Path(work), 520, 4)
        targets = [p for p in system.procs if p.kind == "llumlet"][:1]
        targets += [p for p in system.procs if p.kind == "frontend"][:1]
        spies: list[subprocess.Popen[bytes]] = []
        threads_cpu: dict[str, Any] = {}
        wakes: dict[str, Any] = {}

        def sample() -> None:
            time.sleep(3.0 + spy_after)  # run_once's idle sample first
            t0 = {p.pid: thread_cpu_seconds(p.pid) for p in targets}
            w0 = {p.pid: wakeups(p.pid) for p in targets}
            for p in targets if spy else []:
                cmd = [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(p.pid),
                    "--duration",
                    str(spy_seconds),
                    "--rate",
                    str(rate),
                    "--threads",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(out_dir / f"{p.kind}-{p.pid}.txt"),
                ]
                if idle:
                    cmd.append("--idle")
                spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if strace_s:
                for p in targets:
                    cmd = [
                        "timeout",
                        "-s",
                        "INT",
                        str(strace_s),
                        "strace",
                        "-tt",
                        "-p",
                        str(p.pid),
                        "-e",
                        "trace=epoll_wait,epoll_pwait,read,write,sendmsg,recvmsg,eventfd2,futex",
                        "-o",
                        str(out_dir / f"strace-{p.kind}-{p.pid}.txt"),
                    ]
                    spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(spy_seconds)
            for p in targets:
                now = thread_cpu_seconds(p.pid)
                threads_cpu[f"{p.kind}-{p.pid}"] = {
                    k: round(1000 * (v - t0[p.pid].get(k, 0.0)) / spy_seconds, 2) for k, v in now.items()
                }
                w = wakeups(p.pid)
                wakes[f"{p.kind}-{p.pid}"] = {
                    k: round((v - w0[p.pid].get(k, 0)) / spy_seconds, 1) for k, v in w.items()
                }

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            res = run_once(system, arrivals, idle_rates(system))
            th.join(timeout=spy_seconds + spy_after + 30)
            for s in spies:
                s.wait(timeout=60)
        finally:
            for s in spies:
                if s.poll() is None:
                    s.kill()
                    s.wait()
            system.stop()
    report = {"run": res, "thread_cpu_ms_per_s_during_spy": threads_cpu, "wakeups_per_s_during_spy": wakes}
    text = json.dumps(report, indent=1)
    click.echo(
        json.dumps(
            {
                "cpu_ms_per_request": res["cpu_ms_per_request"],
                "ms_per_token": res["cpu_ms_per_token_llumlet_frontend"],
                "threads": threads_cpu,
                "wakeups_per_s": wakes,
            }
        )
    )
    if json_path is not None:
        json_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
