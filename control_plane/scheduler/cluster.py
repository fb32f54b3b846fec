"""The scheduler's picture of the cluster: registry entries joined with the latest load report of each instance.

Reports arrive at up to 20 Hz per instance. Taking one stores the load and marks the instance (no view is built);
the marked instances are folded into the policy snapshot in one batch every ``REPORT_FOLD_INTERVAL_S`` (10 ms) by a
timer on the event loop, off the Dispatch path: a Dispatch folds only the requests it dispatched, and reports only as
a backstop (no event loop, or the timer two intervals late). Reports of one instance between two folds coalesce (one
view for the latest), and a batch of many changes lets the policy recompute its keys in one vectorised pass instead
of one change at a time. A report is visible to decisions at most ~10 ms after it arrived, a fifth of the default
report interval. ``fold_s``/``folds`` count the fold's CPU time (the leader's cost of reports beyond taking them).

An instance is in the snapshot once it is registered and has reported; it is unhealthy (no dispatch, no migration in)
when its reports stop for ``stale_after`` seconds, or sooner, for ``dispatch_stale_after`` seconds, while other
instances' reports keep arriving: a request dispatched to a stalled instance waits for its AddRequest deadline before it
can go elsewhere, so a silent instance must stop taking requests within a few report intervals. The relative rule keeps
a stall of the scheduler itself (every report late at once) from emptying the cluster.

Reports cost the leader O(changed) (``data_plane/llumlet/reporter.py``): a llumlet sends its full load only when it
changed and otherwise a keep-alive every ``LOAD_KEEPALIVE_EVERY`` (3) report intervals, which ``keepalive`` takes with
a dict write (no view, no snapshot update) when it names the snapshot held here. ``dispatch_stale_after`` is
``dispatch_stale_after(interval)`` = max(0.3 s, 6 intervals): a busy llumlet ticks at its engine's step ends, so its
messages come at most 3.5 intervals apart (``data_plane/llumlet/reporter.py``); 6 leave 2.5 intervals of slack, so a
healthy instance stays dispatchable and one that misses its keep-alive by more than that does not.

A quiet instance (``load_is_quiet``: no request, no migration, nothing reserved; what an idle cluster is made of)
keeps alive only every ``QUIET_KEEPALIVE_EVERY`` (20) intervals, 1 s at the default 50 ms: at 3 intervals an idle
cluster of 4 llumlets sent the leader 27 messages a second, about half of each llumlet's idle CPU and most of the
leader's. Both ends read quietness off the same load (the last full load the llumlet sent, which the keep-alives
confirm), so they agree on the period. Its silence bound is ``quiet_stale_after`` = 2 quiet keep-alive periods (2 s at
50 ms), but a quiet instance is the likeliest dispatch target because it is quiet: so the leader *expects* it to
speak once it has dispatched a request there, and the short bound runs from that dispatch instead. A llumlet reports
the change a new request makes at its next tick, so a live one answers well within ``dispatch_stale_after``.
**Bound**: a silent quiet instance gets no new request later than ``dispatch_stale_after`` (+ one stale scan) after
the first request the leader dispatched to it since its last message (before: after it fell silent; the number of
requests sent to it in that window is bounded the same way); a silent busy instance, as before. A silent quiet
instance nobody dispatches to is marked unhealthy after ``quiet_stale_after``, so it can be picked as a migration
destination for that long (before: ``dispatch_stale_after``); such a migration fails at the source's deadline for the
destination's answer and the request runs on at its source. A keep-alive that arrives ``dispatch_stale_after`` or more
after such a dispatch shows that the request never reached the instance (it would have sent its load instead) and
ends the expectation; one arriving sooner does not (it may have been sent before the request arrived), so at worst an
instance whose request went elsewhere (AddRequest failed) looks silent until its next keep-alive.

``report_times`` are this process's ``time.monotonic()`` (staleness must not jump with the wall clock); the admin API
converts them to Unix seconds, as the proto says.

A dispatched request counts on its instance from the dispatch until a report lists it (or ``pending_ttl`` passes):
a report taken between the dispatch and the request's arrival at the llumlet must not make the instance look as if
the request never went there, or a burst of dispatches would herd onto it.
"""

from __future__ import annotations

import asyncio
import math
import time

from pyllumnix.control_plane.policy.config import RANGES, PolicyConfig
from pyllumnix.control_plane.policy.freeness import migration_freeness
from pyllumnix.control_plane.policy.snapshot import ClusterSnapshot
from pyllumnix.control_plane.policy.views import InstanceView
from pyllumnix.control_plane.scheduler.views import from_instance_load
from pyllumnix.infra.load_cadence import QUIET_KEEPALIVE_EVERY, load_is_quiet
from pyllumnix.infra.vocabulary import InstanceState, Priority, normalize_priority
from pyllumnix.protos.llumnix.v1 import common_pb2, scheduler_pb2

# Silent instances are looked for at most this often (an O(instances) scan, kept off the per-dispatch path).
STALE_SCAN_INTERVAL_S = 0.1
# Reports taken are folded into the snapshot this often, in one batch (see the module docstring).
REPORT_FOLD_INTERVAL_S = 0.01
# Loads of instances not registered yet kept for their registration (older than stale_after ones make room).
MAX_EARLY_LOADS = 4096
# An instance silent for this many report intervals (and at least DISPATCH_STALE_MIN_S) gets no new request.
DISPATCH_STALE_INTERVALS = 6
DISPATCH_STALE_MIN_S = 0.3


def quiet_stale_after(report_interval_s: float) -> float:
    """Silence after which a quiet instance nobody sent anything to counts as silent: two quiet keep-alive periods
    (2 s at the default 50 ms), so a quiet but healthy instance never looks silent."""
    return max(DISPATCH_STALE_MIN_S, 2 * QUIET_KEEPALIVE_EVERY * report_interval_s)


def dispatch_stale_after(report_interval_s: float) -> float:
    """Silence after which an instance gets no new request: max(0.3 s, 6 report intervals). Llumlets send a
    keep-alive every 3 intervals (3.5 at most while they step) when their load does not change, so this leaves 2.5
    intervals of slack."""
    return max(DISPATCH_STALE_MIN_S, DISPATCH_STALE_INTERVALS * report_interval_s)


def silence_bounds(report_interval_s: float) -> tuple[float, float, float]:
    """(``stale_after``, ``dispatch_stale_after``, ``quiet_stale_after``) of an instance reporting every
    ``report_interval_s``: unhealthy after 20 intervals (at least 1 s), no new request after the shorter two."""
    interval = report_interval_s
    return max(1.0, 20 * interval), dispatch_stale_after(interval), quiet_stale_after(interval)


class StaleKeepAliveError(Exception):
    """A keep-alive confirms a snapshot this leader does not hold (never received, throttled, or forgotten when the
    instance left the registry): the llumlet must send its full load again (a new stream starts with one)."""


class ClusterState:
    def __init__(
        self,
        stale_after: float = 1.0,
        pending_ttl: float = 2.0,
        dispatch_stale_after: float = 0.3,
        quiet_stale_after: float = 2.0,
    ) -> None:
        self.infos: dict[str, common_pb2.InstanceInfo] = {}
        self.loads: dict[str, common_pb2.InstanceLoad] = {}
        self.report_times: dict[str, float] = {}
        # Drain/cordon decided here and sent to the llumlet; wins over the reported state until the llumlet agrees.
        self.overrides: dict[str, InstanceState] = {}
        self.stale_after = stale_after
        self.dispatch_stale_after = min(dispatch_stale_after, stale_after)
        self.quiet_stale_after = quiet_stale_after
        # Instances whose latest full load (taken, or held by the service's rate floor) is quiet (``load_is_quiet``).
        self.quiet: set[str] = set()
        # Quiet instance -> when the leader first dispatched a request to it since its last message.
        self.expecting: dict[str, float] = {}
        self._pending: dict[str, InstanceView] = {}
        self._snapshot = ClusterSnapshot.of(())
        self._unhealthy: set[str] = set()
        self.pending_ttl = pending_ttl
        # instance -> request id -> (demand blocks, priority, dispatch time)
        self._dispatched: dict[str, dict[str, tuple[int, int, float]]] = {}
        self._last_stale_scan = float("-inf")
        # Instances with a report taken but not folded yet (an ordered set), since when (time.monotonic()), the timer.
        self._reported: dict[str, None] = {}
        self._reported_since = 0.0
        self._fold_timer: asyncio.TimerHandle | None = None
        # Latest load (and arrival time) of instances not registered here yet, at most MAX_EARLY_LOADS.
        self._early: dict[str, tuple[common_pb2.InstanceLoad, float]] = {}
        self.fold_s = 0.0  # thread CPU seconds spent folding reports into the snapshot
        self.folds = 0
        # Set whenever the next snapshot() may differ from the last one (a fold, a record or view waiting for one, an
        # instance removed, ``touch``): the leader's pairing loop sleeps on it while nothing changes.
        self.changed = asyncio.Event()

    # --- membership ---
    def set_registry(self, entries: dict[str, common_pb2.InstanceInfo]) -> list[str]:
        """Replaces the membership (a registry resync); returns the ids that disappeared."""
        gone = [iid for iid in self.infos if iid not in entries]
        new = [iid for iid in entries if iid not in self.infos]
        self.infos = dict(entries)
        for iid in gone:
            self.remove(iid)
        for iid in new:
            self._take_early(iid)
        return gone

    def upsert(self, info: common_pb2.InstanceInfo) -> None:
        self.infos[info.instance_id] = info
        self._take_early(info.instance_id)

    def _take_early(self, instance_id: str) -> None:
        """A load that arrived before this leader saw the registration counts from the registration on (with its own
        arrival time): the llumlet sends it once, then only keep-alives while nothing changes."""
        early = self._early.pop(instance_id, None)
        if early is not None:
            self.report(early[0], early[1])

    def remove(self, instance_id: str) -> common_pb2.InstanceLoad | None:
        """Forgets an instance; returns its last load (its requests, to report them failed)."""
        self.infos.pop(instance_id, None)
        self.report_times.pop(instance_id, None)
        self.overrides.pop(instance_id, None)
        self._pending.pop(instance_id, None)
        self._reported.pop(instance_id, None)
        self._dispatched.pop(instance_id, None)
        self._unhealthy.discard(instance_id)
        self.quiet.discard(instance_id)
        self.expecting.pop(instance_id, None)
        if instance_id in self._snapshot:
            self._snapshot = self._snapshot.without([instance_id])
            self.changed.set()
        return self.loads.pop(instance_id, None)

    # --- load ---
    def report(self, load: common_pb2.InstanceLoad, now: float) -> bool:
        """Takes a report if it is from a registered instance and newer than the last; True if taken."""
        iid = load.instance_id
        if iid not in self.infos:
            self._keep_early(load, now)
            return False
        last = self.loads.get(iid)
        if last is not None and load.seq <= last.seq and self.report_times.get(iid, 0) > now - self.stale_after:
            return False
        self.loads[iid] = load
        self.report_times[iid] = now
        self.expecting.pop(iid, None)
        self.note_cadence(load)
        override = self.overrides.get(iid)
        if override is not None and int(load.state) == int(override):
            del self.overrides[iid]
            override = None
        self._unhealthy.discard(iid)
        if not self._reported:
            self._reported_since = time.monotonic()
            self._schedule_fold()
        self._reported[iid] = None
        return True

    def note_cadence(self, load: common_pb2.InstanceLoad) -> None:
        """Follows the keep-alive period the llumlet now uses: the one of the latest full load it sent (taken here, or
        held by the service's rate floor until a keep-alive confirms it). Registered instances only."""
        if load.instance_id not in self.infos:
            return
        if load_is_quiet(load):
            self.quiet.add(load.instance_id)
        else:
            self.quiet.discard(load.instance_id)

    def expect(self, instance_id: str, now: float) -> None:
        """The leader dispatched a request to ``instance_id``: if it is quiet, it must now speak within
        ``dispatch_stale_after`` (see the module docstring), the first such dispatch counting."""
        if instance_id in self.quiet and instance_id not in self.expecting:
            self.expecting[instance_id] = now

    def silence_bound(self, instance_id: str) -> float:
        """How long ``instance_id`` may be silent, by its cadence, before it stops taking requests."""
        _, short, quiet = self.bounds(instance_id)
        return quiet if instance_id in self.quiet else short

    def set_report_interval(self, report_interval_s: float) -> None:
        """The cluster's ``load_report_interval_ms`` (in seconds) sets the silence bounds of every instance."""
        self.stale_after, self.dispatch_stale_after, self.quiet_stale_after = silence_bounds(report_interval_s)

    def bounds(self, instance_id: str) -> tuple[float, float, float]:
        """(stale_after, dispatch_stale_after, quiet_stale_after) for ``instance_id``: the cluster's, or the longer
        ones of the report period its llumlet registered (``InstanceInfo.load_report_interval_ms``) when that is
        slower. A llumlet keeps its own ``--load-interval-ms``: judged by a faster cluster setting it looked silent,
        so got no new request, while alive. The registered period is clamped to the cluster config's range: a
        llumlet registering 2^31 ms would otherwise never be judged silent by its reports (REVIEW10 L1)."""
        info = self.infos.get(instance_id)
        own_ms = info.load_report_interval_ms if info is not None else 0
        cluster = (self.stale_after, self.dispatch_stale_after, self.quiet_stale_after)
        if own_ms <= 0:
            return cluster
        low, high = RANGES["load_report_interval_ms"]
        own = silence_bounds(min(max(own_ms, low), high) / 1000)
        return max(cluster[0], own[0]), max(cluster[1], own[1]), max(cluster[2], own[2])

    def _keep_early(self, load: common_pb2.InstanceLoad, now: float) -> None:
        early = self._early
        if load.instance_id not in early and len(early) >= MAX_EARLY_LOADS:
            for iid in [iid for iid, (_, t) in early.items() if now - t > self.stale_after]:
                del early[iid]
            if len(early) >= MAX_EARLY_LOADS:
                return
        early[load.instance_id] = (load, now)

    def _schedule_fold(self) -> None:
        if self._fold_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): the next snapshot() folds
            return
        self._fold_timer = loop.call_later(REPORT_FOLD_INTERVAL_S, self._fold_from_timer)

    def _fold_from_timer(self) -> None:
        self._fold_timer = None
        self._fold(time.monotonic(), reports=True)

    def _fold(self, now: float, *, reports: bool) -> None:
        """Applies what is pending to the snapshot: the dispatch/override/health views and, with ``reports``, a view
        of the latest load of each instance reported since the last fold."""
        t0 = time.thread_time() if reports and self._reported else 0.0
        if t0:
            loads, overrides, unhealthy, dispatched = self.loads, self.overrides, self._unhealthy, self._dispatched
            pending = self._pending
            for iid in self._reported:
                load = loads.get(iid)
                if load is not None:
                    # silent since (a synchronous caller's snapshot() folds late): as the staleness scan found it
                    healthy = iid not in unhealthy
                    if dispatched.get(iid):
                        pending[iid] = self._view(load, overrides.get(iid), now, healthy)
                    else:  # nothing dispatched there since its report: the common case, no pending to reconcile
                        pending[iid] = from_instance_load(load, state=overrides.get(iid), healthy=healthy)
            self._reported.clear()
        if self._pending:
            self._snapshot = self._snapshot.updated(self._pending.values())
            self._pending.clear()
            self.changed.set()
        if t0:
            self.fold_s += time.thread_time() - t0
            self.folds += 1

    def keepalive(self, instance_id: str, seq: int, now: float) -> bool:
        """Takes a keep-alive ("load unchanged since snapshot ``seq``"): refreshes the report time only, unless the
        instance was marked silent (made healthy again) or a request dispatched there and not yet listed by a report
        outlived ``pending_ttl`` (the view is rebuilt without it). False if the instance is not registered;
        ``StaleKeepAliveError`` if the snapshot held here is not ``seq``."""
        if instance_id not in self.infos:
            early = self._early.get(instance_id)
            if early is not None and early[0].seq == seq:
                self._early[instance_id] = (early[0], now)
            return False
        load = self.loads.get(instance_id)
        if load is None or load.seq != seq:
            held = "none" if load is None else str(load.seq)
            raise StaleKeepAliveError(
                f"keep-alive of {instance_id} confirms load seq {seq}, the leader holds {held}: send the full load"
            )
        self.report_times[instance_id] = now
        sent = self.expecting.get(instance_id)
        if sent is not None and now - sent >= self.bounds(instance_id)[1]:
            del self.expecting[instance_id]  # sent after the work would have been reported: it never arrived there
        pending = self._dispatched.get(instance_id)  # in dispatch order: the first is the oldest
        expired = pending is not None and bool(pending) and now - next(iter(pending.values()))[2] > self.pending_ttl
        if expired or instance_id in self._unhealthy:
            self._unhealthy.discard(instance_id)
            self._pending[instance_id] = self._view(load, self.overrides.get(instance_id), now)
            self.changed.set()
        return True

    def _view(
        self, load: common_pb2.InstanceLoad, state: InstanceState | None, now: float, healthy: bool = True
    ) -> InstanceView:
        """The reported view plus the requests dispatched there that the report does not list yet."""
        pending = self._dispatched.get(load.instance_id)
        if not pending:
            return from_instance_load(load, state=state, healthy=healthy)
        for rid in [rid for rid, (_, _, t) in pending.items() if now - t > self.pending_ttl]:
            del pending[rid]
        if pending:  # the report's request list is walked only for requests still pending, until all are found
            for r in load.requests:
                rid = r.request_id
                if rid in pending:
                    del pending[rid]
                    if not pending:
                        break
        if not pending:
            return from_instance_load(load, state=state, healthy=healthy)
        dispatched = (
            len(pending),
            sum(d for d, _, _ in pending.values()),
            sum(1 for _, p, _ in pending.values() if normalize_priority(p) == Priority.HIGH),
        )
        return from_instance_load(load, state=state, healthy=healthy, dispatched=dispatched)

    def clear_overrides(self, now: float) -> None:
        """Forgets every state this leader ordered and no report confirmed yet (its term ended): a later term, its own
        or another replica's, cannot know they still hold (another leader may have undrained the instance since), and
        an override outlived its term for as long as the instance never reported that state (a drain in force for
        ever: no dispatches, its requests migrated away)."""
        for iid in list(self.overrides):
            del self.overrides[iid]
            load = self.loads.get(iid)
            if load is not None:
                self._pending[iid] = self._view(load, None, now, iid not in self._unhealthy)
        self.changed.set()

    def set_override(self, instance_id: str, state: InstanceState, now: float) -> None:
        self.overrides[instance_id] = state
        load = self.loads.get(instance_id)
        if load is not None:
            self._pending[instance_id] = self._view(load, state, now, instance_id not in self._unhealthy)
            self.changed.set()

    def fold(self, now: float) -> None:
        """Applies every report taken so far to the snapshot now (the timer does within REPORT_FOLD_INTERVAL_S)."""
        self._fold(now, reports=True)

    def snapshot(self, now: float) -> ClusterSnapshot:
        """The policy snapshot with every buffered report applied and silent instances marked unhealthy."""
        if now - self._last_stale_scan >= STALE_SCAN_INTERVAL_S:  # an O(n) scan: not on every dispatch
            self._last_stale_scan = now
            newest = max(self.report_times.values(), default=now)
            quiet, expecting = self.quiet, self.expecting
            for iid, t in self.report_times.items():
                if iid in self._unhealthy:
                    continue
                absolute, short, quiet_after = self.bounds(iid)
                if iid not in quiet:
                    silent = now - t > absolute or (now - t > short and newest - t > short)
                else:  # see the module docstring: the short bound runs from the first send since its last message
                    sent = expecting.get(iid)
                    if sent is None:
                        silent = now - t > quiet_after
                    else:
                        silent = now - sent > absolute or (now - sent > short and newest - sent > short)
                if silent:
                    self._unhealthy.add(iid)
                    view = self._pending.get(iid) or self._snapshot.get(iid)
                    if view is not None:
                        self._pending[iid] = view._replace(healthy=False)
        backstop = self._reported and (
            self._fold_timer is None or time.monotonic() - self._reported_since >= 2 * REPORT_FOLD_INTERVAL_S
        )
        self._fold(now, reports=bool(backstop))
        return self._snapshot

    def record_dispatch(self, instance_id: str, request_id: str, demand_blocks: int, priority: int, now: float) -> None:
        """Counts a dispatched request on its instance. Buffered like a report: the next ``snapshot()`` folds it in
        with everything else pending, so a dispatch costs one snapshot update, not two."""
        self._dispatched.setdefault(instance_id, {})[request_id] = (demand_blocks, priority, now)
        view = self._pending.get(instance_id) or self._snapshot.get(instance_id)
        if view is None:
            raise KeyError(instance_id)
        self._pending[instance_id] = view.with_dispatch(demand_blocks, priority)
        self.changed.set()
        self.expect(instance_id, now)

    # --- views for the admin API ---
    def status(self, instance_id: str, config: PolicyConfig, now: float) -> scheduler_pb2.InstanceStatus:
        """The operator's row of one instance: its latest load and the state and freeness of that same load (reports
        buffered for the fold timer are folded first, so the row never pairs a newer load with an older view)."""
        info = self.infos[instance_id]
        status = scheduler_pb2.InstanceStatus(info=info)
        self.snapshot(now)
        self._fold(now, reports=True)
        view = self._snapshot.get(instance_id)
        load = self.loads.get(instance_id)
        if load is not None:
            status.load.CopyFrom(load)
            reported = self.report_times.get(instance_id)
            if reported is not None:  # monotonic here; Unix seconds on the wire
                status.last_report_time = time.time() - max(0.0, now - reported)
        if view is None:
            status.state = common_pb2.INSTANCE_STATE_STARTING
            status.freeness = math.inf
        else:
            status.state = int(view.state)  # type: ignore[assignment]
            status.freeness = migration_freeness(view, config)
        return status

    def statuses(self, config: PolicyConfig, now: float) -> list[scheduler_pb2.InstanceStatus]:
        return [self.status(iid, config, now) for iid in sorted(self.infos)]

    def find_request(self, request_id: str) -> str | None:
        """The instance whose latest report lists the request."""
        for iid, load in self.loads.items():
            if any(r.request_id == request_id for r in load.requests):
                return iid
        return None
