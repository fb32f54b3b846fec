"""``llumnix bench serving``: replays a workload against a running cluster's frontend (gRPC ``Generate``) in real time
and reports the paper's latency metrics, computed by the same code as the simulator's (``tools.metrics``).

Each request is sent at its arrival time with ``input_len`` prompt tokens and ``max_tokens = output_len`` (EOS
ignored, so lengths are exact); the time of every streamed chunk is recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from pyllumnix.clients.client import AsyncLlumnixClient
from pyllumnix.tools.metrics import RequestRecord, summarize
from pyllumnix.tools.workload import RequestArrival, generate


async def _one(client: AsyncLlumnixClient, arrival: RequestArrival, t0: float, wall0: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + arrival.arrival_time_s - time.monotonic()))
    sent = time.monotonic() - t0
    prompt = [(i * 7919 + hash(arrival.request_id)) % 30000 + 3 for i in range(arrival.input_len)]
    token_times: list[float] = []
    first = finish = None
    async for chunk in client.generate(
        prompt,
        max_tokens=arrival.output_len,
        ignore_eos=True,
        priority="high" if arrival.priority >= 2 else "normal",
        request_id=f"{arrival.request_id}-{wall0:.0f}",
    ):
        now = time.monotonic() - t0
        token_times.extend([now] * len(chunk.token_ids))
        if chunk.token_ids and first is None:
            first = now
        if chunk.finished:
            finish = now
    return RequestRecord(
        request_id=arrival.request_id,
        priority=arrival.priority,
        arrival=sent,
        first_token_time=first,
        finish_time=finish,
        num_output_tokens=len(token_times),
        input_len=arrival.input_len,
        token_times=tuple(token_times),
    )


async def replay(frontends: Sequence[str], arrivals: Sequence[RequestArrival]) -> list[RequestRecord]:
    async with AsyncLlumnixClient(frontend_endpoints=list(frontends), timeout=30.0) as client:
        t0 = time.monotonic()
        return list(await asyncio.gather(*(_one(client, a, t0, time.time()) for a in arrivals)))


def run_serving_bench(frontends: Sequence[str], workload: str, seed: int, max_model_len: int) -> dict[str, Any]:
    arrivals = generate(workload, seed, max_model_len=max_model_len)
    t = time.monotonic()
    records = asyncio.run(replay(frontends, arrivals))
    summary = summarize(records)
    summary["workload"] = workload
    summary["wall_s"] = time.monotonic() - t
    return summary


@click.command("serving")
@click.option("--frontend", "frontends", required=True, help="Frontend gRPC address(es), comma-separated.")
@click.option("--workload", required=True, help="Workload spec, e.g. 'fixed:poisson:rate=5:n=200:in=128:out=32'.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-model-len", default=8192, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
def bench_serving(frontends: str, workload: str, seed: int, max_model_len: int, json_path: Path | None) -> None:
    """Replay a workload against a live cluster; latency metrics as JSON."""
    summary = run_serving_bench([f for f in frontends.split(",") if f], workload, seed, max_model_len)
    text = json.dumps(summary, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)
    overall = summary["overall"]
    click.echo(
        f"serving {workload}: {overall['num_finished']}/{overall['num_requests']} finished, "
        f"prefill mean {overall['prefill_s']['mean']:.4f} s p99 {overall['prefill_s']['p99']:.4f} s, "
        f"decode mean {overall['decode_s']['mean']:.4f} s/token"
    )
