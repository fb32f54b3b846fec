"""``llumnix bench migration``: live-migration downtime vs sequence length, next to a blocking copy and recompute.

Two llumlet processes (sim engine, real KV payload of the profile's size, real time) migrate one request of each
length mid-decode over the chosen transport, then a request of the same length back with a last stage that takes
every block (the blocking, single-stage stop-and-copy migration); ``recompute_ms`` is the profile's modelled prefill of
the same tokens (what a migration by recomputation would stall for). All figures come from the same run.

- ``downtime_ms``: the request stopped on the source until the destination installed it (its next step continues it).
- ``total_ms``: migrate-out order to commit.
- ``decode_step_ms``: the profile's modelled decode step at that length (batch 1), the paper's yardstick.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import grpc

from pyllumnix.data_plane.engine.profile import get_profile
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2, llumlet_pb2_grpc
from pyllumnix.tools.launch import Launcher
from pyllumnix.tools.recording_sink import RecordingSink

# Enough output that the request never finishes during its migration on a loaded machine; it is aborted on the
# destination right after the measurement.
OUTPUT_TOKENS = 512
MIGRATE_AFTER_TOKENS = 8
# A last stage that takes every block: the blocking, single-stage copy.
BLOCKING = 1 << 30


async def _migrate_once(
    src: str,
    dst: str,
    dst_id: str,
    sink: RecordingSink,
    rid: str,
    length: int,
    max_model_len: int,
    last_stage_max_blocks: int = 0,
) -> llumlet_pb2.MigrationResult:
    prompt = [(i * 31) % 30000 + 3 for i in range(length - min(128, length // 2))]
    max_tokens = min(OUTPUT_TOKENS, max_model_len - len(prompt))
    request = common_pb2.EngineRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=1, ignore_eos=True),
        frontend_address=sink.server.address if sink.server else "",
    )
    async with grpc.aio.insecure_channel(src) as channel:
        stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
        await stub.AddRequest(llumlet_pb2.AddRequestRequest(request=request), timeout=30)
        deadline = time.monotonic() + 120
        while len(sink.tokens(rid)) < MIGRATE_AFTER_TOKENS:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rid} produced no tokens")
            await asyncio.sleep(0.005)
        reply = await stub.MigrateOut(
            llumlet_pb2.MigrateOutRequest(
                destination_instance_id=dst_id,
                destination_grpc_address=dst,
                request_id=rid,
                wait=True,
                last_stage_max_blocks=last_stage_max_blocks,
            ),
            timeout=120,
        )
    result: llumlet_pb2.MigrationResult = reply.results[0]
    if result.outcome != llumlet_pb2.MIGRATION_OUTCOME_COMMITTED:
        raise RuntimeError(f"migration of {rid} did not commit: {result.reason}")
    kept = len(sink.tokens(rid))
    async with grpc.aio.insecure_channel(dst) as channel:
        await llumlet_pb2_grpc.LlumletServiceStub(channel).AbortRequest(
            llumlet_pb2.AbortRequestRequest(request_id=rid), timeout=30
        )
    await sink.wait(rid, timeout=120)
    if sink.raw_indices(rid) != list(range(len(sink.tokens(rid)))) or len(sink.tokens(rid)) < kept:
        raise RuntimeError(f"{rid}: the token stream has a gap or a duplicate")
    return result


async def run_bench(
    profile_name: str, transport: str, lengths: list[int], bytes_per_token: int | None, repeats: int
) -> dict[str, Any]:
    profile = get_profile(profile_name)
    sink = RecordingSink()
    await sink.start()
    launcher = Launcher(Path(tempfile.mkdtemp(prefix="bench-migration-")))
    kv_bytes = max(lengths) * (bytes_per_token or profile.bytes_per_token)
    # Each side touches the KV memory of the longest request up front, as a GPU's preallocated KV pool would be.
    prewarm_mib = (kv_bytes + profile.block_bytes * 8) >> 20
    common = ["--profile", profile_name, "--transport", transport, "--transfer-timeout", "60"]
    common += ["--prewarm-kv-mib", str(prewarm_mib)]
    if bytes_per_token:
        common += ["--bytes-per-token", str(bytes_per_token)]
    try:
        live = [
            launcher.start(f"llumlet-{i}", "llumlet", "--instance-id", f"llumlet-{i}", *common, timeout=300)
            for i in range(2)
        ]
        rows: list[dict[str, Any]] = []
        max_len = profile.max_model_len
        for length in lengths:
            downtimes, totals, blocking_ms, stages = [], [], [], []
            for r in range(repeats):
                res = await _migrate_once(
                    live[0].address, live[1].address, "llumlet-1", sink, f"l{length}-{r}", length, max_len
                )
                downtimes.append(res.downtime_ms)
                totals.append(res.total_ms)
                stages.append(res.stages)
                blk = await _migrate_once(
                    live[1].address, live[0].address, "llumlet-0", sink, f"b{length}-{r}", length, max_len, BLOCKING
                )
                blocking_ms.append(blk.downtime_ms)
            rows.append(
                {
                    "seq_len": length,
                    "downtime_ms": round(min(downtimes), 2),
                    "downtime_ms_all": [round(x, 2) for x in downtimes],
                    "total_ms": round(min(totals), 2),
                    "stages": max(stages),
                    "blocking_copy_ms": round(min(blocking_ms), 2),
                    "recompute_ms": round(profile.prefill_ms(length), 2),
                    "decode_step_ms": round(profile.decode_ms(1, length), 2),
                    "kv_mib": round(length * (bytes_per_token or profile.bytes_per_token) / 2**20, 1),
                }
            )
            click.echo(json.dumps(rows[-1]), err=True)
    finally:
        launcher.stop_all()
        await sink.stop()
    first, last = rows[0], rows[-1]
    return {
        "profile": profile_name,
        "transport": live[0].ready.get("transport", transport),
        "bytes_per_token": bytes_per_token or profile.bytes_per_token,
        "repeats": repeats,
        "rows": rows,
        "ratios": {
            "downtime_last_over_first": round(last["downtime_ms"] / first["downtime_ms"], 3),
            "max_downtime_over_decode_step": round(max(r["downtime_ms"] / r["decode_step_ms"] for r in rows), 3),
            "recompute_over_downtime_last": round(last["recompute_ms"] / last["downtime_ms"], 1),
            "blocking_over_downtime_last": round(last["blocking_copy_ms"] / last["downtime_ms"], 1),
        },
    }


@click.command("migration")
@click.option("--engine", type=click.Choice(["sim"]), default="sim", show_default=True)
@click.option("--profile", default="llama-7b-a10", show_default=True)
@click.option("--transport", type=click.Choice(["ucx", "tcp", "auto"]), default="ucx", show_default=True)
@click.option("--lengths", default="256,512,1024,2048,4096,8192", show_default=True)
@click.option("--bytes-per-token", type=int, default=None, help="Override the profile's KV bytes per token.")
@click.option("--repeats", default=2, show_default=True, help="Migrations per length (the minimum is reported).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
def bench_migration(
    engine: str,
    profile: str,
    transport: str,
    lengths: str,
    bytes_per_token: int | None,
    repeats: int,
    json_path: Path | None,
) -> None:
    """Migration downtime vs sequence length, with blocking copy and recompute in the same run."""
    seq = [int(x) for x in lengths.split(",") if x]
    report = asyncio.run(run_bench(profile, transport, seq, bytes_per_token, repeats))
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)
    r = report["ratios"]
    down = " ".join(f"{row['seq_len']}:{row['downtime_ms']}" for row in report["rows"])
    click.echo(
        f"migration downtime ms {down} | downtime({seq[-1]})/downtime({seq[0]})={r['downtime_last_over_first']} "
        f"(target <= 1.5) | max downtime/decode step={r['max_downtime_over_decode_step']} (target <= 1) | "
        f"recompute/downtime={r['recompute_over_downtime_last']} (target >= 50)"
    )
