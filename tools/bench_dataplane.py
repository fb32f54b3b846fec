"""``llumnix bench dataplane``: one-way throughput of each data-plane transport between two processes.

The references are measured in the same run so the ratios compare like with like on a noisy host: numpy memcpy (the
ceiling for a same-host copy) and a plain Python TCP socket (``sendall`` / ``recv_into``, no framing).

memcpy is measured two ways. ``memcpy_ring`` copies one source into a ring of two destinations: the same data movement
and memory footprint as a transfer (one send buffer, a receive ring of two), so it is the reference the UCX target is
checked against. ``memcpy`` copies between the same two buffers over and over: at 16 MiB the pair (32 MiB) stays
resident in a 32 MiB L3, which no transfer into a receive ring can be, so it reads up to ~1.5x faster; it is reported
as the cache-resident ceiling. (``../shared/PLATFORM.md``'s 16 MiB memcpy, 7.7 GiB/s, is the DRAM-bound figure.)

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


def _one_round(sizes: list[int], kinds: list[str], skipped: dict[str, str]) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {"memcpy": {n: bench_memcpy(n) for n in sizes}}
    results["memcpy_ring"] = {n: bench_memcpy_ring(n) for n in sizes}
    results["socket"] = bench_socket(sizes)
    for kind in kinds:
        if kind == "ucx" and not ucx_available():
            skipped[kind] = "ucxx not importable"
        elif kind == "inproc":
            results[kind] = bench_inproc(sizes)
        else:
            results[kind] = bench_transport(kind, sizes)
    return results


@click.command("dataplane")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures here.")
@click.option("--sizes", default="1,16,256", show_default=True, help="Chunk sizes in MiB, comma-separated.")
@click.option("--transports", default="ucx,tcp,inproc", show_default=True, help="Transports to measure.")
@click.option("--ucx-tls", default=None, help=f"UCX_TLS for this run (default: env or {UCX_ENV_DEFAULTS['UCX_TLS']}).")
@click.option("--repeat", default=3, show_default=True, help="Rounds; each figure is the best round.")
def bench_dataplane(json_path: str | None, sizes: str, transports: str, ucx_tls: str | None, repeat: int) -> None:
    """One-way GiB/s between two processes per transport, with memcpy and a plain socket as references."""
    size_list = [int(float(s) * MiB) for s in sizes.split(",") if s.strip()]
    kinds = [k.strip() for k in transports.split(",") if k.strip()]
    configure_ucx_env(ucx_tls)  # children inherit the environment
    samples: dict[str, dict[int, list[float]]] = {}
    skipped: dict[str, str] = {}
    for _ in range(repeat):  # interleaved rounds, so interference from other processes hits every row alike
        for name, figures in _one_round(size_list, kinds, skipped).items():
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
        f"(cache-resident ucx16/memcpy16={ratios['ucx16_over_memcpy16']}) | targets {meets}"
    )
