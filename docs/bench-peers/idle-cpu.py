"""What an idle cluster burns: starts ``llumnix serve`` exactly as ``llumnix bench peers`` does (4 sim llumlets,
``--total-blocks 520``, TCP, one scheduler, default mutual TLS), sends nothing, waits ``--settle`` seconds, then
samples every component's CPU (utime + stime from /proc, per process and per thread) over ``--seconds``. Prints one
JSON object: cores per component kind and per thread name, and the host's load average around the sample.

    PYTHONPATH=<tree> .venv/bin/python docs/bench-peers/idle-cpu.py --seconds 30 --json idle-<tree>.json

``--py-spy DIR`` also records the scheduler and the first llumlet with py-spy (on-CPU samples only, raw folded
stacks) over the same window, so their idle work can be attributed by function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from pyllumnix.tools.bench_peers import cpu_seconds, start_project, thread_cpu_seconds


@click.command()
@click.option("--seconds", default=30.0, show_default=True, help="Length of the CPU sample.")
@click.option("--settle", default=8.0, show_default=True, help="Seconds to wait after start before sampling.")
@click.option("--instances", default=4, show_default=True)
@click.option("--blocks", default=520, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--py-spy", "spy_dir", type=click.Path(path_type=Path), default=None)
def main(
    seconds: float, settle: float, instances: int, blocks: int, json_path: Path | None, spy_dir: Path | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="idle-cpu-") as work:
        system = start_project("llumnix", Path(work), blocks, instances)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            time.sleep(settle)
            if spy_dir is not None:
                spy_dir.mkdir(parents=True, exist_ok=True)
                targets = [p for p in system.procs if p.kind == "scheduler"]
                targets += [p for p in system.procs if p.kind == "llumlet"][:1]
                for p in targets:
                    out = spy_dir / f"{p.kind}-{p.pid}.txt"
                    cmd = [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--pid",
                        str(p.pid),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        "200",
                    ]
                    cmd += ["--threads", "--nonblocking", "--format", "raw", "--output", str(out)]
                    spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            load0 = os.getloadavg()
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in system.procs}
            thr0 = {p.pid: thread_cpu_seconds(p.pid) for p in system.procs}
            t0 = time.monotonic()
            time.sleep(seconds)
            wall = time.monotonic() - t0
            cores: dict[str, float] = {}
            threads: dict[str, dict[str, float]] = {}
            for p in system.procs:
                cores[p.kind] = cores.get(p.kind, 0.0) + (cpu_seconds(p.pid) - cpu0[p.pid]) / wall
                per = threads.setdefault(p.kind, {})
                for name, secs in thread_cpu_seconds(p.pid).items():
                    per[name] = per.get(name, 0.0) + (secs - thr0[p.pid].get(name, 0.0)) / wall
            for spy in spies:
                spy.wait(timeout=seconds + 30)
            report: dict[str, Any] = {
                "seconds": wall,
                "instances": instances,
                "idle_cores": cores | {"total": sum(cores.values())},
                "idle_cores_by_thread": {k: dict(sorted(v.items())) for k, v in threads.items()},
                "ms_per_s_per_llumlet": 1000 * cores.get("llumlet", 0.0) / max(1, instances),
                "loadavg_before_after": [load0[0], os.getloadavg()[0]],
            }
        finally:
            for spy in spies:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            system.stop()
    text = json.dumps(report, indent=2)
    click.echo(text)
    if json_path is not None:
        json_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
