"""Where a served request's CPU goes, per component and thread: idle, per request, per streamed token (issue #20).

Starts ``llumnix serve`` as ``llumnix bench peers`` does (4 sim llumlets, 520 blocks, mutual TLS inside), then:

- idle: 10 s with nothing to do (the rate is subtracted from the phases below);
- per request: 80 requests at 4/s with a 300-token prompt and ``max_tokens`` 1 (the request path, almost no tokens);
- per token: 16 requests of 600 tokens started 50 ms apart (the token path; ~4 requests per instance per step).

CPU is utime + stime from /proc, per process kind and, for the frontend and the scheduler, per thread ("main": the
event loop; gRPC's ``event_engine`` and ``python``-named threads). ``PERF=<name>`` also records the frontend with
``perf record -g`` per phase (to /tmp/<name>-<phase>.perf). Run: ``.venv/bin/python docs/bench-peers/
frontend-s6-decompose.py > out.json`` (``PYTHONPATH=<snapshot>`` to measure another tree).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pyllumnix.tools.bench_peers import cpu_seconds, start_project, thread_cpu_seconds
from pyllumnix.tools.bench_serving import replay_openai
from pyllumnix.tools.workload.request import RequestArrival

IDLE_S = 10.0


def main() -> dict[str, Any]:
    perf = os.environ.get("PERF", "")
    work = Path(tempfile.mkdtemp(prefix="decompose-"))
    try:
        return _measure(perf, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(perf: str, work: Path) -> dict[str, Any]:
    system = start_project("llumnix", work, 520, 4)
    pids: dict[str, list[int]] = {}
    for p in system.procs:
        pids.setdefault(p.kind, []).append(p.pid)

    def cpu() -> dict[str, float]:
        return {k: sum(cpu_seconds(x) for x in v) for k, v in pids.items()}

    def threads() -> dict[str, dict[str, float]]:
        return {k: thread_cpu_seconds(pids[k][0]) for k in ("frontend", "scheduler")}

    out: dict[str, Any] = {}
    try:
        time.sleep(3)
        c0 = cpu()
        time.sleep(IDLE_S)
        c1 = cpu()
        out["idle_ms_per_s"] = {k: 1000 * (c1[k] - c0[k]) / IDLE_S for k in c0}

        def phase(name: str, arrivals: list[RequestArrival], tokens: int) -> None:
            recorder = None
            if perf:
                cmd = ["perf", "record", "-F", "999", "-g", "-p", str(pids["frontend"][0])]
                recorder = subprocess.Popen(
                    [*cmd, "-o", f"/tmp/{perf}-{name}.perf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                time.sleep(1)
            ta, a, t = threads(), cpu(), time.monotonic()
            outcomes, _ = asyncio.run(replay_openai(system.url, arrivals, "llama-7b-a10", system.api_key))
            b, wall, tb = cpu(), time.monotonic() - t, threads()
            if recorder is not None:
                recorder.send_signal(2)
                recorder.wait(30)
            n = len(arrivals)
            net = {k: (b[k] - a[k]) - out["idle_ms_per_s"][k] / 1000 * wall for k in a}
            out[name] = {
                "requests": n,
                "tokens": tokens,
                "wall_s": wall,
                "errors": [o.error for o in outcomes if o.error][:3],
                "ms_per_request": {k: 1000 * (b[k] - a[k]) / n for k in a},
                "ms_per_request_net_of_idle": {k: 1000 * v / n for k, v in net.items()},
                "ms_per_token_net_of_idle": {k: 1000 * v / tokens for k, v in net.items()},
                "threads_ms_per_request": {
                    k: {th: 1000 * (tb[k][th] - ta[k].get(th, 0.0)) / n for th in sorted(tb[k])} for k in tb
                },
            }

        phase("per_request", [RequestArrival(f"a{i}", i * 0.25, 300, 1) for i in range(80)], 80)
        phase("per_token", [RequestArrival(f"b{i}", i * 0.05, 50, 600) for i in range(16)], 16 * 600)
    finally:
        system.stop()
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
