"""Conversions between the engine's dataclasses and the v1 protos, in one place (enum values through
:mod:`pyllumnix.infra.wire`, the one home of every proto enum mapping)."""

from __future__ import annotations

from collections.abc import Callable

from pyllumnix.data_plane.engine.base import (
    LoadSnapshot,
    MigrationState,
    Phase,
    RequestLoadInfo,
    RequestSpec,
    Sampling,
    TokenOutput,
)
from pyllumnix.data_plane.llumlet.output_push import QueuedOutput
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.protos.llumnix.v1 import common_pb2, llumlet_pb2


def spec_from_pb(req: common_pb2.EngineRequest) -> RequestSpec:
    s = req.sampling
    sampling = Sampling(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty or 1.0,
    )
    return RequestSpec(
        request_id=req.request_id,
        prompt_token_ids=tuple(req.prompt_token_ids),
        sampling=sampling,
        priority=wire.priority_from_pb(req.priority),
        arrival_time=req.arrival_time,
    )


def spec_to_pb(spec: RequestSpec, frontend_address: str) -> common_pb2.EngineRequest:
    s = spec.sampling
    sampling = common_pb2.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    return common_pb2.EngineRequest(
        request_id=spec.request_id,
        prompt_token_ids=list(spec.prompt_token_ids),
        sampling=sampling,
        priority=wire.priority_to_pb(spec.priority),
        frontend_address=frontend_address,
        arrival_time=spec.arrival_time,
    )


def queued_output(out: TokenOutput, num_prompt_tokens: int = 0, capability: str = "") -> QueuedOutput:
    """An engine output as the pusher queues it; ``capability``: the holder's token for the request (the frontend
    accepts outputs only with it)."""
    return QueuedOutput(
        out.request_id,
        list(out.token_ids),
        out.first_index,
        out.finished,
        wire.finish_to_pb(out.finish),
        out.error,
        num_prompt_tokens,
        capability,
    )


def _request_load(
    make: Callable[..., common_pb2.RequestLoad], r: RequestLoadInfo, frontend_address: str = ""
) -> common_pb2.RequestLoad:
    """One request's RequestLoad made by ``make`` (the message class, or a repeated field's ``add``, which builds it in
    place): the one field list both builders use, so a new field is added once, with no kwargs dict per request on
    the load's hot path."""
    return make(
        request_id=r.request_id,
        phase=wire.phase_to_pb(r.phase),
        priority=wire.priority_to_pb(r.priority),
        num_blocks=r.num_blocks,
        demand_blocks=r.demand_blocks,
        num_prompt_tokens=r.num_prompt_tokens,
        num_output_tokens=r.num_output_tokens,
        num_preemptions=r.num_preemptions,
        arrival_time=r.arrival_time,
        frontend_address=frontend_address,
    )


def request_load_to_pb(r: RequestLoadInfo) -> common_pb2.RequestLoad:
    return _request_load(common_pb2.RequestLoad, r)


def _summary(snap: LoadSnapshot) -> common_pb2.LoadSummary:
    """The same aggregates the policy core would compute from the request list (running includes suspended)."""
    summary = common_pb2.LoadSummary()
    for r in snap.requests:
        high = r.priority >= Priority.HIGH
        if r.phase in (Phase.RUNNING, Phase.SUSPENDED):
            summary.running_blocks += r.num_blocks
            if high:
                summary.num_running_high += 1
                summary.running_high_blocks += r.num_blocks
        elif r.phase is Phase.WAITING and high:
            summary.num_waiting_high += 1
    return summary


def load_to_pb(
    snap: LoadSnapshot,
    instance_id: str,
    seq: int,
    timestamp: float,
    frontend_of: Callable[[str], str | None] | None = None,
) -> common_pb2.InstanceLoad:
    """``frontend_of(request_id)``: the frontend address a request's entry names (None or empty: none).

    Built in place (each request's entry added to the message, not built apart and copied in): a busy llumlet builds
    its load up to 20 times a second, and the copies were about half of it."""
    pb = common_pb2.InstanceLoad(
        instance_id=instance_id,
        seq=seq,
        total_blocks=snap.total_blocks,
        free_blocks=snap.free_blocks,
        block_size=snap.block_size,
        watermark_blocks=snap.watermark_blocks,
        num_running=snap.num_running,
        num_waiting=snap.num_waiting,
        num_preempted=snap.num_preempted,
        head_of_line_demand_blocks=snap.head_of_line_demand_blocks,
        waiting_demand_blocks=snap.waiting_demand_blocks,
        summary=_summary(snap),
        reserved_blocks=snap.reserved_blocks,
        total_preemptions=snap.total_preemptions,
        timestamp=timestamp,
    )
    add = pb.requests.add
    for r in snap.requests:
        address = frontend_of(r.request_id) if frontend_of is not None else None
        _request_load(add, r, address or "")
    return pb


def migration_state_to_pb(state: MigrationState, frontend_address: str) -> llumlet_pb2.MigratingRequest:
    return llumlet_pb2.MigratingRequest(
        request=spec_to_pb(state.spec, frontend_address),
        output_token_ids=list(state.output_token_ids),
        num_computed_tokens=state.num_computed_tokens,
        num_preemptions=state.num_preemptions,
        engine_state=state.engine_state,
        first_token_time=state.first_token_time,
    )


def migration_state_from_pb(pb: llumlet_pb2.MigratingRequest) -> MigrationState:
    return MigrationState(
        spec=spec_from_pb(pb.request),
        output_token_ids=tuple(pb.output_token_ids),
        num_computed_tokens=pb.num_computed_tokens,
        num_preemptions=pb.num_preemptions,
        engine_state=pb.engine_state,
        first_token_time=pb.first_token_time,
    )
