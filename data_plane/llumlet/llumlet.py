"""The llumlet's core: one engine, its real-time step loop, and everything that touches the engine between steps.

Every engine access holds ``engine_lock``; the step loop holds it for a whole step (compute, the modelled or measured
duration, and handing the step's outputs to the pusher) and releases it between steps. So a handler that takes the
lock (add, abort, a migration stage) always runs between two steps, after the previous step's outputs are queued, and
asyncio's FIFO lock keeps the loop from starving them. Two exceptions: while a sim step writes a large KV payload in a
worker thread (its only part off the event loop), an add goes in without the lock: it only enqueues, and the write
touches nothing but the blocks the step's requests already hold; and while a sim step's modelled duration passes, the
lock's ``light`` users (a migration's reservations, copies' reads and install) go in, as they would beside a GPU
engine's step (see ``EngineLock``).

Every request that ends here ends with a final output to its frontend: finished by the engine, aborted (its message
says by whom), failed by an engine error, or failed because the instance shuts down. The one exception is a frontend
that could not be reached for the whole push budget (see ``output_push``): its requests are aborted here to free
their blocks, and the pusher queues their final ERROR outputs in case it comes back.

Each request's outputs carry the capability token its frontend granted this instance (``EngineRequest.capability``,
or the one a migration handed over); before a migration commits, the source asks the frontend to hand the request
over (``hand_over``) and sends the destination's token with the commit.

A request that produced no output for ``heartbeat_s`` (queued behind others, preempted) gets a token-less, unfinished
"still here" output: a frontend ends a request that it hears nothing of for its idle timeout (30 s by default), and a
request may legitimately wait longer than that in a loaded instance's queue. The heartbeat carries the holder's
capability like any output, so only the current holder can keep a request alive; a request suspended for a
migration's last stage gets none (its holder is about to change).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pyllumnix.data_plane.engine.base import (
    Engine,
    Finish,
    MigrationState,
    Phase,
    RequestSpec,
    StepResult,
    TokenOutput,
    UnknownRequestError,
)
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet import convert
from pyllumnix.data_plane.llumlet.metrics import InstanceMetrics
from pyllumnix.data_plane.llumlet.output_push import OutputPusher, PushSettings, QueuedOutput
from pyllumnix.infra import tracing, wire
from pyllumnix.infra.security.runtime import open_channel
from pyllumnix.infra.vocabulary import InstanceState, MigrationOutcome
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2, frontend_pb2_grpc, llumlet_pb2

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _stock_sim(engine: Engine) -> SimEngine | None:
    """The engine, if it is a sim engine whose ``step`` is the stock one (so stepping it in parts is the same step);
    None for another engine, or a sim engine whose ``step`` a subclass or a test replaced (that ``step`` runs)."""
    if isinstance(engine, SimEngine) and type(engine).step is SimEngine.step and "step" not in vars(engine):
        return engine
    return None


class InstanceNotAcceptingError(Exception):
    """The instance is draining or cordoned (FAILED_PRECONDITION)."""


class QueueFullError(Exception):
    """The instance's waiting queue is at its limit (RESOURCE_EXHAUSTED: try another instance, or later)."""


# Seconds a stopping llumlet waits for its last outputs (the shutdown errors) to reach their frontends.
STOP_DRAIN_S = 2.0
# Seconds ``stop`` waits for the step in progress to end.
STOP_STEP_WAIT_S = 5.0
# Default seconds of silence after which a held request gets a heartbeat output: a third of the frontend's default
# idle timeout (30 s), so two heartbeats may be lost or late before the frontend gives up.
HEARTBEAT_S = 10.0
# A sim step whose tokens hold at least this many bytes of KV writes its payload in a worker thread, off the event
# loop. The hand-off costs ~90 us CPU (asyncio.to_thread, measured on the 2-core dev host), ~9 % of a step's ~1 ms CPU
# budget, so small steps (decode steps at serve's 8 KiB per token) stay inline; 8 MiB took ~0.3 ms CPU / 0.7 ms wall
# into reused arrays and several times that into fresh memory. In-order fills are now records (payload.py), so only
# fills into arrays (blocks a migration brought in, out-of-order fills) still write bytes; the hop stays for those, at
# ~90 us on the rare step this large (a prompt of 1,024 tokens at 8 KiB).
THREAD_PAYLOAD_BYTES = 8 << 20


# A step's outputs that nobody waits on at once (decode tokens: no first token, no finish) may wait for the next
# steps' and go out in one message with them (``PushSettings.stream_interval`` steps per message: each message costs
# llumlet and frontend more CPU than its tokens). The last step of the group releases them; if a step is late (a
# migration stage or a handler holds the engine), a timer of this many times the step's modelled duration after the
# latest step does (the slack over one step is for the step's own overhead beyond its modelled duration: a timer that
# rang first would only cost the grouping).
HOLD_STEPS = 1.25


DOWNTIME_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 500.0, 1000.0, math.inf)


def _empty_migration_stats() -> common_pb2.MigrationStats:
    return common_pb2.MigrationStats(
        downtime_bucket_le_ms=list(DOWNTIME_BUCKETS_MS), downtime_bucket_counts=[0] * len(DOWNTIME_BUCKETS_MS)
    )


@dataclass(frozen=True, slots=True)
class LoadVersion:
    """A llumlet's load version in two parts: ``rest`` moves with every change to its load but the requests'
    output-token counters and running requests' block growth; ``growth`` moves with that growth only. A report loop
    that holds growth back for a while can then skip building a snapshot when only ``growth`` moved."""

    rest: tuple[Any, ...]
    growth: int


class EngineLock(asyncio.Lock):
    """The engine lock: its release sets ``changed``. Every change to the engine happens under it, so a load reader
    that waits on ``changed`` hears of each (see ``Llumlet.load_changed``).

    ``async with lock`` also waits for ``settled``: a sim step's state is final once computed, and only its modelled
    duration is left to pass before its outputs go out; the loop clears ``settled`` for that time and leaves the lock
    free. What must not overtake those outputs (an abort, a migration's suspend or release, a step) waits, as before;
    ``light()`` is for what may go meanwhile because it neither reads nor changes the pending outputs: a destination
    reserving, filling and installing a migrated request, a source reading a request's state or blocks. So migration
    handshakes no longer wait out the other engine's step in progress, as on a GPU engine whose step runs on the
    device while its process serves them; a measured step (vLLM, or a sim step someone replaced) keeps the lock.

    A light section must not await: the step's outputs and after-step hooks run without the lock when its duration
    has passed, and rely on the event loop, not the lock, to keep them apart from a light section. (Some readers take
    no lock at all, e.g. ``load_pb``: they see the state right after a step is computed, as before.)"""

    def __init__(self, changed: asyncio.Event) -> None:
        super().__init__()
        self._changed = changed
        self.settled = asyncio.Event()
        self.settled.set()

    async def acquire(self) -> Literal[True]:
        while True:
            await self.settled.wait()
            await super().acquire()
            if self.settled.is_set():
                return True
            super().release()  # a step was computed meanwhile: its outputs go out first

    def release(self) -> None:
        super().release()
        self._changed.set()

    @contextlib.asynccontextmanager
    async def light(self) -> AsyncIterator[None]:
        """Exclusive access that need not wait for a computed sim step's outputs (see the class)."""
        await super().acquire()
        try:
            yield
        finally:
            self.release()


@dataclass
class LlumletStats:
    steps: int = 0
    step_errors: int = 0
    requests_added: int = 0
    requests_finished: int = 0
    migrations_in: int = 0
    migrations_out: int = 0
    last_step_duration: float = 0.0
    # Where the engine loop's time goes (seconds, cumulative): the engine's modelled or measured step durations, the
    # wall time of the steps (duration, overshoot, emitting outputs, after-step hooks) and the wall time between two
    # steps while work was waiting (handlers and migration stages holding the engine lock). The live demonstration
    # compares them with the simulator, which steps back to back.
    step_modelled_s: float = 0.0
    step_wall_s: float = 0.0
    between_steps_s: float = 0.0
    # Sum of squares of each step's overhead (wall time beyond the modelled duration, the wait before it included):
    # with the sums above, the spread of the per-step overhead.
    overhead_sq_s2: float = 0.0
    migration: common_pb2.MigrationStats = field(default_factory=_empty_migration_stats)
    # Called after ``record_migration`` (the llumlet's ``load_changed``: the counts are part of its load).
    on_record: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def record_migration(self, result: llumlet_pb2.MigrationResult) -> None:
        """Counts an outgoing migration by outcome; committed ones feed the downtime histogram."""
        self._record(result)
        if self.on_record is not None:
            self.on_record()

    def _record(self, result: llumlet_pb2.MigrationResult) -> None:
        stats = self.migration
        outcome = wire.outcome_from_pb(result.outcome).counted_as
        if outcome is MigrationOutcome.COMMITTED:
            stats.committed += 1
            stats.downtime_sum_ms += result.downtime_ms
            for i, bound in enumerate(DOWNTIME_BUCKETS_MS):
                if result.downtime_ms <= bound:
                    stats.downtime_bucket_counts[i] += 1
        elif outcome is MigrationOutcome.ABORTED_BY_DESTINATION:
            stats.aborted_by_destination += 1
        else:
            stats.aborted_by_source += 1


@dataclass
class RequestOwner:
    frontend_address: str
    num_prompt_tokens: int
    # The frontend's capability token for this instance holding the request (empty on an insecure cluster).
    capability: str = ""
    # Called with each output before it is pushed (tests and metrics hooks).
    listeners: list[Callable[[TokenOutput], None]] = field(default_factory=list)
    # ``time.monotonic()`` of the latest output (or heartbeat) pushed for the request, and the index its next token
    # will have (what a heartbeat names).
    last_output: float = field(default_factory=time.monotonic)
    next_index: int = 0
    # The request's trace context here (its AddRequest's, or its migration commit's): the parent of the spans this
    # instance makes for it (first token, finish, migration). None when tracing is off or the caller sent none.
    trace: Any = None


class Llumlet:
    """Runs ``engine`` in real time. ``step_in_thread`` runs each step in a worker thread (vLLM, whose step blocks);
    the simulated engine steps inline (its step computes and returns the modelled duration) but for a large KV
    payload write, which goes to a worker thread (see ``_sim_step``).

    ``max_waiting``: ``add_request`` refuses (QueueFullError) while this many requests wait (None: no limit), so a
    burst queues at the frontend or goes elsewhere instead of piling up behind one instance. ``heartbeat_s``: silence
    after which a held request gets a "still here" output (None: never; see the module docstring).
    """

    def __init__(
        self,
        engine: Engine,
        instance_id: str,
        *,
        step_in_thread: bool = False,
        push: PushSettings | None = None,
        max_waiting: int | None = None,
        heartbeat_s: float | None = HEARTBEAT_S,
    ) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        if heartbeat_s is not None and not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be positive (or None), got {heartbeat_s}")
        self.heartbeat_s = heartbeat_s
        self.heartbeats_sent = 0
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.engine = engine
        self.instance_id = instance_id
        self.max_waiting = max_waiting
        # Set whenever ``load_version().rest`` may have moved: every release of the engine lock (every step, add,
        # abort, migration stage), a lock-free add, a state change, ``set_migrating``, a migration recorded. A load
        # reader clears it before reading the version and may sleep on it (instead of polling) while nothing changes.
        # Also set after steps whose only change was block growth (every step releases the lock).
        self.load_changed = asyncio.Event()
        self.engine_lock = EngineLock(self.load_changed)
        # Set whenever ``state`` is assigned (what waits for a drain sleeps on it instead of polling).
        self.state_changed = asyncio.Event()
        self._state = InstanceState.ACTIVE
        self.owners: dict[str, RequestOwner] = {}
        self.stats = LlumletStats(on_record=self.load_changed.set)
        self.pusher = OutputPusher(instance_id, self._abort_orphans, self._frontend_unreachable, push)
        self._step_in_thread = step_in_thread
        self._thread_busy = False  # a step (or a sim step's payload write) runs in a worker thread
        # A sim step's payload write runs in a worker thread: ``add_request`` may add without the lock meanwhile.
        self._adds_open = False
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._load_seq = 0
        # Bumped when the requests' owners change (their frontend addresses are part of the load); see load_version.
        self._owners_version = 0
        self._migrating_in = False
        self._migrating_out = False
        # Aborts that arrived while the request was suspended for a migration's last stage; the coordinator settles
        # them (abort here if the migration fails, forward to the destination if it committed).
        self.pending_aborts: dict[str, float] = {}
        # Why a pending abort was asked for, when not by the client (its final output carries this message).
        self.abort_reasons: dict[str, str] = {}
        # Called after every step, before the next one, once its outputs are handed on.
        self.after_step: list[Callable[[], None]] = []
        # Opens a channel to a frontend's output sink (for ``hand_over``): mutual TLS when the process is configured.
        self.sink_channel: Callable[[str], Any] = functools.partial(open_channel, peer="frontend")
        # Per-instance vLLM-named metrics (``llumnix llumlet`` sets them up; None: not recorded).
        self.metrics: InstanceMetrics | None = None
        self._step_started = 0.0  # wall clock of the current step's start (the metrics' queue time)

    @property
    def state(self) -> InstanceState:
        return self._state

    @state.setter
    def state(self, value: InstanceState) -> None:
        self._state = value
        self.state_changed.set()
        self.load_changed.set()

    # --- lifecycle ---
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine-{self.instance_id}")
        self.start_heartbeats()

    def start_heartbeats(self) -> None:
        """Starts the heartbeat task (``start`` does; tests of a llumlet that does not step call it alone)."""
        if self.heartbeat_s is not None and self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(self.heartbeat_s), name=f"heartbeat-{self.instance_id}"
            )

    async def stop(self, drain_timeout: float = STOP_DRAIN_S) -> None:
        """Stops stepping; requests still here end with an ERROR output (sent for up to ``drain_timeout``)."""
        clean = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        if self._task is not None:
            # Let the loop leave between two steps: a step running in a worker thread cannot be interrupted, and the
            # engine must not be touched while it runs.
            self._stopping = True
            self._work.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_STEP_WAIT_S)
            except TimeoutError:
                clean = not self._thread_busy
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if clean:
            async with self.engine_lock:
                self._fail_all(f"instance {self.instance_id} is shutting down")
        await self.pusher.drain(drain_timeout)
        await self.pusher.close()
        st = self.stats
        log.info(
            "engine loop of %s: %d steps, modelled %.3f s, stepped %.3f s, between steps %.3f s, overhead sq %.6f s2",
            self.instance_id, st.steps, st.step_modelled_s, st.step_wall_s, st.between_steps_s, st.overhead_sq_s2,
        )  # fmt: skip

    def wake(self) -> None:
        self._work.set()

    # --- serving ---
    async def add_request(self, request: common_pb2.EngineRequest, admit: Callable[[], None] | None = None) -> None:
        """``admit`` runs right before the add, after any wait for the lock; what it raises refuses the request (the
        AddRequest handler checks there that its caller is still waiting: ``late_adds``)."""
        if self.state != InstanceState.ACTIVE:
            raise InstanceNotAcceptingError(f"instance {self.instance_id} is {self.state.name}")
        spec = convert.spec_from_pb(request)
        if self._adds_open:
            # A sim step is writing its payload in a worker thread and holds the lock until it ends (seconds, for a
            # large write into arrays); adding only enqueues, which that write never reads, so it need not wait.
            if admit is not None:
                admit()
            self._add(request, spec)
        else:
            async with self.engine_lock:
                if admit is not None:
                    admit()
                self._add(request, spec)
        self.wake()

    def _add(self, request: common_pb2.EngineRequest, spec: RequestSpec) -> None:
        """Adds the request to the engine and takes ownership (no await: atomic for the event loop)."""
        if self.max_waiting is not None:
            waiting = self.engine.load().num_waiting
            if waiting >= self.max_waiting:
                raise QueueFullError(
                    f"instance {self.instance_id} has {waiting} requests waiting, its limit is {self.max_waiting}"
                )
        self.engine.add_request(spec, time.time())
        self.owners[spec.request_id] = RequestOwner(
            request.frontend_address,
            len(spec.prompt_token_ids),
            capability=request.capability,
            trace=tracing.current_context(),
        )
        self.stats.requests_added += 1
        self._owners_version += 1
        self.load_changed.set()  # (also on the lock-free path, which releases no lock)
        if self.metrics is not None:
            self.metrics.added(spec.request_id, len(spec.prompt_token_ids), spec.arrival_time or None)

    async def abort_request(
        self, request_id: str, reason: str = "", *, incarnation: RequestOwner | None = None
    ) -> None:
        """Aborts a request; its frontend gets a final ABORT output saying why (``reason``, default: by its client).

        A request suspended for a migration's last stage is only marked; the coordinator settles it. ``incarnation``:
        abort only while that owner entry holds the id (checked under the lock, so no later request reusing the id is
        hit); UnknownRequestError otherwise.
        """
        async with self.engine_lock:
            if incarnation is not None and self.owners.get(request_id) is not incarnation:
                raise UnknownRequestError(
                    f"request {request_id}: the incarnation named has ended on {self.instance_id}"
                )
            if self.engine.phase(request_id) is Phase.SUSPENDED:
                self.pending_aborts[request_id] = time.time()
                if reason:
                    self.abort_reasons[request_id] = reason
                return
            out = self.engine.abort_request(request_id)
            message = self.abort_reasons.pop(request_id, "") or reason or "aborted by its client"
            self._emit([dataclasses.replace(out, error=f"{message} (on instance {self.instance_id})")])

    def adopt(self, state: MigrationState, frontend_address: str, capability: str = "") -> None:
        """Takes ownership of a request migrated in (call under engine_lock or its ``light()``, right after
        commit_incoming; the request id must not be owned here: see the coordinator's ``_install``);
        ``capability``: the token the source obtained for this instance with ``hand_over``."""
        self.owners[state.spec.request_id] = RequestOwner(
            frontend_address,
            len(state.spec.prompt_token_ids),
            capability=capability,
            next_index=len(state.output_token_ids),
            trace=tracing.current_context(),  # the commit's: the request's trace continues here
        )
        self._owners_version += 1
        if self.metrics is not None:
            self.metrics.adopted(
                state.spec.request_id,
                len(state.spec.prompt_token_ids),
                len(state.output_token_ids),
                state.spec.arrival_time,
                state.first_token_time,
            )

    async def hand_over(self, request_id: str, destination_instance_id: str, *, timeout: float = 2.0) -> str:
        """Asks the request's frontend for ``destination_instance_id``'s capability token (before the commit).

        Empty when this instance holds no token for it (an insecure cluster). Raises grpc.aio.AioRpcError when the
        frontend refuses or cannot be reached: the migration must then not commit (the destination could not push).
        """
        owner = self.owners.get(request_id)
        if owner is None or not owner.capability or not owner.frontend_address:
            return ""
        channel = self.sink_channel(owner.frontend_address)
        try:
            reply = await frontend_pb2_grpc.OutputSinkServiceStub(channel).HandOver(
                frontend_pb2.HandOverRequest(
                    request_id=request_id, capability=owner.capability, new_instance_id=destination_instance_id
                ),
                timeout=timeout,
            )
        finally:
            await channel.close()
        return str(reply.capability)

    async def take_back(self, request_id: str, destination_instance_id: str, *, timeout: float = 2.0) -> None:
        """After a commit to ``destination_instance_id`` that got no answer: asks the request's frontend to leave the
        request here (its TakeBack). Returns when it stays here; raises grpc.aio.AioRpcError otherwise, e.g.
        FAILED_PRECONDITION when the destination already pushed for it (it runs there: drop this copy)."""
        owner = self.owners.get(request_id)
        if owner is None or not owner.frontend_address:
            return  # no frontend to ask (a request of nobody's): it stays, as before
        channel = self.sink_channel(owner.frontend_address)
        try:
            await frontend_pb2_grpc.OutputSinkServiceStub(channel).TakeBack(
                frontend_pb2.TakeBackRequest(
                    request_id=request_id,
                    capability=owner.capability,
                    from_instance_id=destination_instance_id,
                    instance_id=self.instance_id,
                ),
                timeout=timeout,
            )
        finally:
            await channel.close()

    def _abort_orphans(self, orphans: dict[str, str]) -> None:
        """The frontend does not know these requests: abort them (no output: nobody waits for it) to free blocks.

        ``orphans`` maps each id to the capability of the output the frontend refused. Only the request that still
        holds that capability is aborted: a client may reuse an id right after dropping it, and the new request with
        that id (another grant, another token) must not be killed by the late outputs of the old one."""
        asyncio.get_running_loop().create_task(self._abort_silently(list(orphans), {}, orphans))

    def _frontend_unreachable(self, address: str, notified: list[str]) -> None:
        """The pusher gave up on ``address`` after its whole budget and queued final ERROR outputs for ``notified``;
        every request this instance still holds for that frontend is aborted (blocks freed), and those not yet
        notified get their final ERROR output queued too, in case the frontend comes back."""
        told = set(notified)
        doomed = {rid for rid, owner in self.owners.items() if owner.frontend_address == address} | told
        message = f"instance {self.instance_id} could not deliver outputs to frontend {address}; request aborted"
        notices = {rid: message for rid in doomed if rid not in told}
        asyncio.get_running_loop().create_task(self._abort_silently(sorted(doomed), notices))

    async def _abort_silently(
        self, request_ids: list[str], notices: dict[str, str], capabilities: dict[str, str] | None = None
    ) -> None:
        """Aborts requests without the usual ABORT output; ``notices`` (id -> message) get a final ERROR output.
        ``capabilities`` (id -> token): abort an id only while its holder here has that token (that incarnation)."""
        for rid in request_ids:
            async with self.engine_lock:
                owner = self.owners.get(rid)
                if capabilities is not None and owner is not None and owner.capability != capabilities.get(rid, ""):
                    continue  # another incarnation of the id (a client reused it): not the one refused
                try:
                    if self.engine.phase(rid) is Phase.SUSPENDED:  # its migration coordinator settles it
                        self.pending_aborts[rid] = time.time()
                        if rid in notices:
                            self.abort_reasons[rid] = notices[rid]
                        continue
                    out = self.engine.abort_request(rid)
                except UnknownRequestError:
                    self.owners.pop(rid, None)
                    continue
                self.owners.pop(rid, None)
                if rid in notices and owner is not None and owner.frontend_address:
                    final = TokenOutput(
                        rid, (), out.first_index, finished=True, finish=Finish.ERROR, error=notices[rid]
                    )
                    self.pusher.submit(
                        owner.frontend_address,
                        [convert.queued_output(final, owner.num_prompt_tokens, owner.capability)],
                    )

    # --- load ---
    def load_version(self) -> LoadVersion | None:
        """Equal values mean ``load_pb`` would report the same load but for its seq, its timestamp and the requests'
        output-token counters (what a load report's change key ignores), so a 20 Hz report loop can skip building and
        comparing a snapshot that cannot have changed; an equal ``rest`` means every change since was running
        requests' block growth (``reporter.only_grew``). None: the engine cannot tell (build and compare every time)."""
        engine = self.engine.load_version()
        if engine is None:
            return None
        version, growth = engine
        m = self.stats.migration
        rest = (
            version,
            self._owners_version,
            self.state,
            self._migrating_in,
            self._migrating_out,
            self.stats.migrations_in,
            self.stats.migrations_out,
            m.committed,
            m.aborted_by_source,
            m.aborted_by_destination,
        )
        return LoadVersion(rest, growth)

    def load_pb(self) -> common_pb2.InstanceLoad:
        if self.abort_reasons:  # rare: drop the reasons of requests that left (e.g. migrated out) meanwhile
            here = set(self.engine.request_ids())
            for rid in [r for r in self.abort_reasons if r not in here and r not in self.pending_aborts]:
                del self.abort_reasons[rid]
        self._load_seq += 1
        owners = self.owners

        def frontend_of(request_id: str) -> str | None:
            owner = owners.get(request_id)
            return owner.frontend_address if owner is not None else None

        pb = convert.load_to_pb(self.engine.load(), self.instance_id, self._load_seq, time.time(), frontend_of)
        pb.state = wire.state_to_pb(self.state)
        pb.migrating_in = self._migrating_in
        pb.migrating_out = self._migrating_out
        pb.total_migrations_in = self.stats.migrations_in
        pb.total_migrations_out = self.stats.migrations_out
        pb.migration_stats.CopyFrom(self.stats.migration)
        return pb

    def set_migrating(self, *, incoming: bool | None = None, outgoing: bool | None = None) -> None:
        if incoming is not None:
            self._migrating_in = incoming
        if outgoing is not None:
            self._migrating_out = outgoing
        self.load_changed.set()

    # --- outputs ---
    def _emit(self, outputs: list[TokenOutput], hold_s: float = 0.0) -> None:
        """Hands outputs to the pusher, one batch per frontend. ``hold_s`` > 0 (an engine step's): a frontend's batch
        with no first token, finish or error may wait that long for the next step's (see ``OutputPusher.submit``)."""
        if self.metrics is not None:
            self.metrics.outputs(outputs, self._step_started)
        by_frontend: dict[str, list[QueuedOutput]] = {}
        urgent: set[str] = set()
        now = time.monotonic()
        for out in outputs:
            owner = self.owners.get(out.request_id)
            if owner is None:
                continue
            if out.finished or out.error or (out.first_index == 0 and out.token_ids):
                urgent.add(owner.frontend_address)
            owner.last_output = now
            owner.next_index = max(owner.next_index, out.first_index + len(out.token_ids))
            if owner.trace is not None:
                self._trace_output(owner.trace, out)
            for listener in owner.listeners:
                listener(out)
            by_frontend.setdefault(owner.frontend_address, []).append(
                convert.queued_output(out, owner.num_prompt_tokens, owner.capability)
            )
            if out.finished:
                del self.owners[out.request_id]
                self.stats.requests_finished += 1
        for address, batch in by_frontend.items():
            if address:
                self.pusher.submit(address, batch, 0.0 if address in urgent else hold_s)

    def _trace_output(self, parent: Any, out: TokenOutput) -> None:
        """The request's first-token and finish spans (instants), children of its context on this instance."""
        attributes = {"llumnix.request_id": out.request_id, "llumnix.instance_id": self.instance_id}
        if out.first_index == 0 and out.token_ids:
            tracing.start_span("first_token", parent, attributes).end()
        if out.finished:
            finish = out.finish.name.lower() if out.finish is not None else ""
            tokens = out.first_index + len(out.token_ids)
            s = tracing.start_span("finish", parent, {**attributes, "llumnix.finish": finish, "llumnix.tokens": tokens})
            if out.error:
                s.set_attribute("llumnix.error", out.error)
            s.end()

    def emit(self, outputs: list[TokenOutput]) -> None:
        """Hands outputs produced outside a step (e.g. a migration abort) to the frontends."""
        self._emit(outputs)

    # --- heartbeats ---
    async def send_heartbeats(self, silent_for: float) -> int:
        """Queues a heartbeat for every held request that got no output for ``silent_for`` seconds (none for one
        suspended for a migration's last stage); returns how many."""
        now = time.monotonic()
        by_frontend: dict[str, list[QueuedOutput]] = {}
        async with self.engine_lock:  # a consistent view of the phases: no step or migration stage meanwhile
            for rid, owner in self.owners.items():
                if not owner.frontend_address or now - owner.last_output < silent_for:
                    continue
                try:
                    if self.engine.phase(rid) not in (Phase.WAITING, Phase.RUNNING):
                        continue
                except UnknownRequestError:
                    continue
                owner.last_output = now
                beat = TokenOutput(rid, (), owner.next_index)
                by_frontend.setdefault(owner.frontend_address, []).append(
                    convert.queued_output(beat, owner.num_prompt_tokens, owner.capability)
                )
        for address, batch in by_frontend.items():
            self.pusher.submit(address, batch)
        sent = sum(len(batch) for batch in by_frontend.values())
        self.heartbeats_sent += sent
        return sent

    async def _heartbeat_loop(self, every: float) -> None:
        """Looks for silent requests a few times per period, so a heartbeat is at most a quarter period late."""
        while True:
            await asyncio.sleep(every / 4)
            try:
                await self.send_heartbeats(every)
            except Exception:  # a heartbeat must never take the llumlet down
                log.exception("heartbeats on %s failed", self.instance_id)

    # --- the loop ---
    async def _loop(self) -> None:
        last_end: float | None = None  # end of the previous step while there was work since
        while not self._stopping:
            if not self.engine.has_work():
                last_end = None
                self._work.clear()
                await self._work.wait()
                continue
            lock = self.engine_lock
            async with lock:
                t0 = time.monotonic()
                waited = 0.0 if last_end is None else t0 - last_end
                self.stats.between_steps_s += waited
                self._step_started = time.time()
                modelled = False
                try:
                    if self._step_in_thread:
                        result = await self._in_thread(self.engine.step, time.time())
                    elif (sim := _stock_sim(self.engine)) is not None:
                        result = await self._sim_step(sim)
                        modelled = True
                    else:
                        result = self.engine.step(time.time())
                except Exception as exc:  # an engine bug must not take the llumlet down
                    log.exception("engine step failed on %s", self.instance_id)
                    self.stats.step_errors += 1
                    self._fail_all(f"engine step failed: {exc!r}")
                    continue
                remaining = result.duration - (time.monotonic() - t0)
                if modelled and remaining > 0:
                    lock.settled.clear()  # the duration passes below, with the lock free for light users
                else:
                    if remaining > 0:
                        await asyncio.sleep(remaining)
                    last_end = self._step_done(result, t0, waited)
            if not lock.settled.is_set():
                try:
                    await asyncio.sleep(remaining)
                finally:
                    try:
                        last_end = self._step_done(result, t0, waited)
                    except Exception:
                        task = asyncio.current_task()
                        if task is None or not task.cancelling():
                            raise
                        # stopping (cancelled during the sleep): the error must not replace the cancellation
                        log.exception("handing on the last step's outputs failed on %s", self.instance_id)
                    finally:
                        lock.settled.set()
                        self.load_changed.set()
            # let handlers waiting on the lock run between steps
            await asyncio.sleep(0)

    def _step_done(self, result: StepResult, t0: float, waited: float) -> float:
        """Hands the step's outputs on and runs the after-step hooks once its duration has passed; returns the time
        it ended (no await: nothing runs between the outputs and the hooks)."""
        self.stats.steps += 1
        self.stats.last_step_duration = time.monotonic() - t0
        self._emit(result.outputs, result.duration * HOLD_STEPS)
        for hook in self.after_step:
            hook()
        end = time.monotonic()
        self.stats.step_modelled_s += result.duration
        self.stats.step_wall_s += end - t0
        self.stats.overhead_sq_s2 += (waited + end - t0 - result.duration) ** 2
        return end

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs ``fn`` in a worker thread; ``stop`` must not touch the engine while one runs (see ``stop``)."""
        self._thread_busy = True
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._thread_busy = False

    async def _sim_step(self, engine: SimEngine) -> StepResult:
        """A sim step, its payload write in a worker thread when large: planning and finishing change the engine's
        state and stay here (so a reader on the loop, e.g. a load report, never meets a half-changed engine), while
        the write, which only fills blocks the step's requests hold, would otherwise hold the event loop for as long
        as it takes (seconds for a long prefill at a 7B model's 512 KiB per token when every fill wrote bytes: missed
        deadlines, lost leases). The store now records in-order fills, so the hop mostly carries microseconds of work;
        it stays for the fills written as arrays, and costs ~0.1 ms only on steps of 8 MiB of KV or more."""
        plan = engine.plan_step(time.time())
        if plan.payload_bytes >= THREAD_PAYLOAD_BYTES:
            self._adds_open = True
            try:
                await self._in_thread(engine.write_step_payload, plan)
            finally:
                self._adds_open = False
        else:
            engine.write_step_payload(plan)
        return engine.finish_step(plan)

    def _fail_all(self, message: str) -> None:
        """Ends every request with an ERROR output (call under engine_lock). A request suspended for a migration is
        left to its coordinator, with the message kept for the abort it will settle."""
        outputs: list[TokenOutput] = []
        for rid in self.engine.request_ids():
            with contextlib.suppress(UnknownRequestError):
                if self.engine.phase(rid) is Phase.SUSPENDED:
                    self.pending_aborts[rid] = time.time()
                    self.abort_reasons[rid] = message
                    continue
                aborted = self.engine.abort_request(rid)
                outputs.append(
                    TokenOutput(rid, (), aborted.first_index, finished=True, finish=Finish.ERROR, error=message)
                )
        self._emit(outputs)
