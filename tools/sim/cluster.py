"""The discrete-event cluster simulator: real ``PolicyCore``, real ``SimEngine``s and the migration plan, on a
virtual clock (a heap of ``(time, seq, ...)`` events; nothing sleeps and no wall clock is read).

Events: request arrivals (dispatched through the policy core), per-instance engine steps (an instance with work
steps again at ``now + StepResult.duration``), load reports (the engines' ``load()`` reach the policy snapshot every
``report_interval_ms``, only for instances that changed: ``load()`` is the costliest call, so it is never made per
step), the pairing loop (``PolicyCore.pair`` -> migration processes, see ``migration.py``), the scaling loop
(``PolicyCore.scale`` -> instance starts after ``startup_s``, drains, removals when a draining instance is empty)
and fragmentation samples. Between two reports a dispatch is remembered with ``ClusterSnapshot.record_dispatch``, as
the live leader does.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.control_plane.policy.selection import select_request
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.data_plane.engine.base import RequestSpec, Sampling
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.migration.plan import (
    DEFAULT_LAST_STAGE_MAX_BLOCKS,
    DEFAULT_MAX_STAGES,
    MigrationLimits,
)
from pyllumnix.data_plane.llumlet.views import instance_view, request_views
from pyllumnix.infra.vocabulary import InstanceState, Priority
from pyllumnix.tools.metrics.cluster import ClusterSample, InstanceSample
from pyllumnix.tools.metrics.records import Migration, RequestRecord
from pyllumnix.tools.sim.config import SimConfig
from pyllumnix.tools.sim.instance import SimInstance, instance_id
from pyllumnix.tools.sim.migration import MigrationProcess, Outcome
from pyllumnix.tools.sim.tracker import Tracker
from pyllumnix.tools.workload.request import PRIORITY_NORMAL, RequestArrival

Handler = Callable[[Any, float], None]
# Pairing/scaling rounds with nothing live (no step, arrival, copy or start queued) before the run is declared stalled.
STALL_TICKS = 200


@dataclass(frozen=True)
class EngineCheck:
    """An engine's block pool at the end of a run (conservation: free == total, nothing reserved)."""

    instance_id: str
    total_blocks: int
    free_blocks: int
    reserved_blocks: int
    requests_left: int


@dataclass
class SimResult:
    config: SimConfig
    records: list[RequestRecord]
    cluster_samples: list[ClusterSample]
    instance_series: list[tuple[float, int]]
    migrations: list[MigrationProcess]
    end_time_s: float
    wall_s: float
    events: int
    steps: int
    load_calls: int
    stalled: bool
    engines: list[EngineCheck] = field(default_factory=list)


class ClusterSimulator:
    def __init__(self, config: SimConfig, arrivals: Sequence[RequestArrival]) -> None:
        self.config = config
        self.profile = config.engine_profile()
        self.policy_config = config.policy_config()
        self.core = PolicyCore(self.policy_config, seed=config.seed)
        # 0 in the cluster config is "each llumlet's own flag": the simulated llumlets run with the flags' defaults,
        # the paper's 4 blocks / 3 stages.
        self.limits = MigrationLimits(
            self.policy_config.last_stage_max_blocks or DEFAULT_LAST_STAGE_MAX_BLOCKS,
            self.policy_config.max_stages or DEFAULT_MAX_STAGES,
        )
        self.arrivals = sorted(arrivals, key=lambda a: a.arrival_time_s)
        self.tracker = Tracker()
        self.snapshot = ClusterSnapshot.of(())
        self.instances: dict[str, SimInstance] = {}
        self.retired: list[SimInstance] = []
        self.migrations: list[MigrationProcess] = []
        self.cluster_samples: list[ClusterSample] = []
        self.instance_series: list[tuple[float, int]] = []
        self.starting = 0
        self.now = 0.0
        self.steps = 0
        self.load_calls = 0
        # (time, tie, seq, live, handler, arg): at equal times tie 0 (migration work on a step boundary) runs before
        # tie 1 (everything else, engine steps included), then first-pushed first.
        self._heap: list[tuple[float, int, int, bool, Handler, Any]] = []
        self._seq = 0
        self._live = 0
        self._next_arrival = 0
        self._next_index = 0
        self._backlog: deque[RequestArrival] = deque()
        self._prompts: dict[int, tuple[int, ...]] = {}
        self._last_paired: ClusterSnapshot | None = None
        self._idle_ticks = 0
        self._stalled = False
        self._in_flight = 0

    # ------------------------------------------------------------------ event plumbing
    def _push(self, t: float, handler: Handler, arg: Any = None, *, live: bool = True, tie: int = 1) -> None:
        self._seq += 1
        if live:
            self._live += 1
        heapq.heappush(self._heap, (t, tie, self._seq, live, handler, arg))

    @property
    def done(self) -> bool:
        return self._next_arrival >= len(self.arrivals) and self.tracker.unfinished == 0 and not self._backlog

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        for _ in range(self.config.instances):
            self._add_instance(0.0)
        self._record_count(0.0)
        if self.arrivals:
            self._push(self.arrivals[0].arrival_time_s, self._arrive)
        self._push(0.0, self._report_tick, live=False)
        self._push(self.policy_config.pairing_interval_ms / 1000.0, self._pair_tick, live=False)
        if self.config.autoscale:
            first = max(self.config.scaling_interval_s, self.policy_config.scaling_warmup_ms / 1000.0)
            self._push(first, self._scale_tick, live=False)
        self._push(0.0, self._sample_tick, live=False)
        horizon = self.config.max_virtual_s
        events = 0
        heap = self._heap
        while heap:
            t, _, _, live, handler, arg = heapq.heappop(heap)
            if horizon is not None and t > horizon:
                self._stalled = not self.done
                break
            if live:
                self._live -= 1
            self.now = t
            handler(arg, t)
            events += 1
        records = self.tracker.records()
        finishes = [r.finish_time for r in records if r.finish_time is not None]
        end = max(finishes, default=self.now)
        engines = [
            EngineCheck(
                inst.instance_id,
                inst.engine.total_blocks,
                inst.engine.pool.num_free,
                inst.engine.pool.num_reserved,
                len(inst.engine.request_ids()),
            )
            for inst in (*self.retired, *self.instances.values())
        ]
        return SimResult(
            config=self.config,
            records=records,
            # Periodic ticks may have run past the last finish while in-flight work drained: cut at the end.
            cluster_samples=[c for c in self.cluster_samples if c.time_s <= end],
            instance_series=[p for p in self.instance_series if p[0] <= end],
            migrations=self.migrations,
            end_time_s=end,
            wall_s=time.perf_counter() - wall0,
            events=events,
            steps=self.steps,
            load_calls=self.load_calls,
            stalled=self._stalled,
            engines=engines,
        )

    # ------------------------------------------------------------------ instances
    def _add_instance(self, t: float) -> SimInstance:
        engine = SimEngine(self.profile, payload=False)
        inst = SimInstance(instance_id(self._next_index), engine, started_at=t)
        self._next_index += 1
        self.instances[inst.instance_id] = inst
        self.snapshot = self.snapshot.updated((self._fresh_view(inst),))
        return inst

    def _record_count(self, t: float) -> None:
        """Instance count for cost: started (or starting) until removed, draining ones included."""
        n = len(self.instances) + self.starting
        if self.instance_series and self.instance_series[-1][0] == t:
            self.instance_series[-1] = (t, n)
        elif not self.instance_series or self.instance_series[-1][1] != n:
            self.instance_series.append((t, n))

    def _fresh_view(self, inst: SimInstance) -> Any:
        inst.dirty = False
        self.load_calls += 1
        return instance_view(
            inst.instance_id,
            inst.engine.load(),
            state=inst.state,
            migrating_in=inst.migrating_in,
            migrating_out=inst.migrating_out,
        )

    def _restate(self, *insts: SimInstance) -> None:
        """Pushes the simulator-owned fields (state, migration flags) into the snapshot without a load report."""
        views = []
        for inst in insts:
            view = self.snapshot.get(inst.instance_id)
            if view is not None:
                views.append(
                    view._replace(state=inst.state, migrating_in=inst.migrating_in, migrating_out=inst.migrating_out)
                )
        if views:
            self.snapshot = self.snapshot.updated(views)

    def _restate_slots(self, *insts: SimInstance) -> None:
        """Restates instances whose migration slots (taken and given back by the machines) changed."""
        changed = []
        for inst in insts:
            view = self.snapshot.get(inst.instance_id)
            if view is not None and (view.migrating_in, view.migrating_out) != (inst.migrating_in, inst.migrating_out):
                changed.append(inst)
        self._restate(*changed)

    def _wake(self, inst: SimInstance, t: float) -> None:
        if not inst.step_pending and inst.removed_at is None and inst.engine.has_work():
            inst.step_pending = True
            self._push(t, self._step, inst)

    def _maybe_retire(self, inst: SimInstance, t: float) -> None:
        if (
            inst.state == InstanceState.DRAINING
            and inst.removed_at is None
            and not inst.busy_migrating
            and not inst.engine.request_ids()
        ):
            inst.removed_at = t
            del self.instances[inst.instance_id]
            self.retired.append(inst)
            self.snapshot = self.snapshot.without((inst.instance_id,))
            self._record_count(t)

    def _instance_ready(self, _: Any, t: float) -> None:
        self.starting -= 1
        self._add_instance(t)
        self._record_count(t)
        self._drain_backlog(t)

    # ------------------------------------------------------------------ requests
    def _prompt(self, n: int) -> tuple[int, ...]:
        prompt = self._prompts.get(n)
        if prompt is None:
            prompt = self._prompts[n] = (1,) * n
        return prompt

    def _arrive(self, _: Any, t: float) -> None:
        arrival = self.arrivals[self._next_arrival]
        self._next_arrival += 1
        self.tracker.arrive(arrival)
        if self._backlog or not self._dispatch(arrival, t):
            self._backlog.append(arrival)
        if self._next_arrival < len(self.arrivals):
            self._push(self.arrivals[self._next_arrival].arrival_time_s, self._arrive)

    def _dispatch(self, arrival: RequestArrival, t: float) -> bool:
        priority = arrival.priority if self.config.priorities else PRIORITY_NORMAL
        view = DispatchRequestView(arrival.request_id, Priority(priority), arrival.input_len, arrival.output_len)
        target = self.core.dispatch(self.snapshot, view)
        if target is None:
            return False
        inst = self.instances[target]
        self.snapshot = self.snapshot.record_dispatch(target, view.demand_blocks(inst.engine.block_size), priority)
        spec = RequestSpec(
            arrival.request_id,
            self._prompt(arrival.input_len),
            Sampling(max_tokens=arrival.output_len, ignore_eos=True),
            priority=priority,
            arrival_time=arrival.arrival_time_s,
        )
        inst.engine.add_request(spec, t)
        self.tracker.tracks[arrival.request_id].instance = target
        inst.dirty = True
        self._wake(inst, t)
        return True

    def _drain_backlog(self, t: float) -> None:
        while self._backlog and self._dispatch(self._backlog[0], t):
            self._backlog.popleft()

    def _step(self, inst: SimInstance, t: float) -> None:
        inst.step_pending = False
        if inst.removed_at is not None:
            return
        engine = inst.engine
        if not engine.has_work():
            self._maybe_retire(inst, t)
            return
        result = engine.step(t)
        inst.dirty = True
        if result.preempted:
            for rid in result.preempted:
                self.tracker.on_preempted(rid, t)
        if not result.outputs and result.duration <= 0.0:
            return  # nothing schedulable (e.g. blocks reserved for an incoming migration): idle until woken
        self.steps += 1
        end = t + result.duration
        self.tracker.on_outputs(result.outputs, t, end)
        inst.step_pending = True
        inst.busy_until = end
        self._push(end, self._step, inst)

    # ------------------------------------------------------------------ periodic loops
    def _rearm(self, t: float, handler: Handler) -> None:
        if not self.done and not self._stalled:
            self._push(t, handler, live=False)

    def _report_tick(self, _: Any, t: float) -> None:
        batch = [self._fresh_view(inst) for inst in self.instances.values() if inst.dirty]
        if batch:
            self.snapshot = self.snapshot.updated(batch)
        self._rearm(t + self.config.report_interval_ms / 1000.0, self._report_tick)

    def _pair_tick(self, _: Any, t: float) -> None:
        if self.snapshot is not self._last_paired:
            for order in self.core.pair(self.snapshot):
                self._start_migration(order, t)
            self._last_paired = self.snapshot
        # Nothing queued that could change the cluster: the run cannot finish (reported as stalled).
        self._idle_ticks = self._idle_ticks + 1 if self._live == 0 and not self.done else 0
        if self._idle_ticks > STALL_TICKS:
            self._stalled = True
        self._rearm(t + self.policy_config.pairing_interval_ms / 1000.0, self._pair_tick)

    def _scale_tick(self, _: Any, t: float) -> None:
        decision = self.core.scale(self.snapshot, starting_count=self.starting)
        for iid in decision.cancel_drain:
            inst = self.instances[iid]
            inst.state = InstanceState.ACTIVE
            self._restate(inst)
        for iid in decision.drain:
            inst = self.instances[iid]
            inst.state = InstanceState.DRAINING
            self._restate(inst)
            self._maybe_retire(inst, t)
        for _i in range(decision.start):
            self.starting += 1
            self._push(t + self.config.startup_s, self._instance_ready)
        self._record_count(t)
        if decision.cancel_drain:
            self._drain_backlog(t)
        self._rearm(t + self.config.scaling_interval_s, self._scale_tick)

    def _sample_tick(self, _: Any, t: float) -> None:
        self.cluster_samples.append(
            ClusterSample(
                t,
                tuple(
                    InstanceSample(
                        v.instance_id, v.free_blocks, v.total_blocks, v.num_waiting, v.head_of_line_demand_blocks
                    )
                    for v in self.snapshot
                ),
            )
        )
        self._rearm(t + self.config.sample_interval_s, self._sample_tick)

    # ------------------------------------------------------------------ migration
    def _start_migration(self, order: MigrateOrder, t: float) -> None:
        src = self.instances.get(order.source)
        dst = self.instances.get(order.destination)
        if src is None or dst is None or src.migrating_out or dst.migrating_in or dst.state != InstanceState.ACTIVE:
            return
        self.load_calls += 1
        load = src.engine.load()
        rid = select_request(request_views(load.requests), order.selection, max_blocks=order.max_blocks)
        if rid is None:
            return
        mig = MigrationProcess(src, dst, rid, self.limits, self.config.transfer, t)
        self.migrations.append(mig)
        self._in_flight += 1
        self._migration_stage(mig, t)
        self._restate_slots(src, dst)

    def _migration_stage(self, mig: MigrationProcess, t: float) -> None:
        """Begins a stage between two steps of the source, as the live coordinator does under the engine lock: a
        stage due while the source computes a step waits for that step's end (and runs before the next one)."""
        src = mig.src
        if src.step_pending and src.busy_until > t:
            self._push(src.busy_until, self._migration_stage, mig, tie=0)
            return
        duration = mig.begin_stage(t)
        mig.src.dirty = mig.dst.dirty = True
        self._restate_slots(mig.src, mig.dst)
        if duration is None:
            self._end_migration(mig, t)
        else:
            self._push(t + duration, self._stage_done, mig)

    def _stage_done(self, mig: MigrationProcess, t: float) -> None:
        mig.src.dirty = mig.dst.dirty = True
        if mig.stage_done(t):
            self._end_migration(mig, t)
        else:
            self._migration_stage(mig, t)

    def _end_migration(self, mig: MigrationProcess, t: float) -> None:
        self._in_flight -= 1
        src, dst = mig.src, mig.dst
        self._restate(src, dst)
        track = self.tracker.tracks[mig.request_id]
        committed = mig.outcome is Outcome.COMMITTED
        track.migrations.append(
            Migration(mig.start_time, mig.end_time, mig.downtime_s, committed, src.instance_id, dst.instance_id)
        )
        if committed:
            track.instance = dst.instance_id
        for inst in (src, dst):
            self._wake(inst, t)
            self._maybe_retire(inst, t)


def simulate(config: SimConfig, arrivals: Sequence[RequestArrival]) -> SimResult:
    """Runs one simulation to completion (or ``config.max_virtual_s``)."""
    return ClusterSimulator(config, arrivals).run()
