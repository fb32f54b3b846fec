"""CPU per engine step of one busy sim llumlet, in process: serve's engine settings (llama-7b-a10, 8 KiB of KV payload
per token, 520 blocks, metrics on), ``--concurrency`` requests kept running (a finished one is replaced after the
step), outputs pushed over the real output stream to a recording sink in another process (plaintext, no TLS). No
load reporter (no scheduler): this is the engine loop and the push. Prints one JSON line: CPU per step of this
process (by thread) and of the sink, event-loop iterations per step, and with ``--timing`` the thread CPU of the
step's parts (each wrapped, so a little inflated).

    PYTHONPATH=<tree> .venv/bin/python docs/bench-peers/tokpath-step-cost.py [--interval N] [--no-push] [--timing]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from pyllumnix.data_plane.engine.profile import get_profile
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics
from pyllumnix.data_plane.llumlet.output_push import PushSettings
from pyllumnix.protos.llumnix.v1 import common_pb2

SINK = """
import asyncio, sys
from pyllumnix.tools.recording_sink import RecordingSink
from pyllumnix.protos.llumnix.v1 import frontend_pb2

class Counting(RecordingSink):  # answers like a frontend, keeps nothing
    async def PushOutputs(self, request, context):
        return frontend_pb2.PushOutputsResponse()

async def main():
    sink = Counting()
    print(await sink.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await sink.stop()

asyncio.run(main())
"""


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process by thread name (the event loop thread as "main")."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "main" if int(tid) == os.getpid() else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrap_timed(obj: Any, name: str, acc: dict[str, list[float]]) -> None:
    fn: Callable[..., Any] = getattr(obj, name)
    slot = acc.setdefault(name, [0.0, 0])

    @functools.wraps(fn)
    def timed(*a: Any, **k: Any) -> Any:
        started = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            slot[0] += time.thread_time() - started
            slot[1] += 1

    setattr(obj, name, timed)


def main(args: argparse.Namespace) -> None:
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdin is not None
        address = sink.stdout.readline().strip()
        asyncio.run(run(args, "" if args.no_push else address, sink.pid))
    finally:
        if sink.stdin is not None:
            sink.stdin.close()  # the sink ends when its stdin does
        sink.wait(10)


async def run(args: argparse.Namespace, address: str, sink_pid: int) -> None:
    profile = dataclasses.replace(get_profile("llama-7b-a10"), bytes_per_token=8192)
    engine = SimEngine(profile, total_blocks=520)
    push = PushSettings(stream_interval=args.interval) if args.interval else PushSettings()
    llumlet = Llumlet(engine, "i-1", push=push)
    llumlet.metrics = InstanceMetrics("i-1", "m", engine.load, lambda: llumlet.stats.migration, engine.request_ids)
    llumlet.start()
    added = 0
    pending: set[asyncio.Task[None]] = set()

    async def add() -> None:
        nonlocal added
        added += 1
        await llumlet.add_request(
            common_pb2.EngineRequest(
                request_id=f"r{added}",
                prompt_token_ids=list(range(1, args.prompt + 1)),
                sampling=common_pb2.SamplingParams(max_tokens=args.tokens, ignore_eos=True),
                frontend_address=address,
            )
        )

    def top_up() -> None:  # after each step: replace finished requests (no polling task of our own)
        for _ in range(args.concurrency - len(engine.request_ids()) - len(pending)):
            task = asyncio.get_running_loop().create_task(add())
            pending.add(task)
            task.add_done_callback(pending.discard)

    for _ in range(args.concurrency):
        await add()
    await asyncio.sleep(args.warmup)
    llumlet.after_step.append(top_up)
    acc: dict[str, list[float]] = {}
    if args.timing:
        for name in ("plan_step", "write_step_payload", "finish_step"):
            wrap_timed(engine, name, acc)
        wrap_timed(llumlet, "_emit", acc)
        wrap_timed(llumlet.pusher, "submit", acc)
        wrap_timed(llumlet.metrics, "outputs", acc)
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    select = selector.select
    iterations = 0

    def counted(timeout: float | None = None) -> Any:
        nonlocal iterations
        iterations += 1
        return select(timeout)

    selector.select = counted
    steps0, wall0, sink0, threads0 = llumlet.stats.steps, time.monotonic(), process_cpu(sink_pid), thread_cpu()
    messages0 = llumlet.pusher.pushed
    await asyncio.sleep(args.seconds)
    steps = llumlet.stats.steps - steps0
    threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu().items()}
    result = {
        "interval": llumlet.pusher.settings.stream_interval,
        "push": bool(address),
        "steps": steps,
        "steps_per_s": round(steps / (time.monotonic() - wall0), 2),
        "cpu_ms_per_step": round(1000 * sum(threads.values()) / steps, 3),
        "threads_ms_per_step": {k: round(1000 * v / steps, 3) for k, v in threads.items() if v > 0},
        "sink_cpu_ms_per_step": round(1000 * (process_cpu(sink_pid) - sink0) / steps, 3),
        "loop_iterations_per_step": round(iterations / steps, 2),
        "outputs_acked_per_step": round((llumlet.pusher.pushed - messages0) / steps, 2),
        "timing_us_per_step": {k: round(1e6 * v[0] / steps, 1) for k, v in acc.items()} or None,
    }
    print(json.dumps(result))
    await llumlet.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=5, help="requests kept running (bench peers: ~5)")
    parser.add_argument("--prompt", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=325)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--interval", type=int, default=0, help="stream_interval (0: the tree's default)")
    parser.add_argument("--no-push", action="store_true", help="outputs go nowhere (the engine loop alone)")
    parser.add_argument("--timing", action="store_true")
    main(parser.parse_args())
