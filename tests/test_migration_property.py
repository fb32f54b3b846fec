"""Property test of the migration machines on two real sim engines: whatever interleaving of engine steps
(progress, preemptions, finishing), client aborts, refusals, transfer failures, lost answers and a reaping
destination, the migration ends with the request in exactly one engine (or finished / aborted by its client, never
lost), no reservation left, both machines' slots free, and after draining every block free on both engines."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from pyllumnix.data_plane.engine.base import MigrationState, Phase, RequestSpec, Sampling, UnknownRequestError
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.data_plane.llumlet.migration import events as ev
from pyllumnix.data_plane.llumlet.migration import perform
from pyllumnix.data_plane.llumlet.migration.destination import DestinationMigration, DestinationState
from pyllumnix.data_plane.llumlet.migration.plan import MigrationLimits
from pyllumnix.data_plane.llumlet.migration.source import SourceMigration

RID = "r"
NOISE = ("none",) * 6 + ("step_src", "step_src", "burst", "step_dst", "client_abort", "client_abort", "reap")
FAULTS = ("ok",) * 6 + ("fail", "lost")


@dataclass
class World:
    """Two engines, the two machines of one migration and what the harness saw happen to the request."""

    src: SimEngine
    dst: SimEngine
    source: SourceMigration
    destination: DestinationMigration
    now: float = 0.0
    state: MigrationState | None = None
    stage_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)
    deferred_abort: bool = False
    client_aborted: bool = False
    finished: bool = False

    def step(self, engine: SimEngine) -> None:
        if engine.has_work():
            result = engine.step(self.now)
            self.now += result.duration
            self.finished |= any(o.request_id == RID and o.finished for o in result.outputs)

    def call(self, event: ev.DestinationEvent) -> ev.Accept | ev.Refuse | None:
        """One call into the destination machine, its actions performed on the destination engine."""
        answer: ev.Accept | ev.Refuse | None = None
        pending = self.destination.step(event)
        while pending:
            action = pending.pop(0)
            if isinstance(action, ev.ReserveBlocks):
                pending += self.destination.step(perform.reserve(self.dst, action.stage, action.count))
            elif isinstance(action, ev.Install):
                assert self.state is not None
                pending += self.destination.step(perform.install(self.dst, self.state, action.block_ids, self.now))
            elif isinstance(action, ev.Free) and action.block_ids:
                self.dst.free_reserved(action.block_ids)
            elif isinstance(action, (ev.Accept, ev.Refuse)):
                answer = action
        return answer


def perform_action(world: World, action: ev.SourceAction, fault: str) -> ev.SourceEvent | None:
    """The harness's driver: performs one source action, with the drawn fault injected where one applies."""
    src = world.src
    if isinstance(action, ev.Observe):
        return perform.observe(src, RID)
    if isinstance(action, ev.Suspend):
        event, world.state = perform.suspend(src, RID)
        return event
    if isinstance(action, ev.Reserve):
        stage = action.stage
        if fault == "fail":  # refused before the destination saw it (unreachable, no slot at the load balancer...)
            return ev.Refused("pre-allocate: UNAVAILABLE")
        offer = ev.Offered(stage.index, stage.count)
        if stage.index == 0:
            state = world.state or perform.peek(src, RID)
            if isinstance(state, ev.SourceFailed):
                return state
            offer = ev.Offered(0, stage.count, True, perform.admission_problem(world.dst, state))
        answer = world.call(offer)
        if fault == "lost" or not isinstance(answer, ev.Accept):  # "lost": reserved there, the answer timed out
            return ev.Refused("pre-allocate: no answer" if fault == "lost" else "pre-allocate: refused")
        world.stage_ids[stage.index] = answer.block_ids
        return ev.Reserved(stage.index, len(answer.block_ids))
    if isinstance(action, ev.Copy):
        stage = action.stage
        if fault == "fail":
            return ev.CopyFailed("data plane: peer closed")
        landed = ev.StageLanded(
            stage.index, world.stage_ids.get(stage.index, ()), "crc mismatch" if fault == "lost" else ""
        )
        answer = world.call(landed)
        return ev.Copied(stage.index) if isinstance(answer, ev.Accept) else ev.CopyFailed("transfer: refused")
    if isinstance(action, ev.Flush):
        return ev.Flushed()
    if isinstance(action, ev.Commit):
        if fault == "fail":  # lost before it reached the destination
            return ev.CommitFailed("commit: UNAVAILABLE")
        ids = tuple(b for _, s in sorted(world.stage_ids.items()) for b in s)
        answer = world.call(ev.CommitAsked(ids))
        return ev.Committed() if isinstance(answer, ev.Accept) else ev.CommitFailed("commit: refused")
    if isinstance(action, ev.TellAbort):
        world.call(ev.AbortAsked(action.reason))
    elif isinstance(action, ev.Resume):
        perform.resume(src, RID)
    elif isinstance(action, ev.Release):
        src.release_suspended(RID)
    elif isinstance(action, (ev.AbortHere, ev.ForwardAbort)):
        world.deferred_abort = False
        with contextlib.suppress(UnknownRequestError):
            (src if isinstance(action, ev.AbortHere) else world.dst).abort_request(RID)
    return None


def noise(world: World, kind: str) -> None:
    """Something that happens between two actions, outside the migration's control."""
    if kind in ("step_src", "burst"):
        for _ in range(8 if kind == "burst" else 1):  # a burst: long enough to finish, grow or get preempted
            world.step(world.src)
    elif kind == "step_dst":
        world.step(world.dst)
    elif kind == "client_abort" and not world.client_aborted and RID in world.src.request_ids():
        world.client_aborted = True
        if world.src.phase(RID) is Phase.SUSPENDED:
            world.deferred_abort = True  # the llumlet marks it; the machine settles it
        else:
            world.src.abort_request(RID)
    elif kind == "reap":
        world.call(ev.SourceSilent("source silent"))


def spec(rid: str, prompt: int, out: int) -> RequestSpec:
    return RequestSpec(rid, (1,) * prompt, Sampling(max_tokens=out, ignore_eos=True))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    prompt=st.integers(1, 100),
    out=st.integers(8, 60),
    others=st.integers(0, 3),
    warmup=st.integers(0, 6),
    last_stage_max_blocks=st.integers(1, 4),
    max_stages=st.sampled_from([0, 1, 2, 3, 3]),
    dst_blocks=st.sampled_from([12, 24, 64]),
)
def test_any_interleaving_leaves_one_copy_and_no_leak(
    data: st.DataObject,
    prompt: int,
    out: int,
    others: int,
    warmup: int,
    last_stage_max_blocks: int,
    max_stages: int,
    dst_blocks: int,
) -> None:
    # A small source pool: other requests growing preempt the migrating one now and then.
    src = SimEngine("tiny", payload=False, total_blocks=16, max_model_len=160)
    dst = SimEngine("tiny", payload=False, total_blocks=dst_blocks, max_model_len=160)
    for i in range(others):
        src.add_request(spec(f"o{i}", 20 + 20 * i, 60), 0.0)
    src.add_request(spec(RID, prompt, out), 0.0)  # the newest: the one a preemption picks
    dst.add_request(spec("d", 60, 40), 0.0)
    limits = MigrationLimits(last_stage_max_blocks, max_stages)
    out_slots, in_slots = ev.Slots(1), ev.Slots(1)
    world = World(src, dst, SourceMigration("m", RID, limits, out_slots), DestinationMigration("m", in_slots, "dst"))
    for _ in range(warmup):
        world.step(src)

    actions = world.source.step(ev.Start())
    for _ in range(1000):
        if not actions:
            break
        noise(world, data.draw(st.sampled_from(NOISE), label="noise"))
        action = actions.pop(0)
        event = perform_action(world, action, data.draw(st.sampled_from(FAULTS), label="fault"))
        if world.deferred_abort:
            actions += world.source.step(ev.ClientAborted())
        if event is not None:
            actions += world.source.step(event)
        if not actions and world.deferred_abort:
            actions += world.source.step(ev.ClientAborted())
    assert not actions, "the migration did not end"

    source = world.source
    tally(f"{source.outcome.label}: {source.reason.split(':')[0].split('(')[0][:44]}")
    here, there = RID in src.request_ids(), RID in dst.request_ids()
    assert source.done and not (here and there), (source.outcome, source.reason)
    assert here or there or world.finished or world.client_aborted, f"lost: {source.outcome} {source.reason}"
    if source.outcome is ev.Outcome.COMMITTED:
        assert not here
    else:
        assert not there
    if here:
        assert src.phase(RID) is not Phase.SUSPENDED, "an aborted migration leaves the request suspended"
    assert not world.deferred_abort, "a client abort was never settled"
    assert world.destination.state in (DestinationState.NEW, DestinationState.CLOSED)
    assert dst.pool.num_reserved == 0 and not out_slots.held and not in_slots.held

    for engine in (src, dst):
        for _ in range(5000):
            if not engine.has_work():
                break
            world.step(engine)
        assert not engine.request_ids()
        assert engine.pool.num_free == engine.total_blocks and engine.pool.num_reserved == 0
