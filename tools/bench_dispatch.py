"""``llumnix bench dispatch``: the global scheduler's dispatch cost, in process and served over gRPC.

1. In-process decision latency: ``bench_dispatch_core.measure_dispatch_latency`` (``PolicyCore.dispatch`` on a random
   snapshot of N instances), run in this process before anything else starts.
2. Served throughput: a real ``SchedulerReplica`` with its ``SchedulerService`` and ``AdminService`` on one
   ``start_server`` server (health + reflection on) runs in a spawned child process and wins the election of a real
   embedded etcd. This process (the client) keeps K calls in flight for a fixed time, alternating rounds of the bare
   unary call on that same server (gRPC health ``Check``: same server, event loop and transport, no scheduler work) and
   ``Dispatch`` (unique request ids). Each Dispatch round is paired with the bare round just before it (both see the
   machine as it is at that moment; on a shared host the rate drifts by +-20 % within a minute), and the reported
   ``ratio`` is the median over the pairs of dispatch rate / bare rate. The median rate of each kind and their
   quotient (``ratio_of_medians``) are reported too.

Bench harness in the child (not the production path, said here so the figures are read right):

- The N synthetic instances are registered for real (one etcd lease, N registry keys); the replica learns them through
  its own registry watch. Nothing listens at their llumlet addresses, so migration is switched off through the
  replica's own ``set_config`` (the pairing loop would otherwise order migrations to nowhere); the cost of one
  ``pair()`` pass over the same cluster is measured and reported instead (``pairing_pass_ms``).
- Load reports are the messages N llumlet reporters (``data_plane/llumlet/reporter.py``) would stream, fed to the
  production per-message path: each is parsed from its wire bytes (``ReportLoadRequest.FromString``) and handed to
  ``SchedulerServicer.take`` (the per-instance floor, then ``replica.report`` or ``replica.keepalive``), on the
  scheduler's own event loop. Not included: the gRPC stream's own per-message cost (HTTP/2 framing, the aio
  iterator). Every instance sends a full load at start; then each instance ticks every ``1/report_hz`` s (default
  20 Hz, a llumlet's default) and at each tick its load has changed with probability ``--report-change`` (default
  1.0: every instance busy, the worst case): a changed tick sends a full load (one of 4 synthetic variants), an
  unchanged one counts towards a keep-alive every ``LOAD_KEEPALIVE_EVERY`` (3) ticks, as the reporter does.
  ``--report-hz`` must be > 0: an instance that never reports is stale after ``dispatch_stale_after`` and takes no
  request, so every Dispatch would fail (``--report-change 0`` is the idle cluster: keep-alives only). The report CPU
  share (``load_reports.cpu_share_of_one_core``) is the time spent in
  that path over the round's wall time. Reports never list dispatched requests, so each dispatch counts on its
  instance for the scheduler's ``pending_ttl`` (2 s), as a request that has not reached its llumlet yet would.
- The measured rounds run the production Dispatch path unwrapped. One more Dispatch round after them wraps
  ``replica.dispatch`` with a timer, giving the served decision latency (``served_dispatch``): the policy decision
  plus ``ClusterState`` work (folding buffered reports into the snapshot, the staleness scan, recording). With
  ``--parts`` that round also times ``cluster.snapshot``, ``core.dispatch`` and ``cluster.record_dispatch``
  (``parts_us_per_call``).
  Server CPU per call (the child's process time over the calls of a round) is reported next to the rates: on a shared
  machine it is steadier than the rates themselves; ``server_cpu_ratio`` (bare over Dispatch, the injected reports'
  time taken out) is the rate ratio to expect where the scheduler process has a core to itself and is the bottleneck.

``--compare-tls``: the child serves a second, mutual-TLS port (client certificates from a throwaway local CA required,
the role check on) on the same replica and event loop, and the client calls it with a frontend certificate. The rounds
of the two ports are interleaved (round i of both back to back, the order alternating), so the mTLS/plaintext Dispatch
rate ratio (``mtls.vs_plaintext``; median of the per-round quotients, target >= 0.8) sees one state of the machine.

If a ratio is below its target (or with ``--profile``), one more Dispatch round runs under cProfile in the child and
the top functions by own time are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import io
import itertools
import json
import multiprocessing
import pstats
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.pairing import pair_instances
from pyllumnix.control_plane.scheduler.cluster import StaleKeepAliveError
from pyllumnix.control_plane.scheduler.config_wire import config_to_pb
from pyllumnix.control_plane.scheduler.main import freeze_startup_heap
from pyllumnix.control_plane.scheduler.replica import SchedulerReplica
from pyllumnix.control_plane.scheduler.service import (
    ADMIN_SERVICE,
    SCHEDULER_SERVICE,
    AdminServicer,
    SchedulerServicer,
)
from pyllumnix.data_plane.llumlet.reporter import LOAD_KEEPALIVE_EVERY
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.grpc_server import start_server
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.protos.llumnix.v1 import admin_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from pyllumnix.tools.bench_dispatch_core import measure_dispatch_latency
from pyllumnix.tools.progress import Steps, progress_bar

TARGET_P99_MS = 0.5
TARGET_RATIO = 0.8
TARGET_TLS_RATIO = 0.8
TARGET_REPORT_CPU_SHARE = 0.5  # of one core, for load reports (issue #16)
# Paired rounds whose rate ratios differ by more than this factor saw different machines (a shared host's load moved
# under them): the summary says so, and the server CPU figures are the ones to read.
ROUNDS_AGREE_FACTOR = 2.0
"""Acceptance (issue 13): with mutual TLS the Dispatch rate stays >= 0.8x the plaintext rate."""
CLUSTER = "bench-dispatch"
TOTAL_BLOCKS = 1300
BLOCK_SIZE = 16
CHILD_START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------------------------- child
def _synthetic_load(rng: random.Random, instance_id: str) -> common_pb2.InstanceLoad:
    """A plausible llumlet report: up to 32 running requests (10 % of instances hold a high-priority one)."""
    load = common_pb2.InstanceLoad(
        instance_id=instance_id,
        total_blocks=TOTAL_BLOCKS,
        block_size=BLOCK_SIZE,
        watermark_blocks=13,
        state=common_pb2.INSTANCE_STATE_ACTIVE,
    )
    used = 0
    for j in range(rng.randint(0, 32)):
        blocks = min(rng.randint(1, 40), TOTAL_BLOCKS - used)
        used += blocks
        high = j == 0 and rng.random() < 0.1
        load.requests.add(
            request_id=f"{instance_id}-r{j}",
            phase=common_pb2.REQUEST_PHASE_RUNNING,
            priority=common_pb2.PRIORITY_HIGH if high else common_pb2.PRIORITY_NORMAL,
            num_blocks=blocks,
            num_prompt_tokens=blocks * BLOCK_SIZE - 8,
            num_output_tokens=8,
        )
    load.num_running = len(load.requests)
    # The aggregates a llumlet sends with every report (data_plane/llumlet/convert.py), so the leader skips the list.
    for r in load.requests:
        load.summary.running_blocks += r.num_blocks
        if r.priority == common_pb2.PRIORITY_HIGH:
            load.summary.num_running_high += 1
            load.summary.running_high_blocks += r.num_blocks
    if rng.random() < 0.2:
        load.num_waiting = rng.randint(1, 4)
        load.head_of_line_demand_blocks = rng.randint(1, 64)
        load.waiting_demand_blocks = load.head_of_line_demand_blocks + rng.randint(0, 64)
    load.free_blocks = TOTAL_BLOCKS - used
    return load


class _ChildStats:
    """Counters the parent reads at the start and end of each round."""

    def __init__(self) -> None:
        self.reports = 0  # messages: full loads and keep-alives
        self.report_s = 0.0
        self.fulls = 0
        self.full_s = 0.0
        self.keepalives = 0
        self.keepalive_s = 0.0
        self.ticks_skipped = 0
        self.stream_restarts = 0
        self.dispatch_s: list[float] = []
        # Seconds spent in the parts of replica.dispatch, summed over the round.
        self.parts: dict[str, float] = {}
        self.terms: set[int] = set()
        # The garbage collector's passes in this process: CPU seconds (of the thread that ran them) and count.
        self.gc_s = 0.0
        self.gc_passes = 0
        self.gc_full_s = 0.0  # the oldest generation's passes (they walk every tracked object)
        self.gc_full_passes = 0
        self._gc_t0 = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """A ``gc.callbacks`` hook: the collector's time is part of every call's cost, counted apart to see it."""
        if phase == "start":
            self._gc_t0 = time.thread_time()
        else:
            took = time.thread_time() - self._gc_t0
            self.gc_s += took
            self.gc_passes += 1
            if info.get("generation") == 2:
                self.gc_full_s += took
                self.gc_full_passes += 1


async def _report_loop(
    servicer: SchedulerServicer,
    templates: list[list[common_pb2.InstanceLoad]],
    hz: float,
    change: float,
    seed: int,
    stats: _ChildStats,
) -> None:
    """N reporters' messages: round-robin ticks at ``hz`` per instance (catching up after a late wake-up so the rate
    holds under load); a tick changed with probability ``change`` sends a full load, else a keep-alive every
    ``LOAD_KEEPALIVE_EVERY`` unchanged ticks. The wire bytes are made outside the timed part; parsing and the
    servicer's per-message path are timed in CPU time of the event loop's thread (``time.thread_time``: on a shared
    machine, time the process spent preempted is not the leader's cost), fulls and keep-alives apart. A process that
    falls more than a second behind skips the excess ticks (counted in ``ticks_skipped``) instead of spinning on them,
    so the scheduler's own work (its lease, the bench's commands) still runs."""
    n = len(templates)
    rate = hz * n
    rng = random.Random(seed + 2)
    wire = [[scheduler_pb2.ReportLoadRequest(load=v).SerializeToString() for v in variants] for variants in templates]
    seq = itertools.count(1_000_000)
    last_seq = [0] * n  # the seq of each instance's latest full load (what its keep-alives confirm)
    quiet = [0] * n
    order = itertools.cycle(range(n))
    start = time.monotonic()
    ticks = 0
    parse = scheduler_pb2.ReportLoadRequest.FromString
    while True:
        await asyncio.sleep(0.01)
        due = int((time.monotonic() - start) * rate) - ticks
        if due > rate:  # starved for over a second: catch up one wake-up's worth, skip the rest
            catch_up = int(rate * 0.01) + 1
            stats.ticks_skipped += due - catch_up
            for _ in range(due - catch_up):
                next(order)
            ticks += due - catch_up
            due = catch_up
        fulls: list[tuple[bytes, int]] = []
        alives: list[tuple[bytes, int]] = []
        for _ in range(max(0, due)):
            i = next(order)
            if rng.random() < change or last_seq[i] == 0:
                last_seq[i], quiet[i] = next(seq), 0
                fulls.append((wire[i][ticks % len(wire[i])], last_seq[i]))
            else:
                quiet[i] += 1
                if quiet[i] >= LOAD_KEEPALIVE_EVERY:
                    quiet[i] = 0
                    iid = templates[i][0].instance_id
                    keep = scheduler_pb2.LoadKeepAlive(instance_id=iid, seq=last_seq[i])
                    alives.append((scheduler_pb2.ReportLoadRequest(keep_alive=keep).SerializeToString(), i))
            ticks += 1
        t0 = time.thread_time()
        for data, n_seq in fulls:
            report = parse(data)
            report.load.seq = n_seq  # the harness's only step inside the timed part
            servicer.take(report, report.load.instance_id, False)
        t1 = time.thread_time()
        for data, i in alives:
            report = parse(data)
            try:
                servicer.take(report, report.keep_alive.instance_id, True)
            except StaleKeepAliveError:  # the servicer would end this stream: the next one starts with a full load
                last_seq[i] = 0
                stats.stream_restarts += 1
        t2 = time.thread_time()
        stats.full_s += t1 - t0
        stats.keepalive_s += t2 - t1
        stats.report_s += t2 - t0
        stats.fulls += len(fulls)
        stats.keepalives += len(alives)
        stats.reports += len(fulls) + len(alives)


def _instrument(replica: SchedulerReplica, stats: _ChildStats, parts: bool) -> Callable[[], None]:
    """Wraps replica.dispatch (and with ``parts`` its parts) in timers, as instance attributes over the class methods;
    returns the function that removes them again."""
    cluster, core = replica.cluster, replica.core
    targets: list[tuple[Any, str, str]] = [(replica, "dispatch", "")]
    if parts:
        targets += [
            (cluster, "snapshot", "cluster.snapshot (staleness scan + report fold)"),
            (core, "dispatch", "core.dispatch (policy decision)"),
            (cluster, "record_dispatch", "cluster.record_dispatch"),
        ]
    for owner, attr, label in targets:
        original = getattr(owner, attr)

        def timed(*args: Any, _original: Any = original, _label: str = label) -> Any:
            t0 = time.perf_counter()
            try:
                return _original(*args)
            finally:
                if _label:
                    stats.parts[_label] = stats.parts.get(_label, 0.0) + time.perf_counter() - t0
                else:
                    stats.dispatch_s.append(time.perf_counter() - t0)

        setattr(owner, attr, timed)

    def undo() -> None:
        for owner, attr, _ in targets:
            delattr(owner, attr)

    return undo


def _pairing_pass_ms(replica: SchedulerReplica) -> float:
    """Median cost of one migration-pairing pass over the live snapshot (what the 100 ms pairing loop would spend)."""
    snapshot = replica.cluster.snapshot(time.monotonic())
    config = PolicyConfig()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        pair_instances(snapshot, config)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def _serve(
    conn: Connection,
    endpoints: list[str],
    instances: int,
    report_hz: float,
    seed: int,
    tls_dir: str = "",
    report_change: float = 1.0,
) -> None:
    client = EtcdClient(endpoints)
    layout = KeyLayout(CLUSTER)
    replica = SchedulerReplica(client, layout, "bench-scheduler", "", seed=seed)
    servicer = SchedulerServicer(replica)
    bindings: list[Any] = [
        (scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server, servicer, SCHEDULER_SERVICE),
        (admin_pb2_grpc.add_AdminServiceServicer_to_server, AdminServicer(replica), ADMIN_SERVICE),
    ]
    # The plaintext server always; with ``tls_dir`` a second one on the same replica and event loop, mutual TLS with
    # the role check, exactly as a secure scheduler's port (start_server under the scheduler's settings).
    server = await start_server(bindings, security=runtime.INSECURE)
    tls_server = (
        await start_server(bindings, security=runtime.from_options("scheduler", "bench", tls_dir=tls_dir, env={}))
        if tls_dir
        else None
    )
    replica.grpc_address = server.address
    await replica.start()
    frozen = freeze_startup_heap()  # as run_scheduler does at this point
    deadline = time.monotonic() + 30
    while not replica.is_leader:
        if time.monotonic() > deadline:
            raise TimeoutError("the bench replica did not win the election")
        await asyncio.sleep(0.02)
    # No llumlets behind the synthetic instances: no migration orders (see the module docstring).
    await replica.set_config(config_to_pb(PolicyConfig(enable_migration=False)), [], 0)

    rng = random.Random(seed)
    ids = [f"instance-{i:05d}" for i in range(instances)]
    lease = await Lease.grant(client, 60)
    for chunk in range(0, instances, 64):
        await asyncio.gather(
            *(
                replica.registry.register(
                    iid,
                    common_pb2.InstanceInfo(
                        instance_id=iid,
                        grpc_address=f"127.0.0.1:{20000 + i}",
                        transport="tcp",
                        engine="sim",
                        total_blocks=TOTAL_BLOCKS,
                        block_size=BLOCK_SIZE,
                    ).SerializeToString(),
                    lease,
                )
                for i, iid in enumerate(ids[chunk : chunk + 64], start=chunk)
            )
        )
    while len(replica.cluster.infos) < instances:
        if time.monotonic() > deadline + 30:
            raise TimeoutError(f"the replica saw {len(replica.cluster.infos)} of {instances} registrations")
        await asyncio.sleep(0.02)
    templates = [[_synthetic_load(rng, iid) for _ in range(4)] for iid in ids]
    for i, variants in enumerate(templates):
        first = common_pb2.InstanceLoad()
        first.CopyFrom(variants[0])
        first.seq = i + 1
        replica.report(first)
    # Reports are folded into the snapshot by the cluster state's timer (every 10 ms), not at once.
    while (known := len(replica.cluster.snapshot(time.monotonic()))) < instances:
        if time.monotonic() > deadline + 60:
            break  # reported as known_instances
        await asyncio.sleep(0.01)

    stats = _ChildStats()
    gc.callbacks.append(stats.on_gc)
    uninstrument: list[Callable[[], None]] = []
    reporter = asyncio.create_task(_report_loop(servicer, templates, report_hz, report_change, seed, stats))

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    marks: dict[str, float] = {}
    profiler: list[cProfile.Profile] = []

    def on_command() -> None:
        command, arg = conn.recv()
        reply: dict[str, Any] = {}
        if command == "round_start":
            marks.update(
                cpu=time.process_time(),
                reports=stats.reports,
                report_s=stats.report_s,
                fulls=stats.fulls,
                full_s=stats.full_s,
                keepalives=stats.keepalives,
                keepalive_s=stats.keepalive_s,
                skipped=stats.ticks_skipped,
                fold_s=replica.cluster.fold_s,
                restarts=stats.stream_restarts,
                gc_s=stats.gc_s,
                gc_passes=stats.gc_passes,
                gc_full_s=stats.gc_full_s,
                gc_full_passes=stats.gc_full_passes,
            )
            stats.dispatch_s = []
            stats.parts = {}
            stats.terms = {replica.leader.term}
        elif command == "round_end":
            reports = stats.reports - marks["reports"]
            reply = {
                "cpu_s": time.process_time() - marks["cpu"],
                "reports": reports,
                "report_s": stats.report_s - marks["report_s"],
                "report_us_mean": (stats.report_s - marks["report_s"]) / reports * 1e6 if reports else 0.0,
                "fulls": stats.fulls - marks["fulls"],
                "full_s": stats.full_s - marks["full_s"],
                "keepalives": stats.keepalives - marks["keepalives"],
                "keepalive_s": stats.keepalive_s - marks["keepalive_s"],
                "ticks_skipped": stats.ticks_skipped - marks["skipped"],
                "fold_s": replica.cluster.fold_s - marks["fold_s"],
                "stream_restarts": stats.stream_restarts - marks["restarts"],
                "gc_s": stats.gc_s - marks["gc_s"],
                "gc_passes": stats.gc_passes - marks["gc_passes"],
                "gc_full_s": stats.gc_full_s - marks["gc_full_s"],
                "gc_full_passes": stats.gc_full_passes - marks["gc_full_passes"],
                "dispatch_s": stats.dispatch_s,
                "parts_s": stats.parts,
                "leader": replica.is_leader,
                "leader_terms": len(stats.terms | {replica.leader.term}),
            }
        elif command == "instrument":
            uninstrument.append(_instrument(replica, stats, bool(arg)))
        elif command == "uninstrument":
            while uninstrument:
                uninstrument.pop()()
        elif command == "profile_start":
            profiler[:] = [cProfile.Profile(time.thread_time)]
            profiler[0].enable()
        elif command == "profile_stop":
            profiler[0].disable()
            reply = {"rows": _profile_rows(profiler[0], int(arg))}
        elif command == "stop":
            stopped.set()
        conn.send(reply)

    loop.add_reader(conn.fileno(), on_command)
    conn.send(
        {
            "address": server.address,
            "tls_address": tls_server.address if tls_server is not None else "",
            "known_instances": known,
            "leader": replica.is_leader,
            "pairing_pass_ms": _pairing_pass_ms(replica),
            "gc_frozen_objects": frozen,
        }
    )
    await stopped.wait()
    gc.callbacks.remove(stats.on_gc)
    loop.remove_reader(conn.fileno())
    reporter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporter
    await replica.stop()
    await lease.revoke(best_effort=True)
    await server.stop(0.5)
    if tls_server is not None:
        await tls_server.stop(0.5)
    await client.close()


def _profile_rows(profile: cProfile.Profile, top: int) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})" if line else name,
            "ncalls": nc,
            "tottime_ms": round(tt * 1e3, 2),
            "cumtime_ms": round(ct * 1e3, 2),
        }
        for (file, line, name), (_, nc, tt, ct, _) in rows
    ]


def _child_main(
    conn: Connection,
    endpoints: list[str],
    instances: int,
    report_hz: float,
    seed: int,
    tls_dir: str = "",
    report_change: float = 1.0,
) -> None:
    """Entry of the spawned scheduler process; with ``tls_dir`` it serves a mutual-TLS port beside the plaintext one."""
    asyncio.run(_serve(conn, endpoints, instances, report_hz, seed, tls_dir, report_change))


# --------------------------------------------------------------------------------------------------------------- client
def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def _ask(conn: Connection, command: str, arg: Any = None, timeout: float = 30.0) -> dict[str, Any]:
    conn.send((command, arg))
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError(f"the scheduler process did not answer {command!r}")
    reply: dict[str, Any] = conn.recv()
    return reply


async def _round(
    conn: Connection, kind: str, call: Callable[[], Awaitable[Any]], concurrency: int, duration: float
) -> dict[str, Any]:
    """K workers calling back to back for ``duration`` seconds; only OK calls count."""
    await _ask(conn, "round_start")
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        while (t0 := time.perf_counter()) < deadline:
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - cpu0
    child = await _ask(conn, "round_end")
    ok = len(latencies)
    row: dict[str, Any] = {
        "kind": kind,
        "calls": ok,
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "rps": round(ok / elapsed, 1),
        "rpc_p50_ms": round(_pct(latencies, 0.50) * 1e3, 3),
        "rpc_p99_ms": round(_pct(latencies, 0.99) * 1e3, 3),
        "server_cpu_us_per_call": round(child["cpu_s"] / max(ok, 1) * 1e6, 1),
        "server_cpu_us_per_call_excl_reports": round(
            (child["cpu_s"] - child["report_s"] - child["fold_s"]) / max(ok, 1) * 1e6, 1
        ),
        "client_cpu_us_per_call": round(client_cpu / max(ok, 1) * 1e6, 1),
        "reports_per_s": round(child["reports"] / elapsed, 1),
        "report_us_mean": round(child["report_us_mean"], 2),
        "full_loads_per_s": round(child["fulls"] / elapsed, 1),
        "keepalives_per_s": round(child["keepalives"] / elapsed, 1),
        "full_us_mean": round(child["full_s"] / child["fulls"] * 1e6, 2) if child["fulls"] else 0.0,
        "keepalive_us_mean": round(child["keepalive_s"] / child["keepalives"] * 1e6, 2) if child["keepalives"] else 0.0,
        "report_cpu_share": round((child["report_s"] + child["fold_s"]) / elapsed, 4),
        "take_cpu_share": round(child["report_s"] / elapsed, 4),
        "fold_cpu_share": round(child["fold_s"] / elapsed, 4),
        "gc_us_per_call": round(child["gc_s"] / max(ok, 1) * 1e6, 1),
        "gc_passes": child["gc_passes"],
        "gc_full_passes": child["gc_full_passes"],
        "gc_full_ms": round(child["gc_full_s"] * 1e3, 1),
        "report_ticks_skipped": child["ticks_skipped"],
        "report_stream_restarts": child["stream_restarts"],
        "leader": child["leader"],
        "leader_terms": child["leader_terms"],
    }
    if child["dispatch_s"]:  # an instrumented round
        row["_served_dispatch_s"] = child["dispatch_s"]
        row["served_parts_us_per_call"] = {k: round(v / max(ok, 1) * 1e6, 1) for k, v in child["parts_s"].items()}
    return row


async def run_bench(
    instances: int,
    concurrency: int,
    duration: float,
    rounds: int,
    decisions: int,
    report_hz: float,
    seed: int,
    profile: bool,
    parts: bool = False,
    steps: Steps | None = None,
    tls_dir: str = "",
    report_change: float = 1.0,
) -> dict[str, Any]:
    """The whole benchmark; ``steps`` (optional) is advanced per phase and round for a progress bar. ``tls_dir``: a
    local PKI; the scheduler serves mutual TLS and the client calls with a frontend certificate."""
    if report_hz <= 0:  # no report at all: every instance goes stale and every Dispatch fails (UNAVAILABLE)
        raise ValueError(f"report_hz must be > 0, got {report_hz} (an idle cluster is report_change=0)")
    steps = steps or Steps()
    steps.describe(f"in-process latency ({decisions} decisions)")
    core = measure_dispatch_latency(instances, decisions, seed)
    steps.step(f"starting a scheduler with {instances} instances")
    async with EmbeddedEtcd() as etcd:
        ctx = multiprocessing.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(
            target=_child_main,
            args=(child_conn, etcd.endpoints, instances, report_hz, seed, tls_dir, report_change),
            daemon=True,
        )
        proc.start()
        child_conn.close()
        try:
            if not await asyncio.to_thread(conn.poll, CHILD_START_TIMEOUT_S):
                raise TimeoutError("the scheduler process did not become ready")
            try:
                ready: dict[str, Any] = conn.recv()
            except EOFError:
                await asyncio.to_thread(proc.join, 5)
                raise RuntimeError(
                    f"the scheduler process exited before it was ready (exit code {proc.exitcode})"
                ) from None
            steps.step("warm-up")
            return await _measure(
                conn,
                ready,
                core,
                instances,
                concurrency,
                duration,
                rounds,
                report_hz,
                seed,
                profile,
                parts,
                steps,
                tls_dir,
                report_change,
            )
        finally:
            with contextlib.suppress(Exception):
                await _ask(conn, "stop", timeout=5)
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)


def _load_reports_block(
    rows: list[dict[str, Any]], dispatch: list[dict[str, Any]], instances: int, hz: float, change: float
) -> dict[str, Any]:
    """The leader's cost of load reports over the measured rounds (medians of per-round figures), and what it would
    be with every instance changing at every tick (all full loads) or none (keep-alives only) at the same rate."""
    if hz <= 0:
        return {"per_instance_hz": 0.0, "injected": "off", "reports_per_s_during_dispatch": 0.0}

    def med(key: str) -> float:
        values = [r[key] for r in rows if r[key]]
        return statistics.median(values) if values else 0.0

    full_us, keepalive_us, share = med("full_us_mean"), med("keepalive_us_mean"), med("report_cpu_share")
    # The fold's CPU per full load taken (views are built only for full loads; keep-alives add none).
    fold_us = med("fold_cpu_share") / med("full_loads_per_s") * 1e6 if med("full_loads_per_s") else 0.0
    return {
        "per_instance_hz": hz,
        "change_fraction": change,
        "keepalive_every_ticks": LOAD_KEEPALIVE_EVERY,
        "injected": "wire bytes parsed and fed to SchedulerServicer.take on the scheduler's event loop (bench "
        "harness; the gRPC stream's own per-message cost is not included)",
        "reports_per_s_during_dispatch": statistics.median(r["reports_per_s"] for r in dispatch),
        "full_loads_per_s": med("full_loads_per_s"),
        "keepalives_per_s": med("keepalives_per_s"),
        "full_us_mean": round(full_us, 2),
        "fold_us_per_full_load": round(fold_us, 2),
        "keepalive_us_mean": round(keepalive_us, 2),
        "cpu_share_of_one_core": round(share, 4),
        "cpu_share_statistic": "median over all measured rounds of (taking the messages + folding them into the "
        "snapshot) thread CPU time / round wall time",
        "take_cpu_share": round(med("take_cpu_share"), 4),
        "fold_cpu_share": round(med("fold_cpu_share"), 4),
        "ticks_skipped": sum(r["report_ticks_skipped"] for r in rows),
        "stream_restarts": sum(r["report_stream_restarts"] for r in rows),
        "cpu_share_if_all_changed": round((full_us + fold_us) * hz * instances / 1e6, 4) if full_us else None,
        "cpu_share_if_none_changed": (
            round(keepalive_us * hz / LOAD_KEEPALIVE_EVERY * instances / 1e6, 4) if keepalive_us else None
        ),
        "target_cpu_share": TARGET_REPORT_CPU_SHARE,
        "meets": share < TARGET_REPORT_CPU_SHARE,
    }


def _grpc_block(bare: list[dict[str, Any]], dispatch: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates, paired ratio and server CPU of one transport's rounds (``bare[i]`` ran just before ``dispatch[i]``)."""
    bare_rps = statistics.median(r["rps"] for r in bare)
    dispatch_rps = statistics.median(r["rps"] for r in dispatch)
    pair_ratios = [d["rps"] / b["rps"] for b, d in zip(bare, dispatch, strict=True) if b["rps"]]
    ratio = statistics.median(pair_ratios) if pair_ratios else 0.0
    return {
        "bare_call": "grpc.health.v1.Health/Check on the scheduler's server",
        "bare_rps": round(bare_rps, 1),
        "dispatch_rps": round(dispatch_rps, 1),
        "ratio": round(ratio, 3),
        "ratio_statistic": "median over rounds of dispatch rps / the preceding bare round's rps",
        "pair_ratios": [round(r, 3) for r in pair_ratios],
        "ratio_of_medians": round(dispatch_rps / bare_rps, 3) if bare_rps else 0.0,
        "best_ratio": round(max(r["rps"] for r in dispatch) / max(r["rps"] for r in bare), 3),
        "rounds_agree": bool(pair_ratios) and max(pair_ratios) <= ROUNDS_AGREE_FACTOR * min(pair_ratios),
        "bare_server_cpu_us_per_call": statistics.median(r["server_cpu_us_per_call"] for r in bare),
        "dispatch_server_cpu_us_per_call": statistics.median(r["server_cpu_us_per_call"] for r in dispatch),
        "server_cpu_ratio": round(
            statistics.median(r["server_cpu_us_per_call_excl_reports"] for r in bare)
            / statistics.median(r["server_cpu_us_per_call_excl_reports"] for r in dispatch),
            3,
        ),
        "dispatch_client_cpu_us_per_call": statistics.median(r["client_cpu_us_per_call"] for r in dispatch),
        "bare_gc_us_per_call": statistics.median(r["gc_us_per_call"] for r in bare),
        "dispatch_gc_us_per_call": statistics.median(r["gc_us_per_call"] for r in dispatch),
        "errors": sum(sum(r["errors"].values()) for r in bare + dispatch),
        "leader_changes": sum(r["leader_terms"] - 1 for r in bare + dispatch),
        "bare_rounds": bare,
        "dispatch_rounds": dispatch,
    }


def _tls_cost(
    plain: dict[str, Any], mtls: dict[str, Any], results: dict[tuple[str, str], list[dict[str, Any]]]
) -> dict[str, Any]:
    """mTLS against plaintext from the interleaved rounds: round ``i`` of both transports ran back to back, so the
    per-round quotient sees one state of a shared machine; its median is the figure the target is checked on."""

    def paired(kind: str) -> list[float]:
        return [
            m["rps"] / p["rps"]
            for p, m in zip(results[("plaintext", kind)], results[("mtls", kind)], strict=True)
            if p["rps"]
        ]

    dispatch_pairs, bare_pairs = paired("dispatch"), paired("bare")
    ratio = statistics.median(dispatch_pairs) if dispatch_pairs else 0.0
    return {
        "dispatch_rate_ratio": round(ratio, 3),
        "statistic": "median over rounds of mTLS Dispatch rps / plaintext Dispatch rps (rounds interleaved, the "
        "order of the two transports alternating)",
        "dispatch_pair_ratios": [round(r, 3) for r in dispatch_pairs],
        "dispatch_ratio_of_medians": round(mtls["dispatch_rps"] / plain["dispatch_rps"], 3)
        if plain["dispatch_rps"]
        else 0.0,
        "bare_rate_ratio": round(statistics.median(bare_pairs), 3) if bare_pairs else 0.0,
        "dispatch_server_cpu_us_per_call": {
            "plaintext": plain["dispatch_server_cpu_us_per_call"],
            "mtls": mtls["dispatch_server_cpu_us_per_call"],
        },
        "dispatch_client_cpu_us_per_call": {
            "plaintext": plain["dispatch_client_cpu_us_per_call"],
            "mtls": mtls["dispatch_client_cpu_us_per_call"],
        },
        "mtls_port": "client certificates required (frontend certificate from a throwaway local CA), RoleInterceptor "
        "on, the same replica and event loop as the plaintext port",
        "target": TARGET_TLS_RATIO,
        "meets": ratio >= TARGET_TLS_RATIO,
    }


async def _measure(
    conn: Connection,
    ready: dict[str, Any],
    core: dict[str, Any],
    instances: int,
    concurrency: int,
    duration: float,
    rounds: int,
    report_hz: float,
    seed: int,
    profile: bool,
    parts: bool,
    steps: Steps,
    tls_dir: str = "",
    report_change: float = 1.0,
) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    shapes = [
        (
            common_pb2.PRIORITY_HIGH if rng.random() < 0.1 else common_pb2.PRIORITY_NORMAL,
            rng.randint(16, 2048),
            rng.randint(16, 512),
        )
        for _ in range(4096)
    ]
    ids = itertools.count()
    health_request = health_pb2.HealthCheckRequest(service="")
    transports: dict[str, tuple[str, runtime.SecuritySettings]] = {"plaintext": (ready["address"], runtime.INSECURE)}
    if tls_dir:
        transports["mtls"] = (
            ready["tls_address"],
            runtime.from_options("frontend", "bench", tls_dir=tls_dir, env={}),
        )
    calls: dict[tuple[str, str], Callable[[], Awaitable[Any]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for transport, (address, settings) in transports.items():
            channel = await stack.enter_async_context(
                runtime.open_channel(address, peer="scheduler", settings=settings)
            )
            health = health_pb2_grpc.HealthStub(channel)
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)

            async def bare(health: health_pb2_grpc.HealthStub = health) -> Any:
                return await health.Check(health_request, timeout=CALL_TIMEOUT_S)

            async def dispatch(scheduler: scheduler_pb2_grpc.SchedulerServiceStub = scheduler) -> Any:
                k = next(ids)
                priority, prompt, max_tokens = shapes[k % len(shapes)]
                request = scheduler_pb2.DispatchRequest(
                    request_id=f"bench-{k}", priority=priority, num_prompt_tokens=prompt, max_tokens=max_tokens
                )
                return await scheduler.Dispatch(request, timeout=CALL_TIMEOUT_S)

            calls[(transport, "bare")], calls[(transport, "dispatch")] = bare, dispatch

        warm = min(0.5, duration / 2)
        for key, call in calls.items():
            await _round(conn, key[1], call, concurrency, warm)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in calls}
        for n in range(rounds):
            # Interleaved, the transports' order alternating, so drift on a shared host hits both alike.
            order = list(transports) if n % 2 == 0 else list(reversed(transports))
            for transport in order:
                for kind in ("bare", "dispatch"):
                    steps.step(f"round {n + 1}/{rounds} {transport} {kind}")
                    results[(transport, kind)].append(
                        await _round(conn, kind, calls[(transport, kind)], concurrency, duration)
                    )

        steps.step("instrumented dispatch round")
        await _ask(conn, "instrument", parts)
        timed = await _round(conn, "dispatch", calls[("plaintext", "dispatch")], concurrency, duration)
        await _ask(conn, "uninstrument")
        served: list[float] = timed.pop("_served_dispatch_s", [])
        grpc_block = _grpc_block(results[("plaintext", "bare")], results[("plaintext", "dispatch")])
        ratio = grpc_block["ratio"]
        report: dict[str, Any] = {
            "instances": instances,
            "known_instances": ready["known_instances"],
            "concurrency": concurrency,
            "duration_s": duration,
            "rounds": rounds,
            "aggregate": "median of rounds",
            "in_process": core,
            "served_dispatch": {
                "calls": len(served),
                "p50_ms": round(_pct(served, 0.50) * 1e3, 4),
                "p99_ms": round(_pct(served, 0.99) * 1e3, 4),
                "mean_ms": round(statistics.fmean(served) * 1e3, 4) if served else 0.0,
                "measured": "one extra Dispatch round (plaintext port) with replica.dispatch wrapped in a timer",
                "rps_instrumented": timed["rps"],
                "parts_us_per_call": timed.get("served_parts_us_per_call", {}),
            },
            "grpc": grpc_block,
            "load_reports": _load_reports_block(
                results[("plaintext", "bare")] + results[("plaintext", "dispatch")],
                results[("plaintext", "dispatch")],
                instances,
                report_hz,
                report_change,
            ),
            "pairing_pass_ms": round(ready["pairing_pass_ms"], 3),
            "gc_frozen_objects": ready["gc_frozen_objects"],
            "targets": {"in_process_p99_ms": TARGET_P99_MS, "ratio": TARGET_RATIO},
            "meets": {
                "in_process_p99": float(core["p99_ms"]) <= TARGET_P99_MS,
                "ratio": ratio >= TARGET_RATIO,
            },
        }
        profile_transport = "plaintext"
        if tls_dir:
            mtls_block = _grpc_block(results[("mtls", "bare")], results[("mtls", "dispatch")])
            cost = _tls_cost(grpc_block, mtls_block, results)
            report["mtls"] = {"grpc": mtls_block, "vs_plaintext": cost}
            report["targets"]["tls_dispatch_rate_ratio"] = TARGET_TLS_RATIO
            report["meets"]["tls_dispatch_rate_ratio"] = cost["meets"]
            if not cost["meets"]:
                profile_transport = "mtls"
        steps.step("done")
        if profile or ratio < TARGET_RATIO or profile_transport == "mtls":
            steps.extend(1)
            steps.describe(f"profiled {profile_transport} dispatch round")
            await _ask(conn, "profile_start")
            row = await _round(conn, "dispatch", calls[(profile_transport, "dispatch")], concurrency, duration)
            rows = (await _ask(conn, "profile_stop", 25))["rows"]
            report["profile"] = {
                "transport": profile_transport,
                "rps_under_profiler": row["rps"],
                "top_by_own_time": rows,
            }
            steps.step("done")
    return report


@click.command("dispatch")
@click.option("--instances", default=1024, show_default=True, help="Synthetic instances in the cluster state.")
@click.option("--concurrency", default=64, show_default=True, help="Calls the client keeps in flight.")
@click.option("--duration", default=3.0, show_default=True, help="Seconds per measured round.")
@click.option("--rounds", default=5, show_default=True, help="Rounds of each kind, alternating (paired).")
@click.option("--decisions", default=5000, show_default=True, help="Decisions of the in-process latency run.")
@click.option(
    "--report-hz",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Report ticks per instance per second during the rounds (a llumlet's default is 20). Must be > 0: instances "
    "that never report go stale and take no request (for an idle cluster, keep-alives only: --report-change 0).",
)
@click.option(
    "--report-change",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Probability that an instance's load changed at a tick (a full load; else a keep-alive every "
    f"{LOAD_KEEPALIVE_EVERY} unchanged ticks). 1.0: every instance busy, the worst case.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--profile", is_flag=True, help="Profile a Dispatch round in the scheduler even if the ratio is met.")
@click.option("--parts", is_flag=True, help="Also time the parts of each Dispatch in the instrumented round.")
@click.option(
    "--compare-tls",
    "--tls",
    "compare_tls",
    is_flag=True,
    help="Also serve a mutual-TLS port (throwaway local CA, role check on) on the same replica and interleave its "
    "rounds with the plaintext ones: the report's 'mtls' block gives its rates and 'mtls.vs_plaintext' the rate ratio "
    f"(target >= {TARGET_TLS_RATIO}).",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
def bench_dispatch(
    instances: int,
    concurrency: int,
    duration: float,
    rounds: int,
    decisions: int,
    report_hz: float,
    report_change: float,
    seed: int,
    profile: bool,
    parts: bool,
    compare_tls: bool,
    json_path: Path | None,
) -> None:
    """Dispatch decision latency in process, and Dispatch RPCs/s next to a bare gRPC call on the same server.

    The JSON report is all that goes to stdout; the progress bar (a terminal only) and the summary line go to stderr.
    """
    transports = 2 if compare_tls else 1
    with progress_bar() as bar, contextlib.ExitStack() as stack:
        pki = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pki-")) if compare_tls else ""
        if pki:
            bootstrap_local(pki, "bench")
        # in-process run, scheduler start, warm-up, the paired rounds of each transport, the instrumented round, done
        steps = Steps(bar, "bench dispatch", total=4 + 2 * rounds * transports)
        report = asyncio.run(
            run_bench(
                instances,
                concurrency,
                duration,
                rounds,
                decisions,
                report_hz,
                seed,
                profile,
                parts,
                steps,
                tls_dir=pki,
                report_change=report_change,
            )
        )
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)
    core, g = report["in_process"], report["grpc"]
    trouble = ""
    if g["errors"] or g["leader_changes"]:
        trouble = f" | {g['errors']} failed calls, {g['leader_changes']} leader changes"
    if not g["rounds_agree"]:
        spread = g["pair_ratios"]
        trouble += (
            f" | rounds disagree (pair ratios {min(spread):.2f}-{max(spread):.2f}): the host's load moved under the "
            "rounds, the rate ratio says little; read the server CPU ratio"
        )
    click.echo(
        f"dispatch N={instances} | in-process p50 {core['p50_ms']:.3f} ms p99 {core['p99_ms']:.3f} ms "
        f"(target <= {TARGET_P99_MS}) | served p99 {report['served_dispatch']['p99_ms']:.3f} ms | "
        f"gRPC bare {g['bare_rps']:.0f}/s dispatch {g['dispatch_rps']:.0f}/s ratio {g['ratio']:.2f} "
        f"(target >= {TARGET_RATIO}; median of {rounds} paired rounds, ratio of medians "
        f"{g['ratio_of_medians']:.2f}) | server CPU/call bare {g['bare_server_cpu_us_per_call']:.0f} us "
        f"dispatch {g['dispatch_server_cpu_us_per_call']:.0f} us (cpu ratio {g['server_cpu_ratio']:.2f}) | "
        f"{concurrency} in flight{trouble}",
        err=True,
    )
    if compare_tls:
        m, c = report["mtls"]["grpc"], report["mtls"]["vs_plaintext"]
        click.echo(
            f"dispatch N={instances} mTLS vs plaintext (interleaved, {rounds} rounds each) | Dispatch "
            f"{m['dispatch_rps']:.0f}/s vs {g['dispatch_rps']:.0f}/s: rate ratio {c['dispatch_rate_ratio']:.2f} "
            f"(target >= {TARGET_TLS_RATIO}: {'met' if c['meets'] else 'NOT met'}; ratio of medians "
            f"{c['dispatch_ratio_of_medians']:.2f}) | bare call ratio {c['bare_rate_ratio']:.2f} | server CPU/Dispatch "
            f"{m['dispatch_server_cpu_us_per_call']:.0f} us vs {g['dispatch_server_cpu_us_per_call']:.0f} us",
            err=True,
        )
