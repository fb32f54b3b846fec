"""Two processes, vLLM-shaped KV buffers on one device, blocks migrated by the real ``send_blocks``/``receive_blocks``.

Run by ``integration/gpu_check.sh`` on the GPU machine (``--device cuda``: UCX device-to-device, then TCP through
pinned host memory); ``--device cpu`` runs the same choreography on a GPU-less host (UCX and TCP over host memory).

Process A keeps its KV cache layer-major (FlashAttention's ``[2, blocks, block_size, kv_heads, head_dim]`` per layer,
all layers carved from one buffer, as vLLM 0.32 allocates it); process B block-major (one ``[blocks, layers, 2, ...]``
buffer, per-layer strided views of the same logical shape). Both layouts take the one-kernel gather/scatter path and
describe the same logical page, so their blocks are byte-compatible; the descriptors travel over the control pipe
and are checked (a mismatching one is refused). Each migration's bytes are verified with hashes computed on the
device on both sides (only the per-block hashes cross to the host). Prints one JSON report; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CHUNK_BYTES = 16 << 20


def _build_kv(kind: str, blocks: int, device: str) -> list[Any]:
    import torch

    page = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM
    if kind == "layer-major":
        buf = torch.zeros(LAYERS * blocks * page, dtype=torch.bfloat16, device=device)
        per = blocks * page
        return [buf[i * per : (i + 1) * per].view(2, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for i in range(LAYERS)]
    phys = torch.zeros(blocks, LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    return [phys[:, i].movedim(1, 0) for i in range(LAYERS)]  # logical [2, blocks, ...], strided


def _block_hashes(copier: Any, ids: Sequence[int]) -> list[int]:
    """Per-block position-weighted sums over the gathered bytes, computed on the device."""
    import torch

    mover = copier.mover
    out = torch.empty((len(ids), mover.block_bytes), dtype=torch.uint8, device=mover.device)
    copier.gather_async(ids, out).wait()
    words = out.view(torch.int32).to(torch.int64)
    weights = (torch.arange(words.shape[1], device=mover.device, dtype=torch.int64) % 65521) * 2 + 1
    return [int(h) for h in (words * weights).sum(dim=1).cpu().tolist()]


def _worker(kind: str, device: str, blocks: int, seed: int, conn: Connection) -> None:
    """One llumlet-like process: its KV buffers, a BlockCopier (the vLLM adapter's copy path), and transports."""

    async def main() -> None:
        import torch

        from pyllumnix.data_plane.engine.kv_layout import BlockCopier, BlockMover
        from pyllumnix.data_plane.transport import make_transport, receive_blocks, send_blocks
        from pyllumnix.data_plane.transport.fusion import ChunkBuffers

        layers = _build_kv(kind, blocks, device)
        if seed:
            g = torch.Generator(device=device).manual_seed(seed)
            for t in layers:
                t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).to(t.dtype))
        mover = BlockMover(layers, blocks, BLOCK_SIZE)
        copier = BlockCopier(mover)
        transports: dict[str, Any] = {}
        send_bufs, recv_bufs = ChunkBuffers(3, device=device), ChunkBuffers(4, device=device)
        conn.send({"layout": mover.layout.encode(), "fused": mover.fused, "page_contiguous": mover.page_contiguous})
        tasks: list[asyncio.Task[None]] = []
        while True:
            msg = await asyncio.to_thread(conn.recv)
            op = msg[0]
            if op == "quit":
                break
            if op == "start":
                tkind = msg[1]
                opts = {"device": device} if tkind == "ucx" and device != "cpu" else {}
                transports[tkind] = make_transport(tkind, **opts)
                conn.send(await transports[tkind].start())
            elif op == "hash":
                conn.send(_block_hashes(copier, msg[1]))
            elif op == "send":
                _, tkind, peer, prefix, ids = msg

                def read(chunk_ids: Sequence[int]) -> tuple[Any, Any]:
                    out = send_bufs.rotate(len(chunk_ids), mover.block_bytes)
                    return out, copier.gather_async(chunk_ids, out)

                t0 = time.monotonic()
                res = await send_blocks(transports[tkind], peer, prefix, read, ids, mover.block_bytes, CHUNK_BYTES,
                                        timeout=120, checksum=True, staging=ChunkBuffers(2, device=device))  # fmt: skip
                conn.send({"nbytes": res.nbytes, "chunks": res.n_chunks, "crc": res.crc32,
                           "seconds": time.monotonic() - t0})  # fmt: skip
            elif op == "recv":
                _, tkind, prefix, ids = msg

                async def receive(tkind: str, prefix: str, ids: list[int]) -> None:
                    t0 = time.monotonic()
                    try:
                        res = await receive_blocks(transports[tkind], prefix, ids, mover.block_bytes,
                                                   copier.scatter_async, CHUNK_BYTES, timeout=120, checksum=True,
                                                   buffers=recv_bufs)  # fmt: skip
                        conn.send({"nbytes": res.nbytes, "chunks": res.n_chunks, "crc": res.crc32,
                                   "seconds": time.monotonic() - t0})  # fmt: skip
                    except Exception as e:  # reported to the driver, which fails the check
                        conn.send({"error": f"{type(e).__name__}: {e}"})

                tasks.append(asyncio.create_task(receive(tkind, prefix, ids)))
                conn.send("posted")
        for task in tasks:
            await task
        for t in transports.values():
            await t.close()

    asyncio.run(main())


def run_check(device: str, blocks: int, n_migrate: int, transports: list[str]) -> dict[str, Any]:
    import random

    from pyllumnix.data_plane.engine.kv_layout import KvLayout, KvLayoutMismatch, check_compatible

    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for kind, seed in (("layer-major", 11), ("block-major", 0)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(kind, device, blocks, seed, child), daemon=True)
        proc.start()
        procs.append(proc)
        conns.append(parent)
    report: dict[str, Any] = {"device": device, "blocks": blocks, "migrated_blocks": n_migrate, "migrations": []}
    ok = True
    try:
        infos = [c.recv() for c in conns]
        report["layouts"] = infos
        a_layout, b_layout = (KvLayout.decode(i["layout"]) for i in infos)
        check_compatible(a_layout, b_layout)
        try:  # a peer with another dtype must be refused
            check_compatible(a_layout, dataclasses.replace(b_layout, dtype="float16"))
            report["mismatch_refused"] = False
            ok = False
        except KvLayoutMismatch as e:
            report["mismatch_refused"] = str(e)
        ok &= all(i["fused"] for i in infos)
        rng = random.Random(5)
        for i, tkind in enumerate(transports):
            src, dst = (0, 1) if i % 2 == 0 else (1, 0)  # A -> B, then B -> A: both layouts send and receive
            for c in conns:
                c.send(("start", tkind))
            addresses = [c.recv() for c in conns]
            src_ids = rng.sample(range(1, blocks), n_migrate)
            dst_ids = rng.sample(range(1, blocks), n_migrate)
            prefix = f"mig-{i}/0"
            conns[dst].send(("recv", tkind, prefix, dst_ids))
            assert conns[dst].recv() == "posted"
            conns[src].send(("send", tkind, addresses[dst], prefix, src_ids))
            sent = conns[src].recv()
            got = conns[dst].recv()
            conns[src].send(("hash", src_ids))
            conns[dst].send(("hash", dst_ids))
            h_src, h_dst = conns[src].recv(), conns[dst].recv()
            equal = h_src == h_dst and "error" not in got and sent["crc"] == got.get("crc")
            ok &= equal
            memory = "host" if device == "cpu" else "device" if tkind == "ucx" else "pinned-staged"
            report["migrations"].append({
                "transport": f"{tkind} ({memory})",
                "direction": "layer-major -> block-major" if src == 0 else "block-major -> layer-major",
                "sent": sent,
                "received": got,
                "gib_s": round(sent["nbytes"] / max(got.get("seconds", 0.0), 1e-9) / (1 << 30), 3),
                "hashes_equal": h_src == h_dst,
                "nonzero": any(h_src),
            })  # fmt: skip
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        ok = False
    finally:
        for c in conns:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    report["ok"] = bool(ok)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--migrate", type=int, default=300)
    ap.add_argument("--transports", default="ucx,tcp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pyllumnix.data_plane.engine.device import DeviceUnavailableError, normalize_device

    try:
        device = normalize_device(args.device)
    except DeviceUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_check(device, args.blocks, args.migrate, [t for t in args.transports.split(",") if t])
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    summary = " ".join(f"{m['transport']}:{m['gib_s']}GiB/s,equal={m['hashes_equal']}" for m in report["migrations"])
    print(f"gpu dataplane check {device}: ok={report['ok']} {summary}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
