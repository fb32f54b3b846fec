"""``llumnix bench dataplane``: one-way throughput of each data-plane transport between two processes.

The references are measured in the same run so the ratios compare like with like on a noisy host: numpy memcpy (the
ceiling for a same-host copy) and a plain Python TCP socket (``sendall`` / ``recv_into``, no framing).

memcpy is measured two ways. ``memcpy_ring`` copies one source into a ring of two destinations: the same data movement
and memory footprint as a transfer (one send buffer, a receive ring of two), so it is the reference the UCX target is
checked against. ``memcpy`` copies between the same two buffers over and over: at 16 MiB the pair (32 MiB) stays
resident in a 32 MiB L3, which no transfer into a receive ring can be, so it reads up to ~1.5x faster; it is reported
as the cache-resident ceiling. (``../shared/PLATFORM.md``'s 16 MiB memcpy, 7.7 GiB/s, is the DRAM-bound figure.)

``--device cuda`` measures the GPU data path instead (see ``bench_device``): UCX device-to-device between two
processes, a cross-process CUDA IPC ``copy_`` as its reference, a same-process device copy, the one-kernel gather and
scatter over a vLLM-shaped KV buffer, and the old host-staged per-layer path; plus the UCX lane (``UCX_PROTO_INFO``).
``--device cpu`` runs the same rows that need no GPU (a CI smoke test of the code path).

Each transport
sends chunks of each size from this process to a receiver child (spawned) that expects them into a ring of two
preallocated buffers, as block fusion does; like ChunkBuffers (and like the memcpy destination after its warm-up),
every receiving buffer is touched before the clock starts, so no run pays first-touch page faults. Time runs from the
first timed send to the receiver's last completion (both read CLOCK_MONOTONIC, which is system-wide), after untimed
warm-up transfers.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

import click
import numpy as np

from pyllumnix.data_plane.host_memory import host_buffer
from pyllumnix.data_plane.transport import Transport, make_transport, ucx_available
from pyllumnix.data_plane.transport.ucx import UCX_ENV_DEFAULTS, configure_ucx_env
from pyllumnix.tools.progress import Steps, progress_bar

MiB = 1 << 20
GiB = 1 << 30
WARMUP = 2
# The targets for UCX at 16 MiB, against the like-for-like memcpy (see the module docstring) and the socket.
TARGETS = {"ucx16_over_memcpy_ring16": 0.8, "ucx16_over_socket16": 2.0}


def _filled(nbytes: int) -> np.ndarray:
    """A touched buffer from the allocator the data plane itself uses (huge pages where possible), so the transports
    and the memcpy reference run on the same kind of memory."""
    buf = host_buffer(nbytes)
    buf.fill(1)
    return buf


def iterations(nbytes: int) -> int:
    """Enough transfers for ~1 GiB per measurement, at least 4."""
    return max(4, min(200, GiB // nbytes))


def gib_s(nbytes: int, count: int, seconds: float) -> float:
    return nbytes * count / seconds / GiB


def bench_memcpy(nbytes: int) -> float:
    src = _filled(nbytes)
    dst = host_buffer(nbytes)
    for _ in range(WARMUP):
        np.copyto(dst, src)
    count = iterations(nbytes)
    t0 = time.monotonic()
    for _ in range(count):
        np.copyto(dst, src)
    return gib_s(nbytes, count, time.monotonic() - t0)


def bench_memcpy_ring(nbytes: int) -> float:
    """memcpy with the transports' memory footprint: one source into a ring of two destinations (at 16 MiB this
    no longer fits a 32 MiB L3, like the cross-process transfers)."""
    src = _filled(nbytes)
    ring = [host_buffer(nbytes), host_buffer(nbytes)]
    for i in range(WARMUP):
        np.copyto(ring[i % 2], src)
    count = iterations(nbytes)
    t0 = time.monotonic()
    for i in range(count):
        np.copyto(ring[i % 2], src)
    return gib_s(nbytes, count, time.monotonic() - t0)


# --- plain socket reference ---
def _socket_receiver(conn: Connection) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        nbytes, count = msg
        buf = memoryview(_filled(nbytes).data)  # same touched memory as the other receivers
        for _ in range(count):
            got = 0
            while got < nbytes:
                n = sock.recv_into(buf[got:])
                if n == 0:
                    return
                got += n
        conn.send(time.monotonic())


def bench_socket(sizes: list[int]) -> dict[int, float]:
    proc, conn = _spawn(_socket_receiver)
    out: dict[int, float] = {}
    try:
        sock = socket.create_connection(("127.0.0.1", conn.recv()))
        for nbytes in sizes:
            data = memoryview(_filled(nbytes).data)
            for count, timed in ((WARMUP, False), (iterations(nbytes), True)):
                conn.send((nbytes, count))
                t0 = time.monotonic()
                for _ in range(count):
                    sock.sendall(data)
                t_end = conn.recv()
                if timed:
                    out[nbytes] = gib_s(nbytes, count, t_end - t0)
        conn.send(None)
        sock.close()
    finally:
        _reap(proc)
    return out


# --- transports ---
def _transport_receiver(kind: str, conn: Connection) -> None:
    async def main() -> None:
        transport = make_transport(kind)
        conn.send(await transport.start())
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg is None:
                break
            prefix, nbytes, count = msg
            ring = [_filled(nbytes) for _ in range(2)]  # touched now, not mid-transfer (as ChunkBuffers does)
            # Announced as receive_blocks announces a migration stage: the chunks beyond the two-slot ring arrive
            # early and may use the whole early-data buffer, not one sender's share of it.
            transport.admit_stage(prefix, count)
            for i in range(min(2, count)):
                transport.expect(f"{prefix}/{i}", nbytes, out=ring[i])
            conn.send("ready")
            for i in range(count):
                await transport.receive(f"{prefix}/{i}", timeout=120)
                if i + 2 < count:
                    transport.expect(f"{prefix}/{i + 2}", nbytes, out=ring[i % 2])
            transport.end_stage(prefix)
            conn.send(time.monotonic())
        await transport.close()

    asyncio.run(main())


async def _send_rounds(transport: Transport, peer: str, conn: Connection, sizes: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for nbytes in sizes:
        data = _filled(nbytes)
        for count, timed in ((WARMUP, False), (iterations(nbytes), True)):
            prefix = f"{nbytes}-{'t' if timed else 'w'}"
            conn.send((prefix, nbytes, count))
            assert await asyncio.to_thread(conn.recv) == "ready"
            t0 = time.monotonic()
            for i in range(count):
                await transport.send(peer, f"{prefix}/{i}", data, timeout=120)
            t_end = await asyncio.to_thread(conn.recv)
            if timed:
                out[nbytes] = gib_s(nbytes, count, t_end - t0)
    return out


def bench_transport(kind: str, sizes: list[int]) -> dict[int, float]:
    proc, conn = _spawn(_transport_receiver, kind)

    async def main() -> dict[int, float]:
        transport = make_transport(kind)
        await transport.start()
        try:
            peer = await asyncio.to_thread(conn.recv)
            result = await _send_rounds(transport, peer, conn, sizes)
            conn.send(None)
            return result
        finally:
            await transport.close()

    try:
        return asyncio.run(main())
    finally:
        _reap(proc)


def bench_inproc(sizes: list[int]) -> dict[int, float]:
    """In-process reference: both endpoints in this process (one copy per transfer)."""

    async def main() -> dict[int, float]:
        a, b = make_transport("inproc"), make_transport("inproc")
        await a.start()
        await b.start()
        out: dict[int, float] = {}
        for nbytes in sizes:
            data = _filled(nbytes)
            dst = host_buffer(nbytes)
            for count, timed in ((WARMUP, False), (iterations(nbytes), True)):
                t0 = time.monotonic()
                for i in range(count):
                    b.expect(f"{nbytes}/{timed}/{i}", nbytes, out=dst)
                    await a.send(b.address, f"{nbytes}/{timed}/{i}", data, timeout=120)
                    await b.receive(f"{nbytes}/{timed}/{i}", timeout=120)
                if timed:
                    out[nbytes] = gib_s(nbytes, count, time.monotonic() - t0)
        await a.close()
        await b.close()
        return out

    return asyncio.run(main())


def _spawn(target: Any, *args: Any) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def _reap(proc: mp.process.BaseProcess) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _ratio(a: dict[int, float], b: dict[int, float], nbytes: int) -> float | None:
    return round(a[nbytes] / b[nbytes], 3) if nbytes in a and nbytes in b and b[nbytes] else None


def _one_round(
    sizes: list[int], kinds: list[str], skipped: dict[str, str], steps: Steps | None = None
) -> dict[str, dict[int, float]]:
    """One round of every row; ``steps`` (a progress bar's task) advances once per row."""
    steps = steps or Steps()
    steps.describe("memcpy")
    results: dict[str, dict[int, float]] = {"memcpy": {n: bench_memcpy(n) for n in sizes}}
    steps.step("memcpy_ring")
    results["memcpy_ring"] = {n: bench_memcpy_ring(n) for n in sizes}
    steps.step("socket")
    results["socket"] = bench_socket(sizes)
    for kind in kinds:
        steps.step(kind)
        if kind == "ucx" and not ucx_available():
            skipped[kind] = "ucxx not importable"
        elif kind == "inproc":
            results[kind] = bench_inproc(sizes)
        else:
            results[kind] = bench_transport(kind, sizes)
    steps.step()
    return results


# --- device data path (--device) ---
KV_LAYERS, KV_PAGE = 32, (2, 16, 8, 128)  # a Llama-8B-like bf16 page: K/V, 16 tokens, 8 KV heads, head_dim 128
PROTO_LINE_HINTS = ("cuda_ipc", "cuda_copy", "rc_mlx5", "rc_verbs", "dc_mlx5", "ud_", "sysv", "posix", "cma", "tcp")


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize(device)


def _timed(device: str, count: int, fn: Any) -> float:
    """Seconds for ``count`` calls of ``fn`` after two warm-ups, device work included."""
    for _ in range(WARMUP):
        fn()
    _sync(device)
    t0 = time.monotonic()
    for _ in range(count):
        fn()
    _sync(device)
    return time.monotonic() - t0


def _kv_mover(device: str, nbytes: int) -> tuple[Any, Any, Any]:
    """A vLLM-shaped layer-major KV buffer (one allocation, per-layer views) with twice the blocks one chunk of
    ``nbytes`` holds, its BlockMover, and a chunk's worth of block ids (every other block: scattered)."""
    import torch

    from pyllumnix.data_plane.engine.kv_layout import BlockMover

    page = 1
    for d in KV_PAGE:
        page *= d
    block_bytes = KV_LAYERS * page * 2  # bf16
    n = max(1, nbytes // block_bytes)
    blocks = 2 * n + 1
    buf = torch.ones(KV_LAYERS * blocks * page, dtype=torch.bfloat16, device=device)
    kv, h, bs, dim = KV_PAGE
    layers = [buf[i * blocks * page : (i + 1) * blocks * page].view(kv, blocks, bs, h, dim) for i in range(KV_LAYERS)]
    mover = BlockMover(layers, blocks)
    ids = mover.index(list(range(1, blocks, 2))[:n])
    return mover, ids, layers


def _kernel_rows(device: str, nbytes: int) -> dict[str, float]:
    """One chunk size's rows of ``bench_kernels``."""
    import torch

    mover, ids, layers = _kv_mover(device, nbytes)
    n = int(ids.numel())
    moved = n * mover.block_bytes
    chunk = torch.empty((n, mover.block_bytes), dtype=torch.uint8, device=device)
    src = torch.ones(moved, dtype=torch.uint8, device=device)
    host = np.empty((n, mover.block_bytes), dtype=np.uint8)

    def host_staged() -> None:  # the adapter before #17: every layer through host memory, both ways
        off = 0
        for layer in layers:
            sel = layer.index_select(1, ids).movedim(1, 0).contiguous()
            host[:, off : off + mover.page_bytes] = sel.view(torch.uint8).reshape(n, -1).cpu().numpy()
            off += mover.page_bytes
        staged = torch.from_numpy(host)
        off = 0
        for layer in layers:
            part = staged[:, off : off + mover.page_bytes].to(device).contiguous().view(layer.dtype)
            layer.index_copy_(1, ids, part.reshape(n, *layer.shape[:1], *layer.shape[2:]).movedim(0, 1))
            off += mover.page_bytes

    rows = {
        "device_copy": lambda: chunk.view(-1).copy_(src),
        "gather": lambda: mover.gather(ids, chunk),
        "gather_per_layer": lambda: mover.gather_per_layer(ids, chunk),
        "scatter": lambda: mover.scatter(ids, chunk),
        "host_staged": host_staged,
    }
    count = iterations(moved)
    return {name: gib_s(moved, count, _timed(device, count, fn)) for name, fn in rows.items()}


def bench_kernels(device: str, sizes: list[int]) -> dict[str, dict[int, float]]:
    """Same-process device copy, the fused gather and scatter, the per-layer gather, and the old host-staged path
    (per layer: ``index_select`` + ``.cpu().numpy()`` to host, then host -> device ``index_copy_``), one way; GiB/s
    of KV bytes moved (a chunk of whole blocks, at most the size but at least one block)."""
    out: dict[str, dict[int, float]] = {}
    for nbytes in sizes:
        for name, value in _kernel_rows(device, nbytes).items():
            out.setdefault(name, {})[nbytes] = value
    return out


def _ipc_holder(nbytes: int, conn: Connection) -> None:
    """Owns a device buffer and shares it over CUDA IPC (torch.multiprocessing pickles CUDA tensors as IPC handles)."""
    import torch

    buf = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    conn.send(buf)
    conn.recv()  # keep the buffer alive until the writer is done


def _ipc_copy(device: str, nbytes: int, peer: Any) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    count = iterations(nbytes)
    return gib_s(nbytes, count, _timed(device, count, lambda: peer.copy_(src)))


def bench_cuda_ipc(device: str, sizes: list[int]) -> dict[int, float]:
    """The hardware reference for UCX's cuda_ipc lane: this process ``copy_``s into another process's buffer."""
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    out: dict[int, float] = {}
    for nbytes in sizes:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_ipc_holder, args=(nbytes, child), daemon=True)
        proc.start()
        try:
            out[nbytes] = _ipc_copy(device, nbytes, parent.recv())
            parent.send(None)
        finally:
            _reap(proc)
    return out


def _redirect_output(path: str) -> None:
    """UCX prints ``UCX_PROTO_INFO`` tables to stdout: send this process's fds 1 and 2 to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _device_receiver(device: str, log: str, conn: Connection) -> None:
    _redirect_output(log)

    async def main() -> None:
        from pyllumnix.data_plane.engine.device import device_buffer

        transport = make_transport("ucx", device=device if device != "cpu" else None)
        conn.send(await transport.start())
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg is None:
                break
            prefix, nbytes, count = msg
            ring = [device_buffer(nbytes, device) for _ in range(2)]
            if device == "cpu":
                ring = [t.numpy() for t in ring]
            for i in range(min(2, count)):
                transport.expect(f"{prefix}/{i}", nbytes, out=ring[i])
            conn.send("ready")
            for i in range(count):
                await transport.receive(f"{prefix}/{i}", timeout=120)
                if i + 2 < count:
                    transport.expect(f"{prefix}/{i + 2}", nbytes, out=ring[i % 2])
            conn.send(time.monotonic())
        await transport.close()

    asyncio.run(main())


def _device_sender(device: str, sizes: list[int], log: str, conn: Connection) -> None:
    _redirect_output(log)

    async def main() -> dict[int, float]:
        import torch

        transport = make_transport("ucx", device=device if device != "cpu" else None)
        await transport.start()
        try:
            peer = await asyncio.to_thread(conn.recv)
            out: dict[int, float] = {}
            for nbytes in sizes:
                src = torch.ones(nbytes, dtype=torch.uint8, device=device)
                _sync(device)  # ucxx ignores streams: the fill must be done before a send
                data = src if device != "cpu" else src.numpy()
                for count, timed in ((WARMUP, False), (iterations(nbytes), True)):
                    prefix = f"{nbytes}-{'t' if timed else 'w'}"
                    conn.send((prefix, nbytes, count))
                    assert await asyncio.to_thread(conn.recv) == "ready"
                    t0 = time.monotonic()
                    for i in range(count):
                        await transport.send(peer, f"{prefix}/{i}", data, timeout=120)
                    t_end = await asyncio.to_thread(conn.recv)
                    if timed:
                        out[nbytes] = gib_s(nbytes, count, t_end - t0)
            conn.send(None)
            return out
        finally:
            await transport.close()

    conn.send(("result", asyncio.run(main())))


def ucx_lanes(text: str) -> dict[str, Any]:
    """The transports UCX's protocol-selection tables (``UCX_PROTO_INFO=y``) name, and the table lines that mention
    device memory (where the lane of a device-to-device send shows)."""
    lines = [ln.strip() for ln in text.splitlines() if "|" in ln or "ucp_" in ln.lower()]
    found = sorted({h.rstrip("_") for ln in lines for h in PROTO_LINE_HINTS if h in ln})
    cuda_lines = [ln for ln in lines if "cuda" in ln.lower()][:40]
    return {"transports": found, "cuda_lines": cuda_lines, "lines": len(lines)}


def bench_ucx_device(device: str, sizes: list[int], tmpdir: str) -> tuple[dict[int, float], dict[str, Any]]:
    """UCX between two child processes (sender and receiver), device memory on both ends (host memory on ``cpu``),
    with ``UCX_PROTO_INFO=y`` so the lane UCX chose is on record."""
    os.environ.setdefault("UCX_PROTO_INFO", "y")
    logs = [os.path.join(tmpdir, f"ucx-{role}.log") for role in ("receiver", "sender")]
    recv_proc, recv_conn = _spawn(_device_receiver, device, logs[0])
    send_proc: mp.process.BaseProcess | None = None
    try:
        peer = recv_conn.recv()
        send_proc, send_conn = _spawn(_device_sender, device, sizes, logs[1])
        send_conn.send(peer)
        while True:  # relay the sender's round messages to the receiver and its replies back
            msg = send_conn.recv()
            if isinstance(msg, tuple) and msg and msg[0] == "result":
                result: dict[int, float] = msg[1]
                break
            recv_conn.send(msg)
            if msg is None:
                continue
            send_conn.send(recv_conn.recv())
            send_conn.send(recv_conn.recv())
    finally:
        if send_proc is not None:
            _reap(send_proc)
        _reap(recv_proc)
    text = ""
    for log in logs:
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                text += f.read()
    return result, ucx_lanes(text)


def bench_device(device: str, sizes: list[int], repeat: int, want_ucx: bool) -> dict[str, Any]:
    """The GPU data path's figures (see the module docstring); DeviceUnavailableError on a host without ``device``."""
    import tempfile

    from pyllumnix.data_plane.engine.device import normalize_device

    device = normalize_device(device)
    samples: dict[str, dict[int, list[float]]] = {}
    skipped: dict[str, str] = {}
    lanes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llumnix-bench-") as tmpdir, progress_bar() as bar:
        steps = Steps(bar, f"bench dataplane {device}", total=repeat)
        for r in range(repeat):
            steps.describe(f"round {r + 1}")
            rows = bench_kernels(device, sizes)
            if device == "cpu":
                skipped["cuda_ipc_copy"] = "needs a CUDA device"
            else:
                rows["cuda_ipc_copy"] = bench_cuda_ipc(device, sizes)
            if not want_ucx:
                skipped["ucx"] = "not requested"
            elif not ucx_available():
                skipped["ucx"] = "ucxx not importable"
            else:
                name = "ucx_d2d" if device != "cpu" else "ucx_host"
                rows[name], lanes = bench_ucx_device(device, sizes, tmpdir)
            for name, figures in rows.items():
                for n, v in figures.items():
                    samples.setdefault(name, {}).setdefault(n, []).append(v)
            steps.step()
    results = {name: {n: max(v) for n, v in r.items()} for name, r in samples.items()}
    ucx = results.get("ucx_d2d", results.get("ucx_host", {}))
    big = max(sizes)
    report: dict[str, Any] = {
        "device": device,
        "sizes_mib": [n / MiB for n in sizes],
        "gib_s": {k: {f"{n / MiB:g}": round(v, 3) for n, v in r.items()} for k, r in results.items()},
        "ratios": {
            "ucx_over_cuda_ipc": _ratio(ucx, results.get("cuda_ipc_copy", {}), big),
            "gather_over_host_staged": _ratio(results["gather"], results["host_staged"], big),
            "gather_over_per_layer": _ratio(results["gather"], results["gather_per_layer"], big),
        },
        "ratio_size_mib": big / MiB,
        "ucx_lane": lanes,
        "env": {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_PROTO_INFO", "RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY")},
        "kv_page": {"layers": KV_LAYERS, "page": list(KV_PAGE), "dtype": "bfloat16"},
        "repeat": repeat,
        "statistic": "best of repeat",
        "skipped": skipped,
    }
    return report


@click.command("dataplane")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures here.")
@click.option("--sizes", default="1,16,256", show_default=True, help="Chunk sizes in MiB, comma-separated.")
@click.option("--transports", default="ucx,tcp,inproc", show_default=True, help="Transports to measure.")
@click.option("--ucx-tls", default=None, help=f"UCX_TLS for this run (default: env or {UCX_ENV_DEFAULTS['UCX_TLS']}).")
@click.option("--repeat", default=3, show_default=True, help="Rounds; each figure is the best round.")
@click.option(
    "--device",
    default=None,
    help="Measure the device data path on this device (cuda, cuda:N; cpu for a GPU-less smoke run) instead.",
)
def bench_dataplane(
    json_path: str | None, sizes: str, transports: str, ucx_tls: str | None, repeat: int, device: str | None
) -> None:
    """One-way GiB/s between two processes per transport, with memcpy and a plain socket as references."""
    size_list = [int(float(s) * MiB) for s in sizes.split(",") if s.strip()]
    kinds = [k.strip() for k in transports.split(",") if k.strip()]
    if device is not None:
        _bench_device_cli(device, size_list, kinds, ucx_tls, repeat, json_path)
        return
    configure_ucx_env(ucx_tls)  # children inherit the environment
    samples: dict[str, dict[int, list[float]]] = {}
    skipped: dict[str, str] = {}
    with progress_bar() as bar:  # on stderr, only on a terminal: stdout is the JSON report
        steps = Steps(bar, "bench dataplane", total=repeat * (3 + len(kinds)))
        for _ in range(repeat):  # interleaved rounds, so interference from other processes hits every row alike
            for name, figures in _one_round(size_list, kinds, skipped, steps).items():
                for n, v in figures.items():
                    samples.setdefault(name, {}).setdefault(n, []).append(v)
    results = {name: {n: max(v) for n, v in rows.items()} for name, rows in samples.items()}
    sixteen = 16 * MiB
    ucx = results.get("ucx", {})
    gib = {k: {f"{n / MiB:g}": round(v, 3) for n, v in r.items()} for k, r in results.items()}
    ratios = {
        "ucx16_over_memcpy16": _ratio(ucx, results["memcpy"], sixteen),
        "ucx16_over_memcpy_ring16": _ratio(ucx, results["memcpy_ring"], sixteen),
        "ucx16_over_socket16": _ratio(ucx, results["socket"], sixteen),
        "tcp16_over_socket16": _ratio(results.get("tcp", {}), results["socket"], sixteen),
    }
    report: dict[str, Any] = {
        "sizes_mib": [n / MiB for n in size_list],
        "gib_s": gib,
        "ratios": ratios,
        "env": {k: os.environ.get(k) for k in UCX_ENV_DEFAULTS},
        "cpus": os.cpu_count(),
        "repeat": repeat,
        "statistic": "best of repeat",
        "samples": {k: {f"{n / MiB:g}": [round(x, 3) for x in v] for n, v in r.items()} for k, r in samples.items()},
        "skipped": skipped,
        "targets": TARGETS,
        "meets": {k: (ratios[k] or 0.0) >= v for k, v in TARGETS.items()},
    }
    text = json.dumps(report, indent=2)
    click.echo(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    parts = " ".join(f"{k}={v.get('16', '-')}" for k, v in gib.items())
    meets = " ".join(f"{k}>={v}:{'yes' if report['meets'][k] else 'NO'}" for k, v in TARGETS.items())
    click.echo(
        f"dataplane 16MiB GiB/s: {parts} | ucx16/memcpy_ring16={ratios['ucx16_over_memcpy_ring16']} "
        f"ucx16/socket16={ratios['ucx16_over_socket16']} "
        f"(cache-resident ucx16/memcpy16={ratios['ucx16_over_memcpy16']}) | targets {meets}",
        err=True,  # stdout stays the JSON report alone (``... | jq``)
    )


def _bench_device_cli(
    device: str, sizes: list[int], kinds: list[str], ucx_tls: str | None, repeat: int, json_path: str | None
) -> None:
    from pyllumnix.data_plane.engine.device import DeviceUnavailableError

    try:
        from pyllumnix.data_plane.engine.device import normalize_device

        device = normalize_device(device)
    except DeviceUnavailableError as e:
        raise click.ClickException(str(e)) from e
    configure_ucx_env(ucx_tls, device=device != "cpu")  # children inherit the environment
    report = bench_device(device, sizes, repeat, want_ucx="ucx" in kinds)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    big = f"{report['ratio_size_mib']:g}"
    parts = " ".join(f"{k}={v.get(big, '-')}" for k, v in report["gib_s"].items())
    lane = ",".join(report["ucx_lane"].get("transports", [])) or "-"
    click.echo(f"dataplane {device} {big}MiB GiB/s: {parts} | ratios {report['ratios']} | ucx lane: {lane}", err=True)
