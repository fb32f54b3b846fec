"""``llumnix bench serving``: replays a workload against a running cluster's frontend (gRPC ``Generate``) in real time
and reports the paper's latency metrics, computed by the same code as the simulator's (``tools.metrics``), plus the
result block of ``vllm bench serve`` (same fields, same JSON key names, same definitions) so runs compare directly.

Each request is sent at its arrival time with ``input_len`` prompt tokens and ``max_tokens = output_len`` (EOS
ignored, so lengths are exact); the time of every streamed chunk is recorded. A request that fails gets its error
counted (``failed``, ``errors``) instead of ending the run. stdout carries only the JSON report (``| jq`` works); the
result block, the one-line summary and the progress bar (on a terminal only) go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
import numpy as np

from pyllumnix.clients.channel import TlsConfig
from pyllumnix.clients.client import AsyncLlumnixClient
from pyllumnix.clients.errors import LlumnixError
from pyllumnix.infra.security.context import ContextError, context_path, load_context
from pyllumnix.tools.metrics import RequestRecord, summarize
from pyllumnix.tools.progress import progress_bar
from pyllumnix.tools.workload import RequestArrival, generate

RESULT_WIDTH = 50


@dataclass
class Outcome:
    """One request's record, the times of its token-carrying chunks (for ITL) and its error, if it failed."""

    record: RequestRecord
    chunk_times: list[float] = field(default_factory=list)
    error: str = ""
    exception: LlumnixError | None = None


def prompt_of(arrival: RequestArrival) -> list[int]:
    """Deterministic prompt tokens (crc32, not hash(): the same run sends the same prompts in every process)."""
    salt = zlib.crc32(arrival.request_id.encode())
    return [(i * 7919 + salt) % 30000 + 3 for i in range(arrival.input_len)]


async def _one(client: AsyncLlumnixClient, arrival: RequestArrival, t0: float, wall0: float) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + arrival.arrival_time_s - time.monotonic()))
    sent = time.monotonic() - t0
    token_times: list[float] = []
    chunk_times: list[float] = []
    first = finish = None
    error = ""
    exception: LlumnixError | None = None
    try:
        async for chunk in client.generate(
            prompt_of(arrival),
            max_tokens=arrival.output_len,
            ignore_eos=True,
            priority="high" if arrival.priority >= 2 else "normal",
            request_id=f"{arrival.request_id}-{wall0:.0f}",
        ):
            now = time.monotonic() - t0
            if chunk.token_ids:
                token_times.extend([now] * len(chunk.token_ids))
                chunk_times.append(now)
                if first is None:
                    first = now
            if chunk.finished:
                finish = now
                if chunk.finish_reason in ("abort", "error"):
                    error = f"finished with {chunk.finish_reason}"
    except LlumnixError as exc:
        finish, error, exception = None, f"{exc.code or 'error'}: {exc.details}", exc
    record = RequestRecord(
        request_id=arrival.request_id,
        priority=arrival.priority,
        arrival=sent,
        first_token_time=first,
        finish_time=finish if not error else None,
        num_output_tokens=len(token_times),
        input_len=arrival.input_len,
        token_times=tuple(token_times),
    )
    return Outcome(record, chunk_times, error, exception)


def text_prompt_of(arrival: RequestArrival) -> str:
    """A text prompt of exactly ``input_len`` tokens for the sim tokenizer (one token per 4 characters of a word,
    whitespace a token of its own: so one word of 4 x ``input_len`` letters), deterministic per request; routers that
    balance on text (cache-aware prefix trees) see distinct prompts."""
    salt = zlib.crc32(arrival.request_id.encode())
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = []
    for i in range(arrival.input_len):
        n = (i * 7919 + salt) % (26**4)
        pieces.append("".join(letters[(n // 26**k) % 26] for k in range(4)))
    return "".join(pieces)


async def _one_openai(
    session: aiohttp.ClientSession, url: str, model: str, arrival: RequestArrival, t0: float
) -> Outcome:
    """One streamed ``/v1/completions`` request (exact-length text prompt, EOS ignored, usage streamed); a token is
    counted per the final usage block (chunks may carry several tokens' text)."""
    await asyncio.sleep(max(0.0, t0 + arrival.arrival_time_s - time.monotonic()))
    sent = time.monotonic() - t0
    body = {
        "model": model,
        "prompt": text_prompt_of(arrival),
        "max_tokens": arrival.output_len,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunk_times: list[float] = []
    first = finish = None
    completion_tokens = 0
    error = ""
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                buf = b""
                async for data in resp.content.iter_any():
                    now = time.monotonic() - t0
                    buf += data
                    *events, buf = buf.split(b"\n\n")
                    for event in events:
                        line = event.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            finish = now
                            continue
                        msg = json.loads(payload)
                        if "error" in msg:
                            error = str(msg["error"].get("message", msg["error"]))[:200]
                            continue
                        if msg.get("usage"):
                            completion_tokens = int(msg["usage"].get("completion_tokens", 0))
                        choices = msg.get("choices") or []
                        if choices and choices[0].get("text"):
                            chunk_times.append(now)
                            if first is None:
                                first = now
                if finish is None and not error:
                    error = "stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    n = completion_tokens or len(chunk_times)
    token_times: tuple[float, ...] = ()
    if first is not None and finish is not None and n:
        # Chunks may carry several tokens: spread the counted tokens over the chunk times (first and last exact).
        token_times = tuple(
            float(t)
            for t in np.interp(np.linspace(0, len(chunk_times) - 1, n), np.arange(len(chunk_times)), chunk_times)
        )
    record = RequestRecord(
        request_id=arrival.request_id,
        priority=arrival.priority,
        arrival=sent,
        first_token_time=first,
        finish_time=finish if not error else None,
        num_output_tokens=n if not error else len(chunk_times),
        input_len=arrival.input_len,
        token_times=token_times,
    )
    return Outcome(record, chunk_times, error)


async def replay_openai(
    url: str, arrivals: Sequence[RequestArrival], model: str, api_key: str | None = None, timeout: float = 600.0
) -> tuple[list[Outcome], float]:
    """Runs every request against an OpenAI-compatible base URL (this project's frontend or any router)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=client_timeout) as session:
        with progress_bar() as bar:
            task = bar.add_task("requests", total=len(arrivals))

            async def tracked(arrival: RequestArrival, t0: float) -> Outcome:
                try:
                    return await _one_openai(session, url.rstrip("/"), model, arrival, t0)
                finally:
                    bar.advance(task)

            t0 = time.monotonic()
            outcomes = list(await asyncio.gather(*(tracked(a, t0) for a in arrivals)))
            return outcomes, time.monotonic() - t0


async def replay(
    frontends: Sequence[str], arrivals: Sequence[RequestArrival], tls: TlsConfig | None = None
) -> list[RequestRecord]:
    """The records of every request; the first client error is raised (callers that need every request to finish)."""
    outcomes, _ = await replay_outcomes(frontends, arrivals, tls)
    for o in outcomes:
        if o.exception is not None:
            raise o.exception
    return [o.record for o in outcomes]


async def replay_outcomes(
    frontends: Sequence[str], arrivals: Sequence[RequestArrival], tls: TlsConfig | None = None
) -> tuple[list[Outcome], float]:
    """Runs every request; returns the outcomes and the benchmark duration (first send to last end, as vLLM's).

    No ``frontends``: the client context file gives the frontend and its credentials (as for the Python client).
    """
    endpoints = list(frontends) or None
    async with AsyncLlumnixClient(frontend_endpoints=endpoints, tls=tls, timeout=30.0) as client:
        with progress_bar() as bar:
            task = bar.add_task("requests", total=len(arrivals))

            async def tracked(arrival: RequestArrival, t0: float, wall0: float) -> Outcome:
                try:
                    return await _one(client, arrival, t0, wall0)
                finally:
                    bar.advance(task)

            t0 = time.monotonic()
            wall0 = time.time()
            outcomes = list(await asyncio.gather(*(tracked(a, t0, wall0) for a in arrivals)))
            return outcomes, time.monotonic() - t0


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/p99 in ms with vLLM's key names (numpy's linear percentile, as vLLM); None without data."""
    if not values_s:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "std", "p99")}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def serving_result(outcomes: Sequence[Outcome], duration_s: float) -> dict[str, Any]:
    """``vllm bench serve``'s result fields, from the same records as the rest of the report.

    TTFT: first token minus send. TPOT (per request with > 1 token): (finish - first token) / (tokens - 1). ITL: the
    gaps between successive token-carrying chunks of each request. Throughputs count completed requests over the
    benchmark duration.
    """
    done = [o for o in outcomes if not o.error and o.record.finish_time is not None]
    ttft = [o.record.first_token_time - o.record.arrival for o in done if o.record.first_token_time is not None]
    tpot = [
        (o.record.finish_time - o.record.first_token_time) / (o.record.num_output_tokens - 1)
        for o in done
        if o.record.num_output_tokens > 1 and o.record.first_token_time is not None and o.record.finish_time
    ]
    itl = [b - a for o in done for a, b in zip(o.chunk_times, o.chunk_times[1:], strict=False)]
    total_in = sum(o.record.input_len for o in done)
    total_out = sum(o.record.num_output_tokens for o in done)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "duration": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) * per_s,
        "output_throughput": total_out * per_s,
        "total_token_throughput": (total_in + total_out) * per_s,
        **_stats("ttft", ttft),
        **_stats("tpot", tpot),
        **_stats("itl", itl),
    }


def write_records(outcomes: Sequence[Outcome], path: Path) -> None:
    """One JSON line per request: its record (times in seconds from the replay's start, token times to 0.1 ms)."""
    with path.open("w") as f:
        for o in outcomes:
            r = o.record
            line = {
                "request_id": r.request_id,
                "priority": r.priority,
                "input_len": r.input_len,
                "arrival": r.arrival,
                "first_token_time": r.first_token_time,
                "finish_time": r.finish_time,
                "num_output_tokens": r.num_output_tokens,
                "token_times": [round(t, 4) for t in r.token_times or ()],
                "error": o.error,
            }
            f.write(json.dumps(line) + "\n")


def result_block(result: dict[str, Any]) -> str:
    """The result block as ``vllm bench serve`` prints it (same labels and order)."""

    def line(label: str, value: Any, fmt: str = ".2f") -> str:
        shown = "-" if value is None else format(value, fmt) if isinstance(value, float) else str(value)
        return f"{label:<40} {shown:<10}"

    def section(title: str) -> str:
        return f"{title:-^{RESULT_WIDTH}}"

    rows = [
        f"{' Serving Benchmark Result ':=^{RESULT_WIDTH}}",
        line("Successful requests:", result["completed"]),
        line("Failed requests:", result["failed"]),
        line("Benchmark duration (s):", result["duration"]),
        line("Total input tokens:", result["total_input_tokens"]),
        line("Total generated tokens:", result["total_output_tokens"]),
        line("Request throughput (req/s):", result["request_throughput"]),
        line("Output token throughput (tok/s):", result["output_throughput"]),
        line("Total Token throughput (tok/s):", result["total_token_throughput"]),
    ]
    for key, title, label in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
    ):
        rows.append(section(title))
        rows.append(line(f"Mean {label} (ms):", result[f"mean_{key}_ms"]))
        rows.append(line(f"Median {label} (ms):", result[f"median_{key}_ms"]))
        rows.append(line(f"P99 {label} (ms):", result[f"p99_{key}_ms"]))
    rows.append("=" * RESULT_WIDTH)
    return "\n".join(r.rstrip() for r in rows)


def run_serving_bench(
    frontends: Sequence[str],
    workload: str,
    seed: int,
    max_model_len: int,
    tls: TlsConfig | None = None,
    *,
    openai_url: str = "",
    model: str = "llama-7b-a10",
    api_key: str | None = None,
    records_path: Path | None = None,
) -> dict[str, Any]:
    """``openai_url``: measure an OpenAI-compatible HTTP endpoint (streamed completions) instead of gRPC Generate.
    ``records_path``: also write every request's record (JSON lines), for comparing runs request by request."""
    arrivals = generate(workload, seed, max_model_len=max_model_len)
    t = time.monotonic()
    if openai_url:
        outcomes, duration = asyncio.run(replay_openai(openai_url, arrivals, model, api_key))
    else:
        outcomes, duration = asyncio.run(replay_outcomes(frontends, arrivals, tls))
    summary = summarize([o.record for o in outcomes])
    if records_path is not None:
        write_records(outcomes, records_path)
    summary["workload"] = workload
    summary["wall_s"] = time.monotonic() - t
    # vLLM's key names at the top level, so `vllm bench serve` JSON and this one compare field by field.
    summary.update(serving_result(outcomes, duration))
    summary["errors"] = sorted({o.error for o in outcomes if o.error})[:10]
    return summary


@click.command("serving")
@click.option(
    "--frontend",
    "frontends",
    default="",
    help="Frontend gRPC address(es), comma-separated (default: the client context file `llumnix serve` writes, with "
    "its TLS and API key).",
)
@click.option("--workload", required=True, help="Workload spec, e.g. 'fixed:poisson:rate=5:n=200:in=128:out=32'.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-model-len", default=8192, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--ca", type=click.Path(dir_okay=False), default=None, help="PEM root certificates (TLS).")
@click.option("--cert", type=click.Path(dir_okay=False), default=None, help="PEM client certificate (mTLS).")
@click.option("--key", type=click.Path(dir_okay=False), default=None, help="PEM client private key (mTLS).")
@click.option("--api-key", envvar="LLUMNIX_API_KEY", default=None, help="API key (implies TLS; env LLUMNIX_API_KEY).")
@click.option(
    "--openai-url",
    default="",
    help="Measure an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000; a router's) with streamed "
    "/v1/completions (exact-length text prompts, ignore_eos, streamed usage) instead of gRPC Generate.",
)
@click.option("--model", default="llama-7b-a10", show_default=True, help="Model name sent in OpenAI mode.")
@click.option(
    "--records",
    "records_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write every request's record here (JSON lines: times, token times, error).",
)
def bench_serving(
    frontends: str,
    workload: str,
    seed: int,
    max_model_len: int,
    json_path: Path | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    api_key: str | None,
    openai_url: str,
    model: str,
    records_path: Path | None,
) -> None:
    """Replay a workload against a live cluster: JSON on stdout; vLLM-style result block and summary on stderr."""
    tls: TlsConfig | None = None
    if openai_url:
        summary = run_serving_bench(
            [],
            workload,
            seed,
            max_model_len,
            openai_url=openai_url,
            model=model,
            api_key=api_key,
            records_path=records_path,
        )
        _report(summary, workload, json_path)
        return
    if ca or cert or key or api_key:
        try:
            tls = TlsConfig.from_files(ca, cert, key, api_key=api_key or None)
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"TLS: {exc}") from None
    endpoints = [f for f in frontends.split(",") if f]
    if not endpoints:
        try:
            context = load_context()
        except ContextError as exc:
            raise click.UsageError(str(exc)) from None
        if context is None or not context.frontend:
            raise click.UsageError(f"no --frontend, and the client context file {context_path()} names none")
    summary = run_serving_bench(endpoints, workload, seed, max_model_len, tls, records_path=records_path)
    _report(summary, workload, json_path)


def _report(summary: dict[str, Any], workload: str, json_path: Path | None) -> None:
    text = json.dumps(summary, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)
    click.echo(result_block(summary), err=True)
    overall = summary["overall"]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    click.echo(
        f"serving {workload}: {overall['num_finished']}/{overall['num_requests']} finished, "
        f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} tok/s, "
        f"TTFT mean {fmt(summary['mean_ttft_ms'], '.1f')} ms p99 {fmt(summary['p99_ttft_ms'], '.1f')} ms, "
        f"TPOT mean {fmt(summary['mean_tpot_ms'], '.2f')} ms, ITL p99 {fmt(summary['p99_itl_ms'], '.2f')} ms",
        err=True,
    )
    if summary["failed"]:
        sys.exit(1)
