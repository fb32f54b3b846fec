"""``llumnix bench migration``: live-migration downtime vs sequence length, next to a blocking copy and recompute.

Two llumlet processes (sim engine, real KV payload of the profile's size, real time) migrate one request of each
length mid-decode over the chosen transport, then a request of the same length back with a last stage that takes
every block (the blocking, single-stage stop-and-copy migration); ``recompute_ms`` is the profile's modelled prefill of
the same tokens (what a migration by recomputation would stall for). All figures come from the same run.

``--engine vllm --model PATH``: the same on two real vLLM llumlets (CPU settings as ``llumnix serve`` uses), and
``recompute_ms`` is measured, not modelled: the time to first token of a fresh request of ``seq_len`` prompt tokens
(``max_tokens=1``) on the idle destination engine, AddRequest to its token at the sink, i.e. what re-adding the
request there and prefilling it again would stall it for (``ttft_floor_ms``: the same for an 8-token prompt, the fixed
part). Lengths are limited by the model's maximum length (``--max-model-len``, the tiny model's 1024 by default);
each request keeps at least ``VLLM_MIN_OUTPUT`` tokens to decode so it is still running when the migration commits.

- ``downtime_ms``: the request stopped on the source until the destination installed it (its next step continues it).
- ``total_ms``: migrate-out order to commit.
- ``decode_step_ms``: the profile's modelled decode step at that length (batch 1), the paper's yardstick.

Security (``--security``, default ``both``): each phase starts its own pair of llumlets. ``mtls``: a throwaway local
PKI, mutual TLS with role checks on every gRPC call (this process calls as a frontend for AddRequest/AbortRequest and
as the leader of term 1 for MigrateOut; its recording sink serves mutual TLS), one-time transfer tokens and the
data-plane integrity check on, as a secure cluster runs. ``plaintext``: ``--insecure`` llumlets. With ``both`` the
plaintext phase runs first, then the mTLS one; the top-level ``rows``/``ratios`` are the mTLS phase's (the default
configuration), ``plaintext`` holds the other, and ``mtls_vs_plaintext`` compares them length by length. The recording
sink grants no capability tokens, so no capability hand-over runs (it happens before the last stage, outside the
downtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import grpc

from pyllumnix.data_plane.engine.profile import get_profile
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.launch import Launcher
from pyllumnix.tools.progress import Steps, progress_bar
from pyllumnix.tools.recording_sink import RecordingSink

# Enough output that the request never finishes during its migration on a loaded machine (512 decode steps of the
# 7B profile are ~16 s; a 4 GiB stage on a loaded 2-core host takes a few); it is aborted on the destination right
# after the measurement. At the profile's maximum length the prompt is shortened to keep this much room.
OUTPUT_TOKENS = 512
MIGRATE_AFTER_TOKENS = 8
# A last stage that takes every block: the blocking, single-stage copy.
BLOCKING = 1 << 30
VLLM_LENGTHS = "64,128,256,512,768"
VLLM_MAX_MODEL_LEN = 1024
VLLM_MIN_OUTPUT = 256
TTFT_FLOOR_TOKENS = 8
# This process orders migrations as the leader of this term (no scheduler runs; a llumlet that never saw a leader
# admits any positive term).
BENCH_TERM = 1
SECURITY_MODES = {"both": ("plaintext", "mtls"), "mtls": ("mtls",), "plaintext": ("plaintext",)}
# The downtime targets the sim bench checks (the paper's): flat in the length, under a decode step, far below recompute.
TARGETS = {
    "downtime_last_over_first_max": 1.5,
    "max_downtime_over_decode_step_max": 1.0,
    "recompute_over_downtime_min": 50,
}


class Phase:
    """One security setting: its launcher (secure or opted out) and how this process calls the llumlets in it."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.secure = name == "mtls"
        self.launcher = Launcher(log_dir / name, secure=self.secure, cluster="bench-migration")
        self.sink = RecordingSink()

    def channel(self, address: str, role: str) -> grpc.aio.Channel:
        """A channel to a llumlet as ``role`` (mutual TLS with a certificate of that role when secure)."""
        channel: grpc.aio.Channel = self.launcher.channel(address, role)
        return channel

    def order_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """A leader's term on MigrateOut, which secure llumlets require."""
        return term_metadata(BENCH_TERM) if self.secure else None

    async def start_sink(self) -> None:
        """The sink serves as a frontend would: mutual TLS (llumlets push to it with their certificates) when secure."""
        previous = runtime.configure(self.launcher.security("frontend", "bench-sink"))
        try:
            await self.sink.start()
        finally:
            runtime.configure(previous)

    async def refuses_plaintext(self, address: str) -> bool:
        """Whether the llumlet at ``address`` refuses a plaintext call (it must exactly when the phase is secure): the
        report says it checked, rather than trusting the flags."""
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await llumlet_pb2_grpc.LlumletServiceStub(channel).GetLoad(llumlet_pb2.GetLoadRequest(), timeout=10)
            except grpc.aio.AioRpcError:
                return True
        return False

    async def checked(self, addresses: list[str]) -> dict[str, Any]:
        refused = [await self.refuses_plaintext(a) for a in addresses]
        if any(r != self.secure for r in refused):
            raise RuntimeError(f"{self.name} phase: llumlets refusing plaintext calls: {refused}")
        return {"phase": self.name, "llumlets_refuse_plaintext": all(refused)}

    def stop(self) -> None:
        self.launcher.stop_all()


async def _migrate_once(
    phase: Phase,
    src: str,
    dst: str,
    dst_id: str,
    rid: str,
    prompt: list[int],
    max_tokens: int,
    last_stage_max_blocks: int = 0,
    strict_stream: bool = True,
) -> llumlet_pb2.MigrationResult:
    """One request migrated mid-decode; ``strict_stream``: no output pushed twice either (else: no gap)."""
    sink = phase.sink
    request = common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=1, ignore_eos=True),
        frontend_address=sink.server.address if sink.server else "",
    )
    async with phase.channel(src, "frontend") as frontend, phase.channel(src, "scheduler") as leader:
        await llumlet_pb2_grpc.LlumletServiceStub(frontend).AddRequest(
            llumlet_pb2.AddRequestRequest(request=request), timeout=30
        )
        deadline = time.monotonic() + 120
        while len(sink.tokens(rid)) < MIGRATE_AFTER_TOKENS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rid} produced no tokens")
            await asyncio.sleep(0.005)
        reply = await llumlet_pb2_grpc.LlumletServiceStub(leader).MigrateOut(
            llumlet_pb2.MigrateOutRequest(
                destination_instance_id=dst_id,
                destination_grpc_address=dst,
                request_id=rid,
                wait=True,
                last_stage_max_blocks=last_stage_max_blocks,
            ),
            timeout=120,
            metadata=phase.order_metadata(),
        )
    result: llumlet_pb2.MigrationResult = reply.results[0]
    if result.outcome != llumlet_pb2.MIGRATION_OUTCOME_COMMITTED:
        raise RuntimeError(f"migration of {rid} did not commit: {result.reason}")
    kept = len(sink.tokens(rid))
    async with phase.channel(dst, "frontend") as channel:
        try:
            await llumlet_pb2_grpc.LlumletServiceStub(channel).AbortRequest(
                llumlet_pb2.AbortRequestRequest(request_id=rid), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: it finished on the destination already
                raise
    await sink.wait(rid, timeout=120)
    raw, n = sink.raw_indices(rid), len(sink.tokens(rid))
    if (raw if strict_stream else sorted(set(raw))) != list(range(n)) or n < kept:
        raise RuntimeError(f"{rid}: the token stream has a gap or a duplicate")
    return result


def _measured_row(
    length: int, downtimes: list[float], totals: list[float], stages: list[int], blocking_ms: list[float]
) -> dict[str, Any]:
    """The figures both engines' rows share: best of the repeats (all downtimes kept), stages at most."""
    return {
        "seq_len": length,
        "downtime_ms": round(min(downtimes), 2),
        "downtime_ms_all": [round(x, 2) for x in downtimes],
        "total_ms": round(min(totals), 2),
        "stages": max(stages),
        "blocking_copy_ms": round(min(blocking_ms), 2),
    }


def _sim_prompt(length: int, max_model_len: int) -> list[int]:
    """The prompt for a ``length`` row: the sequence migrates at ~``length`` tokens, and ``OUTPUT_TOKENS`` still
    fit after the prompt (at the model's maximum length the prompt gives way: 7,680 tokens for 8,192)."""
    n = max(1, min(length - min(128, length // 2), max_model_len - OUTPUT_TOKENS))
    return [(i * 31) % 30000 + 3 for i in range(n)]


async def _sim_phase(
    phase: Phase,
    profile_name: str,
    transport: str,
    lengths: list[int],
    bytes_per_token: int | None,
    repeats: int,
    steps: Steps | None = None,
) -> dict[str, Any]:
    steps = steps or Steps()
    profile = get_profile(profile_name)
    kv_bytes = max(lengths) * (bytes_per_token or profile.bytes_per_token)
    # Each side touches the KV memory of the longest request up front, as a GPU's preallocated KV pool would be.
    prewarm_mib = (kv_bytes + profile.block_bytes * 8) >> 20
    common = ["--profile", profile_name, "--transport", transport, "--transfer-timeout", "60"]
    common += ["--prewarm-kv-mib", str(prewarm_mib)]
    if bytes_per_token:
        common += ["--bytes-per-token", str(bytes_per_token)]
    await phase.start_sink()
    try:
        live = [
            phase.launcher.start(f"llumlet-{i}", "llumlet", "--instance-id", f"llumlet-{i}", *common, timeout=300)
            for i in range(2)
        ]
        checked = await phase.checked([c.address for c in live])
        rows: list[dict[str, Any]] = []
        max_len = profile.max_model_len
        for length in lengths:
            downtimes, totals, blocking_ms, stages = [], [], [], []
            for r in range(repeats):
                steps.describe(f"{phase.name} {length} tokens")
                prompt = _sim_prompt(length, max_len)
                max_tokens = OUTPUT_TOKENS
                res = await _migrate_once(
                    phase, live[0].address, live[1].address, "llumlet-1", f"l{length}-{r}", prompt, max_tokens
                )
                downtimes.append(res.downtime_ms)
                totals.append(res.total_ms)
                stages.append(res.stages)
                blk = await _migrate_once(
                    phase, live[1].address, live[0].address, "llumlet-0", f"b{length}-{r}", prompt, max_tokens, BLOCKING
                )
                blocking_ms.append(blk.downtime_ms)
                steps.step()
            rows.append(
                {
                    **_measured_row(length, downtimes, totals, stages, blocking_ms),
                    "recompute_ms": round(profile.prefill_ms(length), 2),
                    "decode_step_ms": round(profile.decode_ms(1, length), 2),
                    "kv_mib": round(length * (bytes_per_token or profile.bytes_per_token) / 2**20, 1),
                    "prompt_tokens": len(_sim_prompt(length, max_len)),
                }
            )
            click.echo(json.dumps({"security": phase.name, **rows[-1]}), err=True)
    finally:
        phase.stop()
        await phase.sink.stop()
    first, last = rows[0], rows[-1]
    ratios = {
        "downtime_last_over_first": round(last["downtime_ms"] / first["downtime_ms"], 3),
        "max_downtime_over_decode_step": round(max(r["downtime_ms"] / r["decode_step_ms"] for r in rows), 3),
        "recompute_over_downtime_last": round(last["recompute_ms"] / last["downtime_ms"], 1),
        "blocking_over_downtime_last": round(last["blocking_copy_ms"] / last["downtime_ms"], 1),
    }
    return {
        "engine": "sim",
        "profile": profile_name,
        "transport": live[0].ready.get("transport", transport),
        "bytes_per_token": bytes_per_token or profile.bytes_per_token,
        "repeats": repeats,
        "security_check": checked,
        "rows": rows,
        "ratios": ratios,
        "meets": {
            "downtime_last_over_first": ratios["downtime_last_over_first"] <= TARGETS["downtime_last_over_first_max"],
            "max_downtime_over_decode_step": ratios["max_downtime_over_decode_step"]
            <= TARGETS["max_downtime_over_decode_step_max"],
            "recompute_over_downtime": ratios["recompute_over_downtime_last"] >= TARGETS["recompute_over_downtime_min"],
        },
    }


def _combined(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One report from the phases: the secure one's figures at the top (the default configuration), the other beside
    it, and per length the mTLS downtime over the plaintext one (the cost of security on the stop-and-copy)."""
    headline = phases.get("mtls") or phases["plaintext"]
    report: dict[str, Any] = {**headline, "security": "mtls" if "mtls" in phases else "plaintext"}
    if "mtls" in phases:
        report["security_detail"] = (
            "mutual TLS with role checks on every gRPC call, one-time transfer tokens, data-plane integrity check on"
        )
    if len(phases) == 2:
        plain, secure = phases["plaintext"], phases["mtls"]
        report["plaintext"] = {k: plain[k] for k in ("security_check", "rows", "ratios", "meets") if k in plain}
        report["mtls_vs_plaintext"] = {
            "order": "plaintext phase first, then the mTLS phase (each its own pair of llumlets)",
            "downtime_ratio": {
                str(p["seq_len"]): round(m["downtime_ms"] / p["downtime_ms"], 3)
                for p, m in zip(plain["rows"], secure["rows"], strict=True)
                if p["downtime_ms"]
            },
            "total_ratio": {
                str(p["seq_len"]): round(m["total_ms"] / p["total_ms"], 3)
                for p, m in zip(plain["rows"], secure["rows"], strict=True)
                if p["total_ms"]
            },
        }
        if "meets" in secure:
            report["mtls_vs_plaintext"]["targets_hold_with_mtls"] = all(secure["meets"].values())
            report["mtls_vs_plaintext"]["targets_hold_plaintext"] = all(plain["meets"].values())
    return report


@contextlib.contextmanager
def _log_dir(prefix: str) -> Iterator[Path]:
    """The llumlets' logs: removed after a good run (every CI run left two folders behind), kept and named on
    stderr after a failed one, where they are the evidence."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        click.echo(f"bench migration failed; the llumlets' logs are in {path}", err=True)
        raise
    shutil.rmtree(path, ignore_errors=True)


async def run_bench(
    profile_name: str,
    transport: str,
    lengths: list[int],
    bytes_per_token: int | None,
    repeats: int,
    security: str = "both",
    steps: Steps | None = None,
) -> dict[str, Any]:
    """``steps``: a progress task advanced once per migration pair (phase x length x repeat)."""
    with _log_dir("bench-migration-") as log_dir:
        phases = {
            mode: await _sim_phase(
                Phase(mode, log_dir), profile_name, transport, lengths, bytes_per_token, repeats, steps
            )
            for mode in SECURITY_MODES[security]
        }
    report = _combined(phases)
    report["targets"] = TARGETS
    return report


async def _ttft_ms(phase: Phase, address: str, rid: str, prompt: list[int]) -> float:
    """AddRequest to the first (and only) token at the sink: a fresh prefill of ``prompt`` on that engine."""
    sink = phase.sink
    request = common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=1, ignore_eos=True),
        frontend_address=sink.server.address if sink.server else "",
    )
    async with phase.channel(address, "frontend") as channel:
        stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)  # connected (and handshaken) before timing
        start = time.perf_counter()
        await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=request), timeout=30)
        await sink.wait(rid, timeout=120)
        return (time.perf_counter() - start) * 1000


def _vllm_prompt(length: int, salt: int) -> list[int]:
    """Token ids inside any vocabulary of 500+ ids, past the usual specials; distinct per salt."""
    return [(i * 31 + salt * 7) % 500 + 3 for i in range(length)]


async def run_vllm_bench(
    model: str,
    transport: str,
    lengths: list[int],
    repeats: int,
    max_model_len: int,
    kv_cache_bytes: int,
    security: str = "both",
    steps: Steps | None = None,
) -> dict[str, Any]:
    too_long = [n for n in lengths if n - MIGRATE_AFTER_TOKENS + VLLM_MIN_OUTPUT > max_model_len]
    if too_long:
        raise click.BadParameter(
            f"lengths {too_long} leave under {VLLM_MIN_OUTPUT} tokens to decode within --max-model-len {max_model_len}",
            param_hint="--lengths",
        )
    with _log_dir("bench-migration-vllm-") as log_dir:
        phases = {
            mode: await _vllm_phase(
                Phase(mode, log_dir), model, transport, lengths, repeats, max_model_len, kv_cache_bytes, steps
            )
            for mode in SECURITY_MODES[security]
        }
    return _combined(phases)


async def _vllm_phase(
    phase: Phase,
    model: str,
    transport: str,
    lengths: list[int],
    repeats: int,
    max_model_len: int,
    kv_cache_bytes: int,
    steps: Steps | None = None,
) -> dict[str, Any]:
    from pyllumnix.tools.serve import VLLM_CPU_ENV

    steps = steps or Steps()
    await phase.start_sink()
    launcher = phase.launcher
    common = ["--engine", "vllm", "--model", model, "--max-model-len", str(max_model_len)]
    common += ["--kv-cache-bytes", str(kv_cache_bytes), "--transport", transport, "--transfer-timeout", "60"]
    rows: list[dict[str, Any]] = []
    try:
        live = [
            launcher.start(
                f"llumlet-{i}", "llumlet", "--instance-id", f"llumlet-{i}", *common, timeout=300, env=VLLM_CPU_ENV
            )
            for i in range(2)
        ]
        checked = await phase.checked([c.address for c in live])
        # Warm-up: the first forward passes of a fresh process are slow (allocations, kernel selection).
        for i, comp in enumerate(live):
            for j, n in enumerate((max(lengths), TTFT_FLOOR_TOKENS, max(lengths))):
                await _ttft_ms(phase, comp.address, f"warm-{i}-{j}", _vllm_prompt(n, 100 + j))
        floor = min(
            [await _ttft_ms(phase, live[1].address, f"floor-{r}", _vllm_prompt(TTFT_FLOOR_TOKENS, r)) for r in range(3)]
        )
        for length in lengths:
            downtimes, totals, blocking_ms, stages, sent, prefill = [], [], [], [], [], []
            for r in range(repeats):
                steps.describe(f"{phase.name} {length} tokens")
                prompt = _vllm_prompt(length - MIGRATE_AFTER_TOKENS, r)
                max_tokens = max_model_len - len(prompt)
                res = await _migrate_once(
                    phase,
                    live[0].address,
                    live[1].address,
                    "llumlet-1",
                    f"l{length}-{r}",
                    prompt,
                    max_tokens,
                    strict_stream=False,
                )
                downtimes.append(res.downtime_ms)
                totals.append(res.total_ms)
                stages.append(res.stages)
                sent.append(res.bytes_sent)
                blk = await _migrate_once(
                    phase,
                    live[1].address,
                    live[0].address,
                    "llumlet-0",
                    f"b{length}-{r}",
                    prompt,
                    max_tokens,
                    BLOCKING,
                    strict_stream=False,
                )
                blocking_ms.append(blk.downtime_ms)
                # Recompute on the destination engine, now idle: a fresh prefill of the whole sequence.
                prefill.append(await _ttft_ms(phase, live[1].address, f"p{length}-{r}", _vllm_prompt(length, 50 + r)))
                steps.step()
            rows.append(
                {
                    **_measured_row(length, downtimes, totals, stages, blocking_ms),
                    "recompute_ms": round(min(prefill), 2),
                    "recompute_ms_all": [round(x, 2) for x in prefill],
                    "kv_kib_sent": round(max(sent) / 1024, 1),
                }
            )
            click.echo(json.dumps({"security": phase.name, **rows[-1]}), err=True)
    finally:
        phase.stop()
        await phase.sink.stop()
    first, last = rows[0], rows[-1]
    return {
        "engine": "vllm",
        "model": model,
        "max_model_len": max_model_len,
        "transport": live[0].ready.get("transport", transport),
        "repeats": repeats,
        "ttft_floor_ms": round(floor, 2),
        "security_check": checked,
        "rows": rows,
        "ratios": {
            "downtime_last_over_first": round(last["downtime_ms"] / first["downtime_ms"], 3),
            "recompute_over_downtime_last": round(last["recompute_ms"] / last["downtime_ms"], 2),
            "recompute_last_over_first": round(last["recompute_ms"] / first["recompute_ms"], 2),
            "blocking_over_downtime_last": round(last["blocking_copy_ms"] / last["downtime_ms"], 2),
        },
    }


@click.command("migration")
@click.option("--engine", type=click.Choice(["sim", "vllm"]), default="sim", show_default=True)
@click.option("--profile", default="llama-7b-a10", show_default=True, help="sim: latency profile.")
@click.option("--model", default="", help="vllm: a local Hugging Face model directory.")
@click.option(
    "--max-model-len", default=VLLM_MAX_MODEL_LEN, show_default=True, help="vllm: the engines' maximum length."
)
@click.option("--kv-cache-bytes", default=64 << 20, show_default=True, help="vllm: KV cache per engine.")
@click.option("--transport", type=click.Choice(["ucx", "tcp", "auto"]), default="ucx", show_default=True)
@click.option(
    "--lengths",
    default="",
    help=f"Sequence lengths (default: sim 256,512,1024,2048,4096,8192; vllm {VLLM_LENGTHS}).",
)
@click.option("--bytes-per-token", type=int, default=None, help="Override the profile's KV bytes per token.")
@click.option("--repeats", default=2, show_default=True, help="Migrations per length (the minimum is reported).")
@click.option(
    "--security",
    type=click.Choice(list(SECURITY_MODES)),
    default="both",
    show_default=True,
    help="mtls: llumlets on mutual TLS with transfer tokens and integrity checks (a throwaway PKI), as a secure "
    "cluster runs; plaintext: --insecure llumlets; both: one phase of each in this run, compared length by length.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
def bench_migration(
    engine: str,
    profile: str,
    model: str,
    max_model_len: int,
    kv_cache_bytes: int,
    transport: str,
    lengths: str,
    bytes_per_token: int | None,
    repeats: int,
    security: str,
    json_path: Path | None,
) -> None:
    """Migration downtime vs sequence length, with blocking copy and recompute in the same run."""
    if not lengths:
        lengths = VLLM_LENGTHS if engine == "vllm" else "256,512,1024,2048,4096,8192"
    seq = [int(x) for x in lengths.split(",") if x]
    if engine == "vllm" and not model:
        raise click.UsageError("--engine vllm needs --model PATH")
    with progress_bar() as bar:  # stderr, a terminal only: stdout is the JSON report alone
        steps = Steps(bar, "bench migration", total=len(SECURITY_MODES[security]) * len(seq) * repeats)
        if engine == "vllm":
            report = asyncio.run(
                run_vllm_bench(model, transport, seq, repeats, max_model_len, kv_cache_bytes, security, steps)
            )
        else:
            report = asyncio.run(run_bench(profile, transport, seq, bytes_per_token, repeats, security, steps))
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)
    r = report["ratios"]
    down = " ".join(f"{row['seq_len']}:{row['downtime_ms']}" for row in report["rows"])
    compared = ""
    if "mtls_vs_plaintext" in report:
        plain = " ".join(f"{row['seq_len']}:{row['downtime_ms']}" for row in report["plaintext"]["rows"])
        ratio = " ".join(f"{k}:{v}" for k, v in report["mtls_vs_plaintext"]["downtime_ratio"].items())
        compared = f" | plaintext downtime ms {plain} | mTLS/plaintext downtime {ratio}"
    if engine == "vllm":
        recompute = " ".join(f"{row['seq_len']}:{row['recompute_ms']}" for row in report["rows"])
        click.echo(
            f"vllm migration ({report['security']}) downtime ms {down} | measured recompute (prefill TTFT) ms "
            f"{recompute} (floor {report['ttft_floor_ms']}) | downtime({seq[-1]})/downtime({seq[0]})="
            f"{r['downtime_last_over_first']} | recompute/downtime({seq[-1]})={r['recompute_over_downtime_last']} | "
            f"blocking copy/downtime({seq[-1]})={r['blocking_over_downtime_last']}{compared}",
            err=True,
        )
        return
    click.echo(
        f"migration ({report['security']}) downtime ms {down} | downtime({seq[-1]})/downtime({seq[0]})="
        f"{r['downtime_last_over_first']} (target <= 1.5) | max downtime/decode step="
        f"{r['max_downtime_over_decode_step']} (target <= 1) | recompute/downtime={r['recompute_over_downtime_last']} "
        f"(target >= 50){compared}",
        err=True,  # stdout stays the JSON report alone (``... | jq``)
    )
