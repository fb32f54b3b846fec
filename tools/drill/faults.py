"""Injecting and healing each fault, and measuring what the fault itself changes (a new leader, the recovery).

``inject`` runs while the load runs and returns when the fault is over (a stall includes its SIGCONT); ``heal``
runs after every stream ended and restores the cluster for the next scenario (restarts what was killed, waits for a
leader and every instance).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from pyllumnix.protos.llumnix.v1 import common_pb2
from pyllumnix.tools.drill.cluster import LocalCluster, Observer
from pyllumnix.tools.drill.load import Clock, HttpProber, OpenLoop, RequestSpec, StreamClient, burst, probe_generate
from pyllumnix.tools.drill.report import FaultRecord
from pyllumnix.tools.drill.scenarios import Scenario

# How long a fault waits for a new leader / for recovery before it records "none seen".
OBSERVE_TIMEOUT_S = 20.0


@dataclass
class FaultContext:
    scenario: Scenario
    record: FaultRecord
    observer: Observer
    cluster: LocalCluster | None
    clock: Clock
    load: OpenLoop
    client: StreamClient
    burst_specs: list[RequestSpec]
    probe_spec: RequestSpec
    instances: list[str]
    http_base: str = ""
    prober: HttpProber | None = None
    # Heal steps registered by ``inject``, run in order by ``heal``.
    heal_steps: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Measurements still running after the fault (a new leader, the recovery): awaited once the load ended, so a
    # slow or failed recovery does not stretch the load.
    observers: list[asyncio.Task[None]] = field(default_factory=list)

    def observe(self, measurement: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await measurement
            except Exception as exc:
                self.record.notes.append(f"measurement failed: {type(exc).__name__}: {str(exc)[:300]}")

        self.observers.append(asyncio.create_task(run()))

    @property
    def local(self) -> LocalCluster:
        if self.cluster is None:
            raise RuntimeError(f"{self.scenario.fault} needs processes the drill started")
        return self.cluster


async def _current_leader(ctx: FaultContext) -> tuple[str, int] | None:
    seen = await ctx.observer.wait_leader(10.0)
    if seen is None:
        ctx.record.notes.append("no leader answered before the fault")
        return None
    ctx.record.old_leader = seen.replica_id
    return seen.replica_id, seen.term


async def _measure_new_leader(ctx: FaultContext, old_term: int, addresses: list[str], timeout: float) -> None:
    seen = await ctx.observer.wait_leader(timeout, newer_than=old_term, addresses=addresses)
    if seen is not None and ctx.record.injected_at is not None:
        ctx.record.new_leader = seen.replica_id
        ctx.record.time_to_new_leader_s = ctx.clock() - ctx.record.injected_at


async def _busiest_llumlet(ctx: FaultContext) -> str:
    """The started llumlet with the most requests now (so the fault hits streams)."""
    cluster = ctx.local
    loads = await asyncio.gather(
        *(ctx.observer.get_load(f"127.0.0.1:{cluster.llumlet_ports[iid]}") for iid in cluster.llumlets)
    )
    best, best_n = next(iter(cluster.llumlets)), -1
    for iid, load in zip(cluster.llumlets, loads, strict=True):
        n = (load.num_running + load.num_waiting) if load is not None else -1
        if n > best_n:
            best, best_n = iid, n
    ctx.record.notes.append(f"{best} held {best_n} requests at the fault")
    return best


async def _wait_registered_fresh(ctx: FaultContext, instance_id: str, timeout: float) -> str:
    """Until the leader lists ``instance_id`` ACTIVE and takes load reports from it again (its report sequence
    number moves): "" then, else what the leader showed last (for the report)."""
    deadline = time.monotonic() + timeout
    last = "no leader answered"
    first_seq: int | None = None
    while time.monotonic() < deadline:
        statuses = await ctx.observer.list_instances()
        if statuses is not None:
            last = "not listed by the leader"
        for s in statuses or []:
            if s.info.instance_id != instance_id:
                continue
            state = common_pb2.InstanceState.Name(s.state)
            last = f"listed {state}, load report seq {s.load.seq} not advancing"
            if s.state != common_pb2.INSTANCE_STATE_ACTIVE:
                continue
            if first_seq is None:
                first_seq = s.load.seq
            elif s.load.seq > first_seq:
                return ""
        await asyncio.sleep(0.1)
    return last


async def _wait_gone(ctx: FaultContext, instance_id: str, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        statuses = await ctx.observer.list_instances()
        if statuses is not None and all(s.info.instance_id != instance_id for s in statuses):
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    return None


# faults ---------------------------------------------------------------------------------------------------------


async def leader_kill(ctx: FaultContext) -> None:
    cluster = ctx.local
    current = await _current_leader(ctx)
    if current is None:
        return
    replica_id, term = current
    ctx.record.target = replica_id
    ctx.record.injected_at = ctx.clock()
    await asyncio.to_thread(cluster.schedulers[replica_id].kill)
    others = [cluster.scheduler_address(r) for r in cluster.schedulers if r != replica_id]
    ctx.observe(_measure_new_leader(ctx, term, others, OBSERVE_TIMEOUT_S))

    async def restart() -> None:
        await asyncio.to_thread(cluster.start_scheduler, replica_id)

    ctx.heal_steps.append(restart)


async def leader_stall(ctx: FaultContext) -> None:
    cluster = ctx.local
    current = await _current_leader(ctx)
    if current is None:
        return
    replica_id, term = current
    ctx.record.target = replica_id
    pid = cluster.schedulers[replica_id].pgid
    others = [cluster.scheduler_address(r) for r in cluster.schedulers if r != replica_id]
    ctx.record.injected_at = ctx.clock()
    cluster.pause(pid, group=True)
    try:
        await asyncio.wait_for(_measure_new_leader(ctx, term, others, ctx.scenario.seconds), ctx.scenario.seconds + 1)
    except TimeoutError:
        pass
    remaining = ctx.record.injected_at + ctx.scenario.seconds - ctx.clock()
    if remaining > 0:
        await asyncio.sleep(remaining)
    cluster.resume(pid, group=True)
    ctx.record.resumed_at = ctx.clock()
    ctx.observe(_wait_single_leader(ctx))


async def _wait_single_leader(ctx: FaultContext) -> None:
    """After a stall: until exactly one replica answers as leader (the stalled one stepped down or kept it)."""
    assert ctx.record.resumed_at is not None
    deadline = time.monotonic() + OBSERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        leaders = await ctx.observer.leaders()
        if len(leaders) == 1:
            ctx.record.recovery_s = ctx.clock() - ctx.record.resumed_at
            return
        if len(leaders) > 1:
            ctx.record.notes.append(f"two replicas answered as leader: {[s.replica_id for s in leaders]}")
        await asyncio.sleep(0.05)
    ctx.record.notes.append("no single leader after the stall")


async def leader_resign(ctx: FaultContext) -> None:
    current = await ctx.observer.wait_leader(10.0)
    if current is None:
        ctx.record.notes.append("no leader answered before the fault")
        return
    ctx.record.old_leader = ctx.record.target = current.replica_id
    ctx.record.injected_at = ctx.clock()
    try:
        await ctx.observer.resign(current.address)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            ctx.record.skipped = f"leader resign is not supported by this server ({current.address})"
        else:
            ctx.record.notes.append(f"ResignLeader failed: {exc.code().name} {exc.details()}")
        return
    ctx.observe(_measure_new_leader(ctx, current.term, ctx.observer.schedulers, OBSERVE_TIMEOUT_S))


async def llumlet_kill(ctx: FaultContext) -> None:
    cluster = ctx.local
    instance_id = await _busiest_llumlet(ctx)
    ctx.record.target = instance_id
    ctx.record.killed_instances.append(instance_id)
    ctx.record.injected_at = ctx.clock()
    await asyncio.to_thread(cluster.llumlets[instance_id].kill)

    async def measure() -> None:
        gone = await _wait_gone(ctx, instance_id, OBSERVE_TIMEOUT_S)
        ctx.record.recovery_s = gone
        ctx.record.notes.append(
            f"{instance_id} left the leader's view after {gone:.2f} s" if gone is not None else f"{instance_id} stayed"
        )

    ctx.observe(measure())

    async def restart() -> None:
        await _wait_gone(ctx, instance_id, OBSERVE_TIMEOUT_S)
        await asyncio.to_thread(functools.partial(cluster.start_llumlet, instance_id, new_port=True))

    ctx.heal_steps.append(restart)


async def llumlet_stall(ctx: FaultContext) -> None:
    cluster = ctx.local
    instance_id = await _busiest_llumlet(ctx)
    ctx.record.target = instance_id
    pid = cluster.llumlets[instance_id].pgid
    ctx.record.injected_at = ctx.clock()
    cluster.pause(pid, group=True)
    await asyncio.sleep(ctx.scenario.seconds)
    cluster.resume(pid, group=True)
    ctx.record.resumed_at = ctx.clock()
    resumed = ctx.record.resumed_at

    async def measure() -> None:
        missing = await _wait_registered_fresh(ctx, instance_id, OBSERVE_TIMEOUT_S)
        if missing:
            ctx.record.notes.append(f"{instance_id} {OBSERVE_TIMEOUT_S:g} s after SIGCONT: {missing}")
        else:
            ctx.record.recovery_s = ctx.clock() - resumed

    ctx.observe(measure())


async def etcd_pause(ctx: FaultContext) -> None:
    cluster = ctx.local
    pids = cluster.etcd_pids()
    ctx.record.target = f"etcd ({len(pids)} member{'s' if len(pids) != 1 else ''})"
    if ctx.http_base:
        ctx.prober = HttpProber(ctx.http_base, ctx.clock, credentials=ctx.client.credentials)
        ctx.prober.start()
    ctx.record.injected_at = ctx.clock()
    for pid in pids:
        cluster.pause(pid)
    await asyncio.sleep(ctx.scenario.seconds)
    for pid in pids:
        cluster.resume(pid)
    ctx.record.resumed_at = ctx.clock()
    ctx.observe(_measure_full_service(ctx))


async def _measure_full_service(ctx: FaultContext) -> None:
    """From the resume to: a leader lists every instance ACTIVE and a fresh stream finishes through the frontend."""
    assert ctx.record.resumed_at is not None
    ok, missing = await ctx.observer.wait_healthy(ctx.instances, OBSERVE_TIMEOUT_S)
    if not ok:
        ctx.record.notes.append(f"not healthy {OBSERVE_TIMEOUT_S:g} s after the resume: {missing}")
        return
    await _measure_service(ctx)


async def _measure_service(ctx: FaultContext) -> None:
    """From the resume until a fresh stream finishes through the frontend."""
    assert ctx.record.resumed_at is not None
    deadline = time.monotonic() + OBSERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if await probe_generate(ctx.client.address, ctx.probe_spec, 10.0, ctx.client.credentials):
            ctx.record.recovery_s = ctx.clock() - ctx.record.resumed_at
            return
        await asyncio.sleep(0.1)
    ctx.record.notes.append("no stream finished after the resume")


async def etcd_member_kill(ctx: FaultContext) -> None:
    cluster = ctx.local
    etcd = cluster.etcd
    assert etcd is not None
    if etcd.size < 3:
        ctx.record.skipped = "etcd-member-kill needs a 3-member etcd (--etcd-members 3)"
        return
    index = await asyncio.to_thread(etcd.leader_index)
    ctx.record.target = f"etcd member m{index} (raft leader)"
    ctx.record.injected_at = ctx.clock()
    await asyncio.to_thread(etcd.kill_member, index)

    async def restart() -> None:
        await asyncio.to_thread(etcd.restart_member, index)
        cluster.etcd_pids()
        await asyncio.to_thread(etcd.wait_healthy, 15.0)

    ctx.heal_steps.append(restart)


async def frontend_stall(ctx: FaultContext) -> None:
    cluster = ctx.local
    assert cluster.frontend is not None
    pid = cluster.frontend.pgid
    ctx.record.target = "frontend"
    ctx.record.injected_at = ctx.clock()
    cluster.pause(pid, group=True)
    await asyncio.sleep(ctx.scenario.seconds)
    cluster.resume(pid, group=True)
    ctx.record.resumed_at = ctx.clock()
    ctx.observe(_measure_service(ctx))


async def burst_fault(ctx: FaultContext) -> None:
    n = ctx.scenario.requests
    ctx.record.target = f"{n} streams at once"
    ctx.record.injected_at = ctx.clock()
    for task in await burst(ctx.client, ctx.burst_specs, n):
        ctx.load.add(task)


INJECTORS: dict[str, Callable[[FaultContext], Awaitable[None]]] = {
    "leader-kill": leader_kill,
    "leader-stall": leader_stall,
    "leader-resign": leader_resign,
    "llumlet-kill": llumlet_kill,
    "llumlet-stall": llumlet_stall,
    "etcd-pause": etcd_pause,
    "etcd-member-kill": etcd_member_kill,
    "frontend-stall": frontend_stall,
    "burst": burst_fault,
}


async def heal(ctx: FaultContext, timeout: float = 30.0) -> tuple[bool, str]:
    """Runs the fault's heal steps, restarts llumlets that exited on their own (each noted), then waits for a leader
    listing every instance."""
    for step in ctx.heal_steps:
        try:
            await step()
        except Exception as exc:
            ctx.record.notes.append(f"heal failed: {type(exc).__name__}: {str(exc)[:500]}")
    if ctx.cluster is not None:
        cluster = ctx.cluster
        for instance_id in cluster.exited_llumlets():
            code = cluster.llumlets[instance_id].proc.returncode
            ctx.record.notes.append(f"{instance_id} had exited (code {code}); restarted")
            try:
                await _wait_gone(ctx, instance_id, OBSERVE_TIMEOUT_S)
                await asyncio.to_thread(functools.partial(cluster.start_llumlet, instance_id, new_port=True))
            except Exception as exc:
                ctx.record.notes.append(f"restart of {instance_id} failed: {type(exc).__name__}: {str(exc)[:500]}")
    return await ctx.observer.wait_healthy(ctx.instances, timeout)
