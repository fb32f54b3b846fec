"""One scheduler replica: every replica watches the registry and the config; the elected leader also takes load
reports, dispatches, runs the pairing loop (migrate-out orders) and the scaling loop (instance provider).

The policy core is pure; this module is its I/O edge: etcd (election, registry, config), gRPC to llumlets and, for a
lost instance, to the frontends of its requests.

Timing (``ReplicaTiming``; README "Control plane" has the reasoning): the election lease lasts 6 s, renewed every
2 s, so a CPU or etcd stall of up to ~3.5 s costs no leadership change; a leader that *died* is replaced sooner than
its lease: followers probe its gRPC port every 0.25 s, and two refused connections in a row (the process is gone; a
stalled process still accepts connections) make them revoke its lease. An instance whose registry key vanishes is not
written off at once: it may be an etcd blip, after which it re-registers under the same id. Its requests are failed
only when its process is gone (connection refused twice) or it neither answers nor re-registers within
``instance_grace`` (10 s); meanwhile it gets no new request.

Leader work is bound to its term: every task a term starts (the loops, each migrate-out order, the delayed stop of a
drained instance, the report of a lost instance's requests) is kept and cancelled on step-down, and every order
(migrate-out, instance state, provider start/stop, failed-request report) checks that this replica still leads at the
moment it is sent, so a deposed leader acts on nothing it decided while it led.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import DecodeError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from pyllumnix.control_plane.frontend.sink import LOST_SCOPE_INSTANCE, LOST_SCOPE_LISTED, LOST_SCOPE_METADATA_KEY
from pyllumnix.control_plane.policy.config import PolicyConfig, check_scale_target
from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.freeness import dispatch_freeness
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.control_plane.policy.scaling import count_starting, plan_manual_scale
from pyllumnix.control_plane.policy.views import DispatchRequestView
from pyllumnix.control_plane.scheduler.cluster import ClusterState
from pyllumnix.control_plane.scheduler.config_wire import config_from_pb, config_to_pb
from pyllumnix.control_plane.scheduler.provider import InstanceProvider
from pyllumnix.infra import tracing
from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.config_store import ConfigStore
from pyllumnix.infra.etcd.election import Election, LeaderInfo, Leadership
from pyllumnix.infra.etcd.errors import ConfigConflictError, EtcdError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.registry import InstanceRegistry, RegistryEventType
from pyllumnix.infra.etcd.watch import EventType, WatchEvent, watch_prefix
from pyllumnix.infra.grpc_server import WILDCARD_HOSTS
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.infra.vocabulary import InstanceState, normalize_priority
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    common_pb2,
    config_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
)

log = logging.getLogger(__name__)

# A failed watch/loop body restarts after RESTART_FIRST_S, doubling per failure in a row up to RESTART_MAX_S (kept
# short: it bounds how late a watch resumes after an etcd outage); a run of RESTART_HEALTHY_S or more starts a new
# streak.
RESTART_FIRST_S = 0.2
RESTART_MAX_S = 2.0
RESTART_HEALTHY_S = 5.0


def restart_delay(failures_in_a_row: int) -> float:
    """Seconds before restarting a loop body that failed ``failures_in_a_row`` times (>= 1) in a row."""
    return min(RESTART_MAX_S, RESTART_FIRST_S * 2.0 ** min(max(0, failures_in_a_row - 1), 30))


LLUMLET_CALL_TIMEOUT_S = 2.0
MIGRATE_WAIT_TIMEOUT_S = 60.0
# A destination that refused an order (ABORTED_BY_DESTINATION) is no destination for this long, doubling per refusal in
# a row up to the cap; a commit into it clears it (see ``_pairing_loop``).
REFUSED_BACKOFF_FIRST_S = 1.0
REFUSED_BACKOFF_MAX_S = 30.0
# A lost-instance notice: the frontend's sink reads the election from etcd before taking it (its client may spend up to
# its 2.5 s retry budget when etcd is slow), so one attempt gets more than that, and a failed push (the frontend could
# not read the leader, or timed out) is retried this long: a notice lost here is resent by nobody.
LOST_NOTICE_TIMEOUT_S = 5.0
LOST_NOTICE_RETRY_S = 12.0
_NOTICE_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
FIRST_VIEW_WAIT_S = 0.3
# How often a leader's idle leader-probe loop looks whether it still leads (see ``_probe_leader``).
LEADER_SELF_PROBE_S = 1.0
"""A new leader's first dispatches wait, at most this long into its term, until every registered instance has reported
to it: before, they went to whichever llumlets' streams reopened first, busy ones too (an instance not heard from in
this term takes no request). The llumlets reopen their streams as soon as etcd names the leader, ~10-100 ms."""
FIRST_VIEW_POLL_S = 0.01
# Load messages of one instance in a row that came later than the dispatch staleness bound before the leader warns: a
# llumlet whose cadence is too slow for the cluster's does so on every idle period, a one-off stall only once.
LATE_LOAD_MESSAGES_WARN = 2
# A replica remembers instances that left the registry this long, so that one which becomes the leader meanwhile
# still watches them (it holds no load of them: they may have died with the previous leader, their requests never
# reported). Longer than a frontend's default idle timeout (30 s), after which the requests have ended anyway.
RECENTLY_VANISHED_S = 60.0
# Frontends seen in load reports are told about every lost instance for this long after they were last seen; an
# instance's requests are scanned for their frontends at most once per FRONTEND_SCAN_S (a report is a hot path).
FRONTEND_MEMORY_S = 600.0
# Sink addresses of one registered frontend that lost-instance notices go to (a frontend registers one per sink).
MAX_SINKS_PER_FRONTEND = 4
# Frontend addresses remembered from load reports, the least recently seen forgotten first: a report's addresses are
# whatever its llumlet says (a compromised one could name millions, and each is sent a notice when an instance is
# lost); registered frontends are told in any case.
MAX_REPORTED_FRONTENDS = 1024
FRONTEND_SCAN_S = 1.0


@dataclass(frozen=True)
class ReplicaTiming:
    """Failure-detection knobs of a replica (``llumnix scheduler`` flags); the defaults are reasoned in the README.

    - ``election_ttl`` / ``election_renew_every``: the leader's lease, renewed every ``election_renew_every``; it
      counts as lost locally a TTL after the last renewal was sent, so a stall of up to TTL - renew_every minus one
      renewal round trip costs nothing: 6 s renewed every 2 s tolerates a ~3 s stall of this process or of etcd
      with about a second to spare (renewing every second gave two, at ~2 ms of CPU per renewal across holder and
      etcd). A leader that dies while its host stays up is
      not waited for: see the probe below. Only a leader host that vanishes (no refusal, just silence) costs the TTL.
    - ``leader_probe_interval`` / ``leader_probe_failures``: followers try a TCP connect to the leader's gRPC port
      this often; that many refusals in a row (a port nobody listens on: the process is gone) make them revoke the
      leader's lease, so a standby leads within about a second of a SIGKILL. A stalled or busy leader still accepts
      connections (the kernel completes the handshake), so it is never deposed this way. 0 turns probing off.
    - ``instance_grace`` / ``instance_probe_interval`` / ``instance_probe_timeout``: how long a vanished instance may
      take to re-register before its requests are reported failed (see ``_watch_grace``).
    - ``resign_hold_off``: after ``ResignLeader`` the replica stays out of the election this long.
    - ``drained_stop_after``: a draining instance of the provider found empty is stopped if it still is this much
      later (it normally stops itself).
    """

    election_ttl: int = 6
    election_renew_every: float = 2.0
    leader_probe_interval: float = 0.25
    leader_probe_failures: int = 2
    instance_grace: float = 10.0
    instance_probe_interval: float = 0.5
    instance_probe_timeout: float = 1.0
    resign_hold_off: float = 3.0
    drained_stop_after: float = 5.0

    def __post_init__(self) -> None:
        if self.election_ttl < 1:
            raise ValueError(f"election_ttl must be >= 1 s, got {self.election_ttl}")
        if not 0 < self.election_renew_every < self.election_ttl:
            raise ValueError(f"election_renew_every must lie in (0, election_ttl), got {self.election_renew_every}")
        if self.leader_probe_interval < 0 or self.leader_probe_failures < 1:
            raise ValueError("leader_probe_interval must be >= 0 and leader_probe_failures >= 1")
        if self.instance_grace < 0 or self.instance_probe_interval <= 0 or self.instance_probe_timeout <= 0:
            raise ValueError("instance_grace must be >= 0, the instance probe interval and timeout > 0")
        if self.resign_hold_off < 0:
            raise ValueError(f"resign_hold_off must be >= 0, got {self.resign_hold_off}")
        if self.drained_stop_after < 0:
            raise ValueError(f"drained_stop_after must be >= 0, got {self.drained_stop_after}")


async def port_refuses(address: str, timeout: float) -> bool | None:
    """True if nothing listens at ``host:port`` (connection refused), False if a connection opens, None if unknown
    (timeout, unreachable host, bad address): only a refusal proves a process gone, silence proves nothing."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError, ValueError):
        return None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def parse_instance_info(instance_id: str, value: bytes) -> common_pb2.InstanceInfo:
    """The InstanceInfo of a registry entry; ValueError if it does not parse or names another instance."""
    info = common_pb2.InstanceInfo()
    try:
        info.ParseFromString(value)
    except DecodeError as exc:
        raise ValueError(f"not an InstanceInfo ({exc})") from None
    if info.instance_id != instance_id:
        raise ValueError(f"its instance_id {info.instance_id!r} is not the key's {instance_id!r}")
    if not info.grpc_address:
        raise ValueError("it has no grpc_address")
    return info


@dataclass
class Vanished:
    """An instance whose registry key disappeared (leader only): not dispatchable, its requests kept until it
    re-registers (same id), proves dead, or the grace runs out. ``load`` is the last one known, possibly empty: a
    request can reach an instance after its last report (a migration landing), and a leader elected meanwhile has no
    report of it at all, so whether it held requests is the frontends' to say (see ``_fail_requests``)."""

    info: common_pb2.InstanceInfo
    load: common_pb2.InstanceLoad
    since: float
    last_alive: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class NotLeaderError(Exception):
    """This replica does not lead; ``leader_address`` is where to go (empty when unknown)."""

    def __init__(self, leader_address: str) -> None:
        super().__init__(f"not the leader (leader: {leader_address or 'unknown'})")
        self.leader_address = leader_address


class SchedulingError(Exception):
    """A request the scheduler refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# What a llumlet's gRPC status means when the leader relays an admin order to it.
_NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def _order_failed(instance_id: str, call: str, exc: grpc.aio.AioRpcError) -> SchedulingError:
    """The admin caller's error for an order the leader relayed to a llumlet.

    Why: the leader answered, so its caller must not read the llumlet's transport failure (UNAVAILABLE "Socket
    closed") as "cannot reach the cluster"; a llumlet that did not answer, or could not act now (its leader-term
    check unavailable), aborts the order (ABORTED, naming the instance). A llumlet's own refusal (a status it chose)
    passes through unchanged."""
    details = exc.details() or exc.code().name
    if exc.code() in _NO_ANSWER:
        return SchedulingError(
            grpc.StatusCode.ABORTED, f"instance {instance_id} could not carry out {call} ({exc.code().name}: {details})"
        )
    return SchedulingError(exc.code(), details)


@dataclass
class LeaderView:
    replica_id: str = ""
    address: str = ""
    term: int = 0
    # The leader's election entry (to depose it once its process is known dead); None while unknown.
    entry: LeaderInfo | None = None


class SchedulerReplica:
    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        replica_id: str,
        grpc_address: str,
        *,
        provider: InstanceProvider | None = None,
        seed: int = 0,
        timing: ReplicaTiming | None = None,
        stale_after: float = 1.0,
    ) -> None:
        self.timing = timing or ReplicaTiming()
        self.client = client
        self.layout = layout
        self.replica_id = replica_id
        self.grpc_address = grpc_address
        # Where llumlets stream their load and frontends send Dispatch calls as frames
        # (``SchedulerServicer.serve_framed``); "": nowhere.
        self.report_address = ""
        self.provider = provider
        self.core = PolicyCore(PolicyConfig(), seed=seed)
        self.cluster = ClusterState(stale_after=stale_after)
        self.registry = InstanceRegistry(client, layout)
        self.election = Election(
            client,
            layout.election_prefix(),
            ttl=self.timing.election_ttl,
            renew_every=self.timing.election_renew_every,
        )
        self.config_store: ConfigStore[config_pb2.ClusterConfig] = ConfigStore(
            client, layout.config_key, config_pb2.ClusterConfig
        )
        self.scale_store: ConfigStore[config_pb2.ScaleTarget] = ConfigStore(
            client, layout.scale_target_key, config_pb2.ScaleTarget
        )
        self.config_revision = 0
        self.leadership: Leadership | None = None
        self.leader = LeaderView()
        self.leader_changed = asyncio.Event()
        self.migrations_ordered = 0
        self.migration_results: list[llumlet_pb2.MigrationResult] = []
        self.requests_failed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._leader_tasks: list[asyncio.Task[None]] = []
        # The one-off work of the current term (orders, delayed stops, lost-request reports): cancelled on step-down.
        self._term_tasks: set[asyncio.Task[None]] = set()
        # Drained instance -> its pending delayed stop (one per instance, not one per pairing round).
        self._stop_tasks: dict[str, asyncio.Task[None]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._order_in_flight: dict[str, float] = {}
        # (source, destination) -> (the order, the source's and the destination's load seq when it was sent): an order
        # the source answered with nothing started (nothing on it fits the room; the pairing cannot see that), not
        # sent again until one of the two reports a new load or the pairing makes a different order.
        self._futile_orders: dict[tuple[str, str], tuple[MigrateOrder, int, int]] = {}
        # Destination -> (no destination until this monotonic time, its back-off): it refused the latest orders.
        self._refused: dict[str, tuple[float, float]] = {}
        # The drains this term's scaling ordered (automatic or manual target): the only ones scaling may cancel. An
        # operator's drain (llmctl drain) stays; a new term knows none, so it cancels none.
        self._scaler_drains: set[str] = set()
        # The manual scale target, as stored in etcd (watched by every replica, so a new leader has it).
        self.scale_target: int | None = None
        self.vanished: dict[str, Vanished] = {}
        # Every replica: instance -> (its registry info, when it left the registry), kept RECENTLY_VANISHED_S, so a
        # replica elected meanwhile watches what may have died with the previous leader (``_watch_recently_vanished``).
        self._recently_vanished: dict[str, tuple[common_pb2.InstanceInfo, float]] = {}
        # Leader: frontend sink address -> when a load report last named it; each is told about every lost instance.
        self._frontends: dict[str, float] = {}
        # Every replica: the frontends registered in etcd (key -> sink address), told about every lost instance too,
        # so one that no load report of this term named yet (a new leader; a request just placed) is not left waiting
        # for its idle timeout.
        self.registered_frontends: dict[bytes, str] = {}
        self._frontends_scanned: dict[str, float] = {}
        self._term_began = 0.0  # ``time.monotonic()`` when this replica last won the election
        self._view_known = False  # this term has heard from every registered instance, or waited FIRST_VIEW_WAIT_S
        self._view_checked = 0.0  # when view_pending last scanned the instances
        self._config_changed = asyncio.Event()  # set by every reconfiguration: wakes the scaling loop
        self.depositions = 0
        self.pairing_rounds = 0  # rounds the pairing loop ran (it skips none while pairs are found; see there)
        self._hold_off_until = 0.0
        # (instance id, mod revision) of registry values already reported undecodable.
        self._bad_entries: set[tuple[str, int]] = set()
        # Instance -> load messages in a row that came later than the dispatch staleness bound (-1: warned already).
        self._late_load: dict[str, int] = {}
        # Hook for metrics: called with each finished migration result.
        self.on_migration: list[Callable[[llumlet_pb2.MigrationResult], None]] = []
        # Counts for /metrics: dispatch decisions by (policy, outcome), pairing decisions by (policy, outcome).
        self.dispatch_decisions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.pairing_decisions: collections.Counter[tuple[str, str]] = collections.Counter()

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.is_leader

    def _value(self) -> bytes:
        return admin_pb2.SchedulerReplica(
            replica_id=self.replica_id, grpc_address=self.grpc_address, report_address=self.report_address
        ).SerializeToString()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._forever(self._watch_registry), name="registry-watch"),
            loop.create_task(self._forever(self._watch_frontends), name="frontends-watch"),
            loop.create_task(self._forever(self._watch_config), name="config-watch"),
            loop.create_task(self._forever(self._watch_scale_target), name="scale-target-watch"),
            # The election loops restart at once, never backed off: after an etcd outage they decide the failover.
            loop.create_task(self._forever(self._observe_leader, back_off=False), name="leader-observe"),
            loop.create_task(self._forever(self._lead, back_off=False), name="campaign"),
        ]
        if self.timing.leader_probe_interval > 0:
            probe = self._forever(self._probe_leader, back_off=False)
            self._tasks.append(loop.create_task(probe, name="leader-probe"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._stop_leader_tasks()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leadership is not None:
            with contextlib.suppress(EtcdError):
                await self.leadership.resign()
        for channel in self._channels.values():
            await channel.close()

    async def _forever(self, body: Callable[[], Awaitable[None]], *, back_off: bool = True) -> None:
        """Runs a watch/loop body again after failures (etcd outages are retried inside the client). A body that keeps
        failing at once (e.g. etcd refuses a key its role was not granted) is restarted at growing intervals
        (``restart_delay``; ``back_off`` False: always after RESTART_FIRST_S), its traceback logged once per streak
        and error, one line per restart after that: before, a traceback every 0.2 s."""
        name = getattr(body, "__name__", body)
        failures = 0
        last_error = ""
        while True:
            started = time.monotonic()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except NotLeaderError:
                log.info("%s: %s stopped: no longer the leader", self.replica_id, name)
                failures = 0
            except Exception as exc:
                failures = 1 if time.monotonic() - started >= RESTART_HEALTHY_S else failures + 1
                delay = restart_delay(failures) if back_off else RESTART_FIRST_S
                error = repr(exc)
                if failures == 1 or error != last_error:
                    log.exception("%s: %s failed; restarting in %.1f s", self.replica_id, name, delay)
                else:
                    log.warning(
                        "%s: %s failed again (%d in a row): %s; restarting in %.1f s",
                        self.replica_id,
                        name,
                        failures,
                        error,
                        delay,
                    )
                last_error = error
                await asyncio.sleep(delay)
                continue
            else:
                failures = 0
            await asyncio.sleep(RESTART_FIRST_S)

    # ------------------------------------------------------------------ watches (every replica)
    async def _watch_registry(self) -> None:
        async with self.registry.watch() as events:
            async for ev in events:
                if ev.type is RegistryEventType.RESYNC:
                    entries = self._parse_entries(ev.snapshot, ev.mod_revisions)
                    for iid in [i for i in self.cluster.infos if i not in entries]:
                        self._instance_vanished(iid)
                    for info in entries.values():
                        self._instance_registered(info)
                    self.cluster.set_registry(entries)
                elif ev.type is RegistryEventType.REMOVE:
                    self._instance_vanished(ev.instance_id)
                else:
                    entry = self._parse_entries({ev.instance_id: ev.value}, {ev.instance_id: ev.revision})
                    if ev.instance_id in entry:
                        self._instance_registered(entry[ev.instance_id])

    async def _watch_frontends(self) -> None:
        async with watch_prefix(self.client, self.layout.frontends_prefix, initial_snapshot=True) as events:
            async for ev in events:
                self.frontend_event(ev)

    def frontend_event(self, ev: WatchEvent) -> None:
        """Applies one event of the frontend registry (``frontends/<id>/<sink address>`` -> the sink address)."""
        if ev.type is EventType.RESYNC:
            self.registered_frontends = {kv.key: kv.value.decode(errors="replace") for kv in ev.snapshot if kv.value}
        elif ev.kv is not None and ev.type is EventType.DELETE:
            self.registered_frontends.pop(ev.kv.key, None)
        elif ev.kv is not None and ev.kv.value:
            self.registered_frontends[ev.kv.key] = ev.kv.value.decode(errors="replace")

    def registered_sinks(self) -> list[str]:
        """The sink addresses frontends registered in etcd, at most MAX_SINKS_PER_FRONTEND per frontend id (the
        first in key order). A frontend may write only under its own id (RBAC), but there as many keys as it likes:
        uncapped, one compromised frontend could make every lost-instance notice go to thousands of addresses."""
        per_frontend: dict[bytes, int] = {}
        prefix = self.layout.frontends_prefix.encode()
        sinks: list[str] = []
        for key in sorted(self.registered_frontends):
            frontend_id = key[len(prefix) :].split(b"/", 1)[0] if key.startswith(prefix) else key
            n = per_frontend.get(frontend_id, 0)
            per_frontend[frontend_id] = n + 1
            if n < MAX_SINKS_PER_FRONTEND:
                sinks.append(self.registered_frontends[key])
            elif n == MAX_SINKS_PER_FRONTEND:
                log.warning(
                    "frontend %s registered more than %d sink addresses; only the first %d are told of lost instances",
                    frontend_id.decode(errors="replace"),
                    MAX_SINKS_PER_FRONTEND,
                    MAX_SINKS_PER_FRONTEND,
                )
        return sinks

    def _parse_entries(
        self, values: Mapping[str, bytes], revisions: Mapping[str, int]
    ) -> dict[str, common_pb2.InstanceInfo]:
        """The registry entries that parse; a bad one is logged once per key and revision and skipped (it must not
        end the watch: a restarted watch reads it again, and no instance registered after it would be seen)."""
        infos = {}
        for iid, value in values.items():
            try:
                infos[iid] = parse_instance_info(iid, value)
            except ValueError as exc:
                mark = (iid, revisions.get(iid, 0))
                if mark not in self._bad_entries:
                    self._bad_entries.add(mark)
                    log.error("registry entry %r at revision %d skipped: %s", iid, mark[1], exc)
        return infos

    def _instance_registered(self, info: common_pb2.InstanceInfo) -> None:
        iid = info.instance_id
        self._recently_vanished.pop(iid, None)
        gone = self.vanished.pop(iid, None)
        if gone is not None:
            if gone.task is not None:
                gone.task.cancel()
            if (gone.info.started_at, gone.info.grpc_address) == (info.started_at, info.grpc_address):
                log.info("instance %s re-registered after %.1fs; its requests stay", iid, time.monotonic() - gone.since)
            else:
                # Another process under the same id: whatever the old one held is gone with it.
                reason = "it restarted (a new process re-registered under its id)"
                self._spawn(self._fail_requests(iid, gone.load, reason, every_frontend=False), f"fail-requests-{iid}")
        self.cluster.upsert(info)
        self._registered(iid)

    def _registered(self, instance_id: str) -> None:
        if self.provider is not None:
            self.provider.registered(instance_id)

    def _reconfigure(self, config: PolicyConfig) -> None:
        """The policy's new config, and a wake-up for the scaling loop (a new interval counts from now, not from the
        end of a sleep of the old one: scaling turned on at an hour's interval would otherwise wait that hour)."""
        self.core.reconfigure(config)
        self._config_changed.set()

    async def _watch_config(self) -> None:
        async for message, revision in self.config_store.watch():
            try:  # a stored config outside today's ranges (older build, foreign writer) is skipped, not fatal
                config = config_from_pb(message) if message is not None else PolicyConfig()
                self._reconfigure(config)
            except ValueError as exc:
                log.error("ignoring invalid config at revision %d: %s", revision, exc)
                continue
            self.config_revision = revision if message is not None else 0
            self.cluster.set_report_interval(config.load_report_interval_ms / 1000)
            self.cluster.changed.set()  # the pairing thresholds may have changed

    async def _watch_scale_target(self) -> None:
        async for message, _ in self.scale_store.watch():
            target = message.target_instances if message is not None else 0
            self.scale_target = target if target > 0 else None

    async def _observe_leader(self) -> None:
        async for info in self.election.observe():
            if info is None:
                self.leader = LeaderView()
            else:
                replica = admin_pb2.SchedulerReplica()
                try:
                    replica.ParseFromString(info.value)
                except DecodeError:
                    log.error("election entry %r is not a SchedulerReplica; leader address unknown", info.key)
                self.leader = LeaderView(replica.replica_id, replica.grpc_address, info.create_revision, info)
            self.leader_changed.set()
            self.leader_changed = asyncio.Event()

    # ------------------------------------------------------------------ leadership
    async def _lead(self) -> None:
        hold = self._hold_off_until - time.monotonic()
        if hold > 0:
            log.info("%s stays out of the election for %.1fs (it resigned)", self.replica_id, hold)
            await asyncio.sleep(hold)
        leadership = await self.election.campaign(self._value())
        self.leadership = leadership
        self.leader = LeaderView(self.replica_id, self.grpc_address, leadership.revision)
        log.info("%s leads (term %d)", self.replica_id, leadership.revision)
        self._term_began = time.monotonic()
        self._view_known = False
        self._view_checked = 0.0
        self._watch_recently_vanished()
        loop = asyncio.get_running_loop()
        self._leader_tasks = [
            loop.create_task(self._forever(self._pairing_loop), name="pairing"),
            loop.create_task(self._forever(self._scaling_loop), name="scaling"),
        ]
        try:
            await leadership.lost.wait()
            log.warning("%s stepped down: %s", self.replica_id, leadership.lost_reason)
        finally:
            await self._stop_leader_tasks()
            self.leadership = None

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Starts one-off leader work of this term, kept so that step-down cancels it."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._term_tasks.add(task)
        task.add_done_callback(self._term_tasks.discard)
        return task

    async def _stop_leader_tasks(self) -> None:
        # A follower keeps no loads: the vanished instances' grace watches end with the term, and so does every order
        # still waiting for its answer (a migration already started runs on at its source, which owns it).
        tasks = (
            self._leader_tasks + [v.task for v in self.vanished.values() if v.task is not None] + list(self._term_tasks)
        )
        self.vanished.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._leader_tasks = []
        self._term_tasks.clear()
        self._stop_tasks.clear()
        self._order_in_flight.clear()
        self._futile_orders.clear()
        self._refused.clear()
        self._scaler_drains.clear()
        self.cluster.clear_overrides(time.monotonic())

    async def resign_leader(self) -> tuple[int, float]:
        """Steps down now (the election key is deleted, a standby takes over at once) and stays out of the election
        for ``timing.resign_hold_off``; returns the term given up and the hold-off."""
        self.require_leader()
        leadership = self.leadership
        assert leadership is not None
        hold_off = self.timing.resign_hold_off
        self._hold_off_until = time.monotonic() + hold_off
        log.info("%s resigns leadership (term %d) on request", self.replica_id, leadership.revision)
        await leadership.resign()
        return leadership.revision, hold_off

    async def _probe_leader(self) -> None:
        """Follower side: deposes a leader whose process is gone (its port refuses connections), see ReplicaTiming."""
        refused = 0
        probed: LeaderInfo | None = None
        while True:
            # A leader has no one to probe: it looks again each LEADER_SELF_PROBE_S in case it was deposed (it woke 4
            # times a second for nothing, most of an idle leader's wake-ups).
            every = self.timing.leader_probe_interval
            await asyncio.sleep(max(every, LEADER_SELF_PROBE_S) if self.is_leader else every)
            view = self.leader
            if (
                view.entry is None
                or view.address.rpartition(":")[0] in WILDCARD_HOSTS  # names no host: a refusal there proves nothing
                or view.replica_id == self.replica_id
                or self.is_leader
            ):
                refused = 0
                continue
            if view.entry != probed:
                probed, refused = view.entry, 0
            result = await port_refuses(view.address, max(self.timing.leader_probe_interval, 0.5))
            refused = refused + 1 if result is True else 0
            if refused >= self.timing.leader_probe_failures and self.leader.entry == probed:
                log.warning(
                    "%s: leader %s at %s refused %d connections in a row: its process is gone; revoking its lease",
                    self.replica_id,
                    view.replica_id,
                    view.address,
                    refused,
                )
                with contextlib.suppress(EtcdError):
                    if await self.election.depose(probed):
                        self.depositions += 1
                refused = 0

    def _order_metadata(self) -> tuple[tuple[str, str], ...]:
        """This leader's term for an order's call metadata (llumlets refuse orders of older terms)."""
        leadership = self.leadership
        if leadership is None or not leadership.is_leader:
            raise NotLeaderError(self.leader.address if self.leader.replica_id != self.replica_id else "")
        return term_metadata(leadership.revision)

    def _carry_migration_knobs(self, request: llumlet_pb2.MigrateOutRequest) -> None:
        """Puts the cluster config's migration knobs on an order: llumlets apply them (0 there: their own flags), so
        ``llmctl config set migration.*`` changes live migrations."""
        config = self.core.config
        request.last_stage_max_blocks = config.last_stage_max_blocks
        request.max_stages = config.max_stages
        request.transfer_timeout_ms = config.transfer_timeout_ms
        request.pending_timeout_ms = config.pending_timeout_ms

    def require_leader(self) -> None:
        if not self.is_leader:
            raise NotLeaderError(self.leader.address if self.leader.replica_id != self.replica_id else "")

    # ------------------------------------------------------------------ load and dispatch
    def report(self, load: common_pb2.InstanceLoad, now: float | None = None) -> bool:
        """Takes a llumlet's load (``now``: its arrival, ``time.monotonic()``, if the caller read the clock already)."""
        if now is None:
            now = time.monotonic()
        iid = load.instance_id
        cluster = self.cluster
        last = cluster.report_times.get(iid)
        bound = cluster.silence_bound(iid)  # the cadence this message was due at (before this load changes it)
        if cluster.report(load, now):
            if now - self._frontends_scanned.get(iid, float("-inf")) >= FRONTEND_SCAN_S:
                self._frontends_scanned[iid] = now
                self._note_frontends(load, now)
            # The cadence check only where it can act: a late message, or an instance with late ones on record.
            if last is not None and (now - last > bound or iid in self._late_load):
                self._check_cadence(iid, last, now, bound)
            return True
        gone = self.vanished.get(iid)
        if gone is not None:  # not registered, but alive: keep its latest request list
            gone.load, gone.last_alive = load, now
        return False

    def keepalive(self, instance_id: str, seq: int, now: float | None = None) -> bool:
        """A llumlet's "load unchanged since ``seq``" (see ``ClusterState.keepalive``); a vanished one is alive."""
        if now is None:
            now = time.monotonic()
        last = self.cluster.report_times.get(instance_id)
        if self.cluster.keepalive(instance_id, seq, now):
            self._check_cadence(instance_id, last, now, self.cluster.silence_bound(instance_id))
            return True
        gone = self.vanished.get(instance_id)
        if gone is not None:
            gone.last_alive = now
        return False

    def _check_cadence(self, instance_id: str, last: float | None, now: float, bound: float) -> None:
        """Warns once per instance whose load messages keep coming later than ``bound`` (``dispatch_stale_after``, or
        ``quiet_stale_after`` while its load is quiet: ``ClusterState.silence_bound``, made of the slower of the
        cluster's ``load_report_interval_ms`` and the period the llumlet registered): a llumlet keeping alive slower
        than the bound (stalled, or an older one that registered no period) looks silent, so gets no new request."""
        late = self._late_load.get(instance_id, 0)
        if last is None or late < 0:
            return
        gap = now - last
        if gap <= bound:
            if late:
                del self._late_load[instance_id]
            return
        if late + 1 < LATE_LOAD_MESSAGES_WARN:
            self._late_load[instance_id] = late + 1
            return
        self._late_load[instance_id] = -1
        log.warning(
            "instance %s: %d load reports/keep-alives in a row came more than %.2fs apart (the last after %.2fs): "
            "that is the silence after which an instance gets no new request (from the slower of the cluster's "
            "load_report_interval_ms = %d ms and the llumlet's registered --load-interval-ms), so it is skipped for "
            "dispatch while alive: the llumlet stalls (CPU starved?), or is too old to register its period",
            instance_id,
            LATE_LOAD_MESSAGES_WARN,
            bound,
            gap,
            self.core.config.load_report_interval_ms,
        )

    def view_pending(self) -> bool:
        """Whether a young term still waits for registered instances' first reports (see FIRST_VIEW_WAIT_S); cheap
        once known, since Dispatch asks it every time."""
        if self._view_known:
            return False
        if not self.is_leader:
            return False  # a deposed replica answers NotLeader at once (the frontend goes to the new leader)
        now = time.monotonic()
        if now - self._view_checked < FIRST_VIEW_POLL_S:
            return True  # many waiters: one scan of the instances per poll period, not one per waiter
        self._view_checked = now
        began, cluster = self._term_began, self.cluster
        if now - began >= FIRST_VIEW_WAIT_S or all(cluster.report_times.get(i, -1.0) >= began for i in cluster.infos):
            cluster.fold(now)  # every instance heard from: into the snapshot now, not at the next fold timer
            self._view_known = True
        return not self._view_known

    async def wait_for_first_view(self, limit: float) -> None:
        """Until :meth:`view_pending` is over, or ``limit`` seconds (the caller's deadline)."""
        deadline = time.monotonic() + limit
        # A poll, not an event: the condition spans every registered instance and the clock, and lasts at most the
        # first FIRST_VIEW_WAIT_S of a term (``cluster.changed`` is cleared by the pairing loop, so no waiter here).
        while self.view_pending() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(FIRST_VIEW_POLL_S)

    def dispatch(self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int) -> tuple[str, str]:
        self.require_leader()
        if not request_id:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        if num_prompt_tokens <= 0 or max_tokens <= 0:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, "num_prompt_tokens and max_tokens must be > 0")
        request = DispatchRequestView(request_id, normalize_priority(priority), num_prompt_tokens, max_tokens)
        now = time.monotonic()
        snapshot = self.cluster.snapshot(now)
        choice = self.core.dispatch(snapshot, request)
        self.dispatch_decisions[self.core.config.dispatch_policy, "refused" if choice is None else "placed"] += 1
        if choice is None:
            if not any(view.accepts_requests for view in snapshot):
                # Nothing to be full: no instance known, or none active and reporting (e.g. every lease expired while
                # etcd was paused). That is unavailability (retry later, or the frontend's bypass), not overload.
                raise SchedulingError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no instance is available to take requests ({len(snapshot)} known, none active and reporting)",
                )
            raise SchedulingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"no instance can take requests ({len(snapshot)} known, all full)"
            )
        view = snapshot.get(choice)
        assert view is not None
        if tracing.enabled():  # the decision in the request's trace (the frontend's call carried its context)
            tracing.start_span(
                "dispatch",
                None,
                {
                    "llumnix.request_id": request_id,
                    "llumnix.dispatch.policy": str(self.core.config.dispatch_policy),
                    "llumnix.instance_id": choice,
                    "llumnix.freeness": dispatch_freeness(view, self.core.config),
                    "llumnix.instances": len(snapshot),
                },
            ).end()
        self.cluster.record_dispatch(choice, request_id, request.demand_blocks(view.block_size), request.priority, now)
        return choice, self.cluster.infos[choice].grpc_address

    # ------------------------------------------------------------------ llumlet calls
    def _llumlet(self, instance_id: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        info = self.cluster.infos.get(instance_id)
        if info is None:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"unknown instance {instance_id}")
        channel = self._channels.get(info.grpc_address)
        if channel is None:
            channel = self._channels[info.grpc_address] = open_channel(info.grpc_address, peer="llumlet")
        return llumlet_pb2_grpc.LlumletServiceStub(channel)

    async def _pairing_loop(self) -> None:
        """A pairing round every ``pairing_interval_ms`` while there is something to pair. A round that finds no pair
        waits for the cluster to change first (``ClusterState.changed``: a fold, a dispatch, an override, a config, an
        order's end): pairing is a pure function of the snapshot and the config, so an unchanged cluster pairs nothing
        again, and an idle leader woke 10 times a second for nothing (~0.15 ms of CPU a wake-up here). Marking a
        silent instance unhealthy (done inside ``snapshot()``) only removes candidates, so it needs no wake-up.

        So does a round whose every order is one its source answered with nothing started, while neither instance's
        load changed since (``_futile_orders``): the source would answer the same (the pure pairing cannot tell that
        none of the source's requests fits the room), and re-sending it cost a MigrateOut, a selection under the
        source's engine lock and a round every period for as long as the pair lasted."""
        while True:
            config = self.core.config
            await asyncio.sleep(config.pairing_interval_ms / 1000)
            now = time.monotonic()
            snapshot = self.cluster.snapshot(now)
            changed = self.cluster.changed
            changed.clear()  # whatever changes after this snapshot wakes the wait below
            avoid = self._refusing(now)
            orders = self.core.pair(snapshot, avoid)
            self.pairing_rounds += 1
            futile = 0
            for order in orders:
                seqs = self._load_seqs(order)
                if self._known_futile(order, seqs):
                    self.pairing_decisions[config.pairing_policy, "nothing_fits"] += 1
                    futile += 1
                    continue
                if now - self._order_in_flight.get(order.source, -1e9) < MIGRATE_WAIT_TIMEOUT_S:
                    self.pairing_decisions[config.pairing_policy, "source_busy"] += 1
                    continue
                self.pairing_decisions[config.pairing_policy, "ordered"] += 1
                self._order_in_flight[order.source] = now
                self._spawn(self._order_migration(order, seqs), f"migrate-out-{order.source}")
            self._stop_drained()
            if futile == len(orders):  # no pair, or only orders that would be answered with nothing again
                # ... until a refusing destination's back-off ends, when it may be paired again
                until = min((self._refused[d][0] for d in avoid), default=None)
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see the scaling loop (3.11's wait_for)
                    async with asyncio.timeout(None if until is None else max(0.0, until - now)):
                        await changed.wait()

    def _refusing(self, now: float) -> frozenset[str]:
        """Destinations in their refusal back-off now (forgets those no longer registered)."""
        refused = self._refused
        for iid in [i for i in refused if i not in self.cluster.infos]:
            del refused[iid]
        return frozenset(iid for iid, (until, _) in refused.items() if until > now)

    def _note_outcome(self, destination: str, results: Sequence[llumlet_pb2.MigrationResult]) -> None:
        """A refusal puts ``destination`` in back-off (doubling); a commit into it ends its back-off."""
        outcomes = {r.outcome for r in results}
        if llumlet_pb2.MIGRATION_OUTCOME_COMMITTED in outcomes:
            self._refused.pop(destination, None)
        elif llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION in outcomes:
            _, backoff = self._refused.get(destination, (0.0, REFUSED_BACKOFF_FIRST_S / 2))
            backoff = min(REFUSED_BACKOFF_MAX_S, 2 * backoff)
            self._refused[destination] = (time.monotonic() + backoff, backoff)
            log.info("migration destination %s refused; no destination for %.0f s", destination, backoff)

    def _load_seqs(self, order: MigrateOrder) -> tuple[int, int]:
        """The seq of the latest load taken from the order's source and destination (-1: none): a new seq is a changed
        load (keep-alives confirm the seq they name)."""
        loads = self.cluster.loads
        src, dst = loads.get(order.source), loads.get(order.destination)
        return (-1 if src is None else src.seq), (-1 if dst is None else dst.seq)

    def _known_futile(self, order: MigrateOrder, seqs: tuple[int, int]) -> bool:
        """True if ``order`` was answered with nothing started and neither instance's load changed since; forgets a
        remembered answer that no longer holds (a new load, another order for the pair, an instance gone)."""
        futile = self._futile_orders
        if not futile:
            return False
        for key in [k for k in futile if k[0] not in self.cluster.infos or k[1] not in self.cluster.infos]:
            del futile[key]
        key = (order.source, order.destination)
        known = futile.get(key)
        if known is None:
            return False
        if known == (order, *seqs):
            return True
        del futile[key]
        return False

    async def _order_migration(self, order: MigrateOrder, seqs: tuple[int, int] = (-1, -1)) -> None:
        try:
            dst = self.cluster.infos.get(order.destination)
            if dst is None:
                return
            request = llumlet_pb2.MigrateOutRequest(
                destination_instance_id=order.destination,
                destination_grpc_address=dst.grpc_address,
                selection=int(order.selection),  # type: ignore[arg-type]
                max_requests=1,
                wait=True,
                max_blocks=order.max_blocks,  # the destination's room: the source picks only what fits
            )
            self._carry_migration_knobs(request)
            stub = self._llumlet(order.source)
            metadata = self._order_metadata()  # raises once this replica no longer leads: no order is sent then
            self.migrations_ordered += 1
            reply = await stub.MigrateOut(request, timeout=MIGRATE_WAIT_TIMEOUT_S, metadata=metadata)
            if not reply.results and not reply.migration_ids:
                # Nothing on the source fits (or nothing movable is left): the same order would be answered alike.
                self._futile_orders[order.source, order.destination] = (order, *seqs)
            for result in reply.results:
                self._record_migration(result)
            self._note_outcome(order.destination, reply.results)
        except (grpc.aio.AioRpcError, SchedulingError, NotLeaderError) as exc:
            log.debug("migrate-out order %s -> %s failed: %s", order.source, order.destination, exc)
        finally:
            self._order_in_flight.pop(order.source, None)
            self.cluster.changed.set()  # its source may take another order

    def _record_migration(self, result: llumlet_pb2.MigrationResult) -> None:
        self.migration_results.append(result)
        del self.migration_results[:-1000]
        for hook in self.on_migration:
            hook(result)

    def _stop_drained(self) -> None:
        """Draining instances that are empty stop themselves; stop provider-owned ones that linger."""
        if self.provider is None:
            return
        for iid, load in self.cluster.loads.items():
            if (
                load.state == common_pb2.INSTANCE_STATE_DRAINING
                and not load.requests
                and not load.migrating_in
                and iid not in self._stop_tasks
            ):
                self._stop_tasks[iid] = self._spawn(self._stop_later(iid), f"stop-drained-{iid}")

    async def _stop_later(self, instance_id: str) -> None:
        try:
            await asyncio.sleep(self.timing.drained_stop_after)
            load = self.cluster.loads.get(instance_id)
            if load is None or load.state != common_pb2.INSTANCE_STATE_DRAINING or load.requests:
                return
            if self.cluster.overrides.get(instance_id, InstanceState.DRAINING) != InstanceState.DRAINING:
                return  # undrained meanwhile (its report does not say so yet): it may already hold new requests
            if not self.is_leader:
                log.info("not stopping drained instance %s: no longer the leader", instance_id)
                return
            assert self.provider is not None
            await self.provider.stop_instance(instance_id)
        finally:
            if self._stop_tasks.get(instance_id) is asyncio.current_task():
                del self._stop_tasks[instance_id]

    async def _scaling_loop(self) -> None:
        began = time.monotonic()
        interval = self.core.config.scaling_interval_ms / 1000
        next_pass = began + interval
        while True:
            self._config_changed.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the event's result when a cancellation
            # (the term's end) lands as it is set, so the loop ran on and step-down waited for it forever (CI).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_pass - time.monotonic())):
                    await self._config_changed.wait()
            if self._config_changed.is_set():
                # Only a new interval moves the next pass (to one interval from now): other writes, however frequent,
                # must not keep postponing it (a tuning script would otherwise starve scaling and `llmctl scale`).
                new_interval = self.core.config.scaling_interval_ms / 1000
                if new_interval != interval:
                    interval, next_pass = new_interval, time.monotonic() + new_interval
                if time.monotonic() < next_pass:
                    continue
            next_pass = time.monotonic() + interval
            config = self.core.config
            if self.provider is None:
                continue
            if self.scale_target is not None:
                await self._converge_to_target()
                continue
            if not config.enable_scaling:
                continue
            if time.monotonic() - began < config.scaling_warmup_ms / 1000:
                continue  # a fresh term's load is still settling (the artifact's warm-up); a manual target is not held
            snapshot = self.cluster.snapshot(time.monotonic())
            # An instance in its vanished grace period (lease lost in a blip, probably coming back) counts as starting:
            # a blip must not make the scaler start a replacement it will have to drain again.
            # So does one registered that has not reported its load yet (it is in no snapshot): counted once.
            starting = count_starting(snapshot, self.cluster.infos, [*self.provider.starting(), *self.vanished])
            self._scaler_drains &= self.cluster.infos.keys()
            decision = self.core.scale(snapshot, starting, self._scaler_drains)
            for iid in decision.cancel_drain:
                if await self._scaling_order(iid, InstanceState.ACTIVE):
                    self._scaler_drains.discard(iid)
            for iid in decision.drain:
                if await self._scaling_order(iid, InstanceState.DRAINING):
                    self._scaler_drains.add(iid)
            if decision.start:
                log.info("scaling up by %d (cluster freeness %.1f)", decision.start, decision.cluster_freeness)
                await self._start_instances(decision.start)

    async def _start_instances(self, count: int) -> None:
        """A provider that cannot start instances (Ray head gone, placement impossible) is logged and retried at the
        next scaling pass, never the end of the scaling loop."""
        assert self.provider is not None
        if not self.is_leader:
            log.info("not starting %d instance(s): no longer the leader", count)
            return
        try:
            await self.provider.start_instances(count)
        except Exception as exc:
            log.warning("the instance provider could not start %d instance(s): %s", count, exc)

    async def _converge_to_target(self) -> None:
        """Manual scale: start or drain instances until the active count meets the target."""
        assert self.provider is not None and self.scale_target is not None
        snapshot = self.cluster.snapshot(time.monotonic())
        # A vanished instance (lease lost in a blip, probably coming back) counts as starting, as for the autoscaler:
        # else a blip started an extra instance, and one was drained again once the vanished one re-registered.
        starting = [*self.provider.starting(), *self.vanished]
        plan = plan_manual_scale(snapshot, self._registered_states(), starting, self.scale_target)
        if plan.start:
            await self._start_instances(plan.start)
        for iid in plan.drain:
            if await self._scaling_order(iid, InstanceState.DRAINING):
                self._scaler_drains.add(iid)

    async def _scaling_order(self, instance_id: str, state: InstanceState) -> bool:
        """One state order of a scaling pass; True if the llumlet took it. A llumlet's refusal (e.g. it cannot prove
        the new leader's term in its etcd right after a failover) is logged and left to the next pass: it must not end
        the pass for the other instances, nor restart the scaling loop (which would restart its warm-up). A lost term
        still ends the pass."""
        try:
            await self.set_instance_state(instance_id, state)
        except SchedulingError as exc:
            log.warning("scaling: could not set %s %s (next pass retries): %s", instance_id, state.name, exc)
            return False
        return True

    def _registered_states(self) -> dict[str, InstanceState | None]:
        """Each registered instance's state as this leader knows it: the state it ordered and the llumlet has not
        confirmed yet, else the last report's, else None (no report yet: it is registered, so it counts)."""
        states: dict[str, InstanceState | None] = {}
        for iid in self.cluster.infos:
            load = self.cluster.loads.get(iid)
            override = self.cluster.overrides.get(iid)
            states[iid] = override if override is not None else None if load is None else InstanceState.of(load.state)
        return states

    # ------------------------------------------------------------------ lost instances
    def _instance_vanished(self, instance_id: str) -> None:
        """The registry key is gone: no more dispatch there at once; the leader watches it through the grace, whatever
        its last load listed (or none at all), and every replica remembers it in case it leads before that ends."""
        info = self.cluster.infos.get(instance_id)
        load = self.cluster.remove(instance_id)
        self._late_load.pop(instance_id, None)  # a process registering under this id again is judged afresh
        self._frontends_scanned.pop(instance_id, None)
        log.warning("instance %s left the registry", instance_id)
        if info is None:
            return
        drained = load is not None and load.state == common_pb2.INSTANCE_STATE_DRAINING
        if drained and load is not None and not load.requests and not load.migrating_in:
            log.info("instance %s left the registry drained and empty (it stops itself then)", instance_id)
            return  # draining refuses new requests and migrations: it held nothing, nobody is told
        now = time.monotonic()
        for iid in [i for i, (_, since) in self._recently_vanished.items() if now - since > RECENTLY_VANISHED_S]:
            del self._recently_vanished[iid]
        self._recently_vanished[instance_id] = (info, now)
        if self.is_leader:
            self._watch_vanished(info, load, now)

    def _watch_vanished(
        self, info: common_pb2.InstanceInfo, load: common_pb2.InstanceLoad | None, since: float
    ) -> None:
        iid = info.instance_id
        if iid in self.vanished:
            return
        if load is not None:
            self._note_frontends(load, time.monotonic())
        gone = Vanished(info, load if load is not None else common_pb2.InstanceLoad(instance_id=iid), since)
        self.vanished[iid] = gone
        gone.task = asyncio.get_running_loop().create_task(self._watch_grace(iid, gone), name="grace")

    def _watch_recently_vanished(self) -> None:
        """A new leader watches the instances that left the registry shortly before (attack9 B1b): one may have died
        with the previous leader, which never reported its requests; the probe decides as for any vanished instance
        (a live one that re-registers keeps its requests; a lost one already reported is reported again, harmlessly:
        its frontends ended those requests)."""
        now = time.monotonic()
        # The grace counts from the departure, but this leader has probed nothing yet: it gets at least the probe
        # rounds the old leader's rule needs to see a sign of life (review9 F6: one timed-out probe was the verdict).
        window = self.timing.instance_probe_timeout + 2 * self.timing.instance_probe_interval
        for iid, (info, since) in list(self._recently_vanished.items()):
            if now - since > RECENTLY_VANISHED_S:
                del self._recently_vanished[iid]
            elif iid not in self.cluster.infos:
                log.info("instance %s left the registry %.1fs before this term; watching it", iid, now - since)
                self._watch_vanished(info, None, max(since, now - self.timing.instance_grace + window))

    def _note_frontends(self, load: common_pb2.InstanceLoad, now: float) -> None:
        """Remembers the frontends of ``load``'s requests (see ``_fail_requests``), at most
        ``MAX_REPORTED_FRONTENDS``, the least recently seen forgotten first (the dict keeps them in that order)."""
        frontends = self._frontends
        for r in load.requests:
            address = r.frontend_address
            if address:
                frontends.pop(address, None)
                frontends[address] = now
                if len(frontends) > MAX_REPORTED_FRONTENDS:
                    del frontends[next(iter(frontends))]

    async def _watch_grace(self, instance_id: str, gone: Vanished) -> None:
        """Waits for a vanished instance to re-register (``_instance_registered`` cancels this), probing it meanwhile.

        Its requests are reported failed when its port refuses connections twice in a row (the process is gone), or
        when the grace ends with no re-registration and no sign of life in the last probe rounds. An instance that
        still answers (or still reports load) is alive and keeps its requests: they reach their frontends directly.
        """
        timing = self.timing
        deadline = gone.since + timing.instance_grace
        refused = 0
        warned = False
        while True:
            alive = await self._probe_instance(gone)
            if alive:
                gone.last_alive = time.monotonic()
                refused = 0
            elif await port_refuses(gone.info.grpc_address, timing.instance_probe_timeout) is True:
                refused += 1
            else:
                refused = 0
            now = time.monotonic()
            if refused >= 2:
                reason = "its process is gone (connection refused)"
                break
            if now >= deadline:
                recent = timing.instance_probe_timeout + 2 * timing.instance_probe_interval
                if gone.last_alive is None or now - gone.last_alive > recent:
                    reason = f"no answer and no re-registration within {timing.instance_grace:g}s"
                    break
                if not warned:
                    warned = True
                    log.warning("instance %s answers but has not re-registered; keeping its requests", instance_id)
                deadline = now + timing.instance_grace
            await asyncio.sleep(timing.instance_probe_interval)
        if self.vanished.get(instance_id) is gone:
            del self.vanished[instance_id]
            await self._fail_requests(instance_id, gone.load, reason)

    async def _probe_instance(self, gone: Vanished) -> bool:
        """True if the instance answers GetLoad within the probe timeout (its fresh request list is kept)."""
        address = gone.info.grpc_address
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, peer="llumlet")
        try:
            reply = await llumlet_pb2_grpc.LlumletServiceStub(channel).GetLoad(
                llumlet_pb2.GetLoadRequest(), timeout=self.timing.instance_probe_timeout
            )
        except grpc.aio.AioRpcError:
            return False
        if reply.load.instance_id != gone.info.instance_id:
            return False  # another instance on that address now: the one watched is gone
        self._note_frontends(reply.load, time.monotonic())
        gone.load = reply.load
        return True

    async def _fail_requests(
        self, instance_id: str, load: common_pb2.InstanceLoad, reason: str, *, every_frontend: bool = True
    ) -> None:
        """Tells the frontends that an instance is lost (leader only): each frontend its last load listed requests of
        gets them as failed, and (``every_frontend``) every frontend this leader knows, registered in etcd or seen in
        any report within FRONTEND_MEMORY_S, gets the notice, listing nothing if need be. A frontend ends every
        request it has held by the instance, listed or not: only it knows them all (one migrated in after the last
        report is in no snapshot; a leader elected after the instance died has none). Not every frontend for an id
        that a new process took over already (``_instance_registered``, or during the ``learning`` wait): there a
        request just placed on the new process is held by the same id, so only the listed ones' frontends are told,
        and the notice is marked listed-only (the sink then ends only those)."""
        learning = self._term_began + self.cluster.quiet_stale_after - time.monotonic()
        if every_frontend and learning > 0:
            # A new leader knows unregistered frontends (no --etcd, or an older release) from load reports only:
            # within this window every live instance (a quiet one too) has sent it one, naming the frontends of the
            # requests it holds.
            await asyncio.sleep(learning)
            if instance_id in self.cluster.infos:
                # A new process registered under the id during the wait (``_watch_grace`` had let go of it, so
                # ``_instance_registered`` found nothing to cancel): requests placed on it are held by the same id.
                every_frontend = False
        if not self.is_leader:
            return
        now = time.monotonic()
        for current in self.cluster.loads.values():
            self._note_frontends(current, now)
        for address, seen in list(self._frontends.items()):
            if now - seen > FRONTEND_MEMORY_S:
                del self._frontends[address]
        known = [*self._frontends, *self.registered_sinks()]
        log.warning(
            "instance %s is lost: %s; failing its %d listed request(s), telling %s",
            instance_id,
            reason,
            len(load.requests),
            f"{len(set(known))} known frontend(s)" if every_frontend else "their frontends",
        )
        by_frontend: dict[str, list[common_pb2.RequestOutput]] = {}
        for r in load.requests:
            if not r.frontend_address:
                continue
            by_frontend.setdefault(r.frontend_address, []).append(
                common_pb2.RequestOutput(
                    request_id=r.request_id,
                    first_token_index=r.num_output_tokens,
                    finished=True,
                    finish_reason=common_pb2.FINISH_REASON_ERROR,
                    error=f"instance {instance_id} was lost ({reason}); the request failed",
                    instance_id=instance_id,
                )
            )
        if every_frontend:
            for address in known:
                by_frontend.setdefault(address, [])
        # The sink ends every request the id holds unless told the notice is about the listed ones only.
        scope = ((LOST_SCOPE_METADATA_KEY, LOST_SCOPE_INSTANCE if every_frontend else LOST_SCOPE_LISTED),)

        async def first_attempt(
            address: str, outputs: list[common_pb2.RequestOutput]
        ) -> tuple[str, frontend_pb2.PushOutputsRequest] | None:
            """One push; returns the notice to retry, if any. Every frontend at once: one that stalls (or a black-holed
            address some frontend registered) must not hold the others up by its deadline, as a loop did."""
            try:
                self.require_leader()  # it may have stepped down meanwhile: the next leader reports them
            except NotLeaderError:
                log.info("not reporting instance %s's requests to %s: no longer the leader", instance_id, address)
                return None
            notice = frontend_pb2.PushOutputsRequest(instance_id=instance_id, outputs=outputs)
            try:
                await self._push_notice(address, notice, scope)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _NOTICE_RETRY_CODES:
                    return address, notice
                log.warning("could not tell frontend %s about lost requests: %s", address, exc.code().name)
            return None

        outcomes = await asyncio.gather(*(first_attempt(a, outputs) for a, outputs in by_frontend.items()))
        retry = [outcome for outcome in outcomes if outcome is not None]
        if retry:
            await asyncio.gather(*(self._retry_notice(address, notice, scope) for address, notice in retry))

    async def _push_notice(
        self, address: str, notice: frontend_pb2.PushOutputsRequest, scope: tuple[tuple[str, str], ...]
    ) -> None:
        async with open_channel(address, peer="frontend") as channel:
            await frontend_pb2_grpc.OutputSinkServiceStub(channel).PushOutputs(
                notice, timeout=LOST_NOTICE_TIMEOUT_S, metadata=scope
            )
        self.requests_failed += len(notice.outputs)

    async def _retry_notice(
        self, address: str, notice: frontend_pb2.PushOutputsRequest, scope: tuple[tuple[str, str], ...]
    ) -> None:
        """Resends a notice the frontend could not take (UNAVAILABLE: it could not read the leader from etcd now;
        DEADLINE_EXCEEDED), while this replica leads, for up to LOST_NOTICE_RETRY_S."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(LOST_NOTICE_RETRY_S),
                wait=wait_exponential(multiplier=0.2, max=2.0),
                retry=retry_if_exception(
                    lambda exc: isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _NOTICE_RETRY_CODES
                ),
                reraise=True,
            ):
                with attempt:
                    self.require_leader()
                    await self._push_notice(address, notice, scope)
        except NotLeaderError:
            log.info("not reporting instance %s's requests to %s: no longer the leader", notice.instance_id, address)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not tell frontend %s about lost requests: %s", address, exc.code().name)

    # ------------------------------------------------------------------ admin operations (leader)
    def known(self, instance_id: str) -> None:
        if instance_id not in self.cluster.infos:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"unknown instance {instance_id}")

    async def set_instance_state(self, instance_id: str, state: InstanceState) -> None:
        self.require_leader()
        self.known(instance_id)
        try:
            await self._llumlet(instance_id).SetInstanceState(
                llumlet_pb2.SetInstanceStateRequest(state=int(state)),  # type: ignore[arg-type]
                timeout=LLUMLET_CALL_TIMEOUT_S,
                metadata=self._order_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise _order_failed(instance_id, "SetInstanceState", exc) from exc
        self.cluster.set_override(instance_id, state, time.monotonic())

    async def migrate_request(self, request_id: str, destination: str) -> llumlet_pb2.MigrationResult:
        self.require_leader()
        self.known(destination)
        source = self.cluster.find_request(request_id)
        if source is None:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"unknown request {request_id}")
        if source == destination:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, f"request {request_id} is already on {source}")
        dst_load = self.cluster.loads.get(destination)
        if dst_load is not None and dst_load.state in (
            common_pb2.INSTANCE_STATE_CORDONED,
            common_pb2.INSTANCE_STATE_DRAINING,
        ):
            raise SchedulingError(grpc.StatusCode.FAILED_PRECONDITION, f"{destination} takes no requests")
        request = llumlet_pb2.MigrateOutRequest(
            destination_instance_id=destination,
            destination_grpc_address=self.cluster.infos[destination].grpc_address,
            request_id=request_id,
            wait=True,
        )
        self._carry_migration_knobs(request)
        try:
            reply = await self._llumlet(source).MigrateOut(
                request, timeout=MIGRATE_WAIT_TIMEOUT_S, metadata=self._order_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise _order_failed(source, "MigrateOut", exc) from exc
        if not reply.results:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"request {request_id} left {source} before migrating")
        result: llumlet_pb2.MigrationResult = reply.results[0]
        self._record_migration(result)
        return result

    async def scale_to(self, target: int) -> tuple[int, int]:
        """Stores the manual target in etcd (a later leader keeps it) and starts converging to it. 0 clears it: the
        autoscaler (if enabled) decides again (before, 0 was refused, so after any manual scale the autoscaler stayed
        off until someone deleted the etcd key by hand)."""
        self.require_leader()
        if self.provider is None:
            raise SchedulingError(grpc.StatusCode.FAILED_PRECONDITION, "this scheduler has no instance provider")
        if target != 0:
            try:
                check_scale_target(target, self.core.config, self.provider.max_instances)
            except ValueError as exc:
                raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        try:
            await self.scale_store.put(config_pb2.ScaleTarget(target_instances=target))
        except EtcdError as exc:
            raise SchedulingError(grpc.StatusCode.UNAVAILABLE, f"cannot store the scale target: {exc}") from exc
        self.require_leader()  # the term may have ended during the write: the next leader converges then
        self.scale_target = target or None  # as the watch reads the key (0: no target)
        if self.scale_target is not None:
            await self._converge_to_target()
        return len(self.cluster.infos), target

    async def set_config(
        self, config: config_pb2.ClusterConfig, paths: list[str], expected_revision: int
    ) -> tuple[config_pb2.ClusterConfig, int]:
        self.require_leader()
        merged = config_to_pb(self.core.config)
        if paths:
            mask = field_mask_pb2.FieldMask(paths=paths)
            if not mask.IsValidForDescriptor(config_pb2.ClusterConfig.DESCRIPTOR):
                raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown config path in {paths}")
            mask.MergeMessage(config, merged, replace_message_field=True, replace_repeated_field=True)
        else:
            merged = config
        try:
            validated = config_from_pb(merged)
        except ValueError as exc:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        stored = config_to_pb(validated)
        try:
            revision = await self.config_store.put(stored, expected_revision=expected_revision or None)
        except ConfigConflictError as exc:
            raise SchedulingError(grpc.StatusCode.ABORTED, str(exc)) from exc
        self._reconfigure(validated)
        self.config_revision = revision
        return stored, revision
