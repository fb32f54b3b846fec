"""The simulated engine: the pure scheduler, a latency profile, deterministic tokens and real KV payload bytes behind
the Engine interface, so llumlets, migration and the simulator run without a GPU.

Driving it: call ``step(now)``; it returns at once with the step's modelled ``duration``. In real time the llumlet
waits that long before the next step (see ``clock.StepPacer``); in virtual time the simulator advances its clock by
it. Outputs of a step are the tokens available at ``now + duration``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyllumnix.data_plane.engine.base import (
    BlockBuffer,
    DuplicateRequestError,
    Engine,
    Finish,
    InvalidRequestError,
    InvalidStateError,
    LoadSnapshot,
    MigrationState,
    Phase,
    RequestLoadInfo,
    RequestSpec,
    StepResult,
    TokenOutput,
    UnknownRequestError,
)
from pyllumnix.data_plane.engine.block_pool import BlockPool
from pyllumnix.data_plane.engine.checks import (
    check_block_data,
    check_reservation,
    check_reserved,
    check_waiting_admission,
)
from pyllumnix.data_plane.engine.payload import PayloadStore, expected_block_bytes, request_key
from pyllumnix.data_plane.engine.profile import Profile, get_profile, with_overrides
from pyllumnix.data_plane.engine.scheduler import Schedule, Scheduler, SimRequest
from pyllumnix.data_plane.engine.tokens import decode_state, encode_state, next_token, request_seed


@dataclass(frozen=True)
class SimStepPlan:
    """A step between ``SimEngine.plan_step`` and ``finish_step``: the schedule, its modelled duration, and the
    payload writes (logical block ids, request key, token positions [start, end)) it owes."""

    now: float
    duration: float
    plan: Schedule
    writes: tuple[tuple[list[int], int, int, int], ...]
    payload_bytes: int  # bytes of KV the step's tokens hold (0 with the payload off); written only into arrays
    free_before: int
    num_prefill_tokens: int
    num_decode_tokens: int


class SimEngine(Engine):
    """``SimEngine(profile)``; keyword overrides replace the profile's capacity knobs (handy in tests).

    ``payload=False`` keeps block accounting only (large-scale simulation): reads return zeros, writes are dropped.
    With payload on, up to ``payload_spare_bytes`` of freed block arrays are reused, and ``prewarm_blocks`` of them
    are created up front (a live llumlet's start-up), so steps do not pay first-touch page faults.
    The sim model has no EOS of its own: a request stops at a token in ``stop_token_ids`` (unless ``ignore_eos``,
    which traces with fixed output lengths set), at ``max_tokens``, or at ``max_model_len``.
    """

    def __init__(
        self,
        profile: Profile | str,
        *,
        payload: bool = True,
        block_size: int | None = None,
        total_blocks: int | None = None,
        watermark: float | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        split_steps: bool | None = None,
        payload_spare_bytes: int = 1 << 30,
        prewarm_blocks: int = 0,
        verify_incoming: bool = False,
    ) -> None:
        prof = get_profile(profile) if isinstance(profile, str) else profile
        # Check a migrated request's KV bytes against their deterministic content before installing it (tests: a
        # commit that goes through proves every block arrived intact; costs a compare of all its bytes).
        self.verify_incoming = verify_incoming
        overrides: dict[str, Any] = {
            "block_size": block_size,
            "total_blocks": total_blocks,
            "watermark": watermark,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_model_len": max_model_len,
            "split_steps": split_steps,
        }
        prof = with_overrides(prof, **overrides)
        self.profile = prof
        self.block_size = prof.block_size
        self.total_blocks = prof.total_blocks
        self.max_model_len = prof.max_model_len
        self.block_bytes = prof.block_bytes
        self.payload = PayloadStore(
            prof.block_size, prof.bytes_per_token, enabled=payload, spare_bytes=payload_spare_bytes
        )
        self.payload.prewarm(prewarm_blocks)
        self.pool = BlockPool(prof.total_blocks, on_free=self.payload.drop)
        self.scheduler = Scheduler(
            self.pool,
            block_size=prof.block_size,
            max_num_seqs=prof.max_num_seqs,
            max_num_batched_tokens=prof.max_num_batched_tokens,
            watermark_blocks=prof.watermark_blocks,
            split_steps=prof.split_steps,
        )
        self._requests: dict[str, SimRequest] = {}
        # Bumped by every change to what ``load`` reports other than the requests' output-token counts (see
        # ``load_version``); a report loop compares it instead of rebuilding the snapshot 20 times a second. A step
        # whose only change is running requests' block growth bumps ``_growth_version`` instead: the reporter holds
        # such changes back for a while, so on most ticks it need not build the snapshot just to find that out.
        self._load_version = 0
        self._growth_version = 0

    # --- helpers ---
    def _get(self, request_id: str) -> SimRequest:
        req = self._requests.get(request_id)
        if req is None:
            raise UnknownRequestError(request_id)
        return req

    def _validate(self, spec: RequestSpec) -> None:
        if not spec.prompt_token_ids:
            raise InvalidRequestError(f"{spec.request_id}: empty prompt")
        if spec.sampling.max_tokens <= 0:
            raise InvalidRequestError(f"{spec.request_id}: max_tokens must be positive")
        if len(spec.prompt_token_ids) + spec.sampling.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"{spec.request_id}: prompt ({len(spec.prompt_token_ids)}) + max_tokens ({spec.sampling.max_tokens})"
                f" exceeds max_model_len {self.max_model_len}"
            )

    def _finish_reason(self, req: SimRequest) -> Finish | None:
        sampling = req.spec.sampling
        if not sampling.ignore_eos and req.output_token_ids[-1] in sampling.stop_token_ids:
            return Finish.STOP
        if len(req.output_token_ids) >= sampling.max_tokens or req.num_tokens >= self.max_model_len:
            return Finish.LENGTH
        return None

    # --- serving ---
    def add_request(self, spec: RequestSpec, now: float) -> None:
        if spec.request_id in self._requests:
            raise DuplicateRequestError(spec.request_id)
        self._validate(spec)
        req = SimRequest(spec, request_seed(spec.request_id, spec.sampling.seed), request_key(spec.request_id))
        self._requests[spec.request_id] = req
        self.scheduler.enqueue(req)
        self._load_version += 1

    def abort_request(self, request_id: str) -> TokenOutput:
        req = self._get(request_id)
        self.scheduler.remove(req)
        del self._requests[request_id]
        self._load_version += 1
        return TokenOutput(request_id, (), len(req.output_token_ids), finished=True, finish=Finish.ABORT)

    def step(self, now: float) -> StepResult:
        plan = self.plan_step(now)
        self.write_step_payload(plan)
        return self.finish_step(plan)

    # A step in three parts, so a real-time driver can write a large payload off its event loop: ``plan_step`` and
    # ``finish_step`` change the engine's state (call them where every other engine call runs); between them only
    # ``write_step_payload`` may run, in any thread: it writes bytes into blocks the plan's requests hold, and
    # nothing else may touch the engine meanwhile but readers (``load``, ``read_blocks``, ...), which see the state
    # as ``plan_step`` left it.
    def plan_step(self, now: float) -> SimStepPlan:
        """Schedules the step: blocks taken, preemptions done; tokens and payload not yet written."""
        free_before = self.pool.num_free
        plan = self.scheduler.schedule()
        prefill_tokens = decode_batch = decode_context = 0
        writes: list[tuple[list[int], int, int, int]] = []
        for item in plan.scheduled:
            req = item.request
            if item.is_prefill:
                prefill_tokens += item.num_new_tokens
            else:
                decode_batch += 1
                decode_context += req.num_tokens
            start = req.num_computed_tokens
            writes.append((req.block_ids, req.key, start, start + item.num_new_tokens))
        duration = self.profile.step_seconds(prefill_tokens, decode_batch, decode_context)
        tokens = sum(end - start for _, _, start, end in writes)
        return SimStepPlan(
            now,
            duration,
            plan,
            tuple(writes),
            tokens * self.profile.bytes_per_token if self.payload.enabled else 0,
            free_before,
            prefill_tokens,
            decode_batch,
        )

    def write_step_payload(self, step: SimStepPlan) -> None:
        """Writes the KV payload of the planned step's tokens: in-order fills are only recorded (payload.py); a fill
        into an array (a block a migration brought in) writes bytes, releasing the GIL."""
        for block_ids, key, start, end in step.writes:
            self.payload.fill(block_ids, key, start, end)

    def finish_step(self, step: SimStepPlan) -> StepResult:
        """Advances the planned requests by their tokens and returns the step's outputs."""
        now, duration, plan = step.now, step.duration, step.plan
        # Whether this step changes the load beyond output-token counts and block growth: a phase change (prefill),
        # a preemption, a finish. ``grew``: a decoding request took a block or needs a new one before its next token
        # (with nothing else changed, the free blocks fell by exactly the blocks the running requests took).
        changed = bool(plan.preempted)
        grew = False
        outputs: list[TokenOutput] = []
        block_size = self.block_size
        for item in plan.scheduled:
            req = item.request
            changed = changed or item.is_prefill
            req.num_computed_tokens += item.num_new_tokens
            token = next_token(req.seed, req.num_tokens, req.last_token, self.profile.vocab_size)
            req.output_token_ids.append(token)
            if len(req.output_token_ids) == 1:
                req.first_token_time = now + duration
            finish = self._finish_reason(req)
            if finish is not None:
                self.scheduler.remove(req)
                del self._requests[req.request_id]
                changed = True
            elif not grew and -(-req.num_tokens // block_size) != len(req.block_ids):
                grew = True  # its demand_blocks became non-zero
            outputs.append(
                TokenOutput(
                    req.request_id,
                    (token,),
                    len(req.output_token_ids) - 1,
                    finished=finish is not None,
                    finish=finish,
                )
            )
        if changed:
            self._load_version += 1
        elif grew or self.pool.num_free != step.free_before:
            self._growth_version += 1
        return StepResult(
            outputs,
            duration,
            num_prefill_tokens=step.num_prefill_tokens,
            num_decode_tokens=step.num_decode_tokens,
            preempted=tuple(r.request_id for r in plan.preempted),
        )

    def load_version(self) -> tuple[int, int]:
        return self._load_version, self._growth_version

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def load(self) -> LoadSnapshot:
        sched = self.scheduler
        infos = tuple(
            RequestLoadInfo(
                request_id=r.request_id,
                phase=r.phase,
                priority=r.spec.priority,
                num_blocks=len(r.block_ids),
                demand_blocks=sched.demand_blocks(r),
                num_prompt_tokens=len(r.spec.prompt_token_ids),
                num_output_tokens=len(r.output_token_ids),
                num_preemptions=r.num_preemptions,
                arrival_time=r.spec.arrival_time,
            )
            for r in self._requests.values()
        )
        return LoadSnapshot(
            total_blocks=self.total_blocks,
            free_blocks=self.pool.num_free,
            block_size=self.block_size,
            watermark_blocks=sched.watermark_blocks,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_preempted=sum(1 for r in sched.waiting if r.preempted),
            head_of_line_demand_blocks=sched.head_of_line_demand(),
            waiting_demand_blocks=sum(sched.demand_blocks(r) for r in sched.waiting),
            reserved_blocks=self.pool.num_reserved,
            total_preemptions=sched.total_preemptions,
            requests=infos,
        )

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def phase(self, request_id: str) -> Phase:
        return self._get(request_id).phase

    # --- migration, source side ---
    def block_ids(self, request_id: str) -> list[int]:
        return list(self._get(request_id).block_ids)

    def num_computed_tokens(self, request_id: str) -> int:
        return self._get(request_id).num_computed_tokens

    def read_blocks(self, block_ids: Sequence[int], out: BlockBuffer | None = None) -> BlockBuffer:
        """Safe from another thread while ``step`` runs: the in-use check is repeated after the copy, so a block freed
        meanwhile raises KeyError instead of returning stale or zero bytes."""
        self._check_in_use(block_ids)
        data = self.payload.read(block_ids, out)
        self._check_in_use(block_ids)
        return data

    def _check_in_use(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if not self.pool.is_in_use(b):
                raise KeyError(f"block {b} is not in use")

    def export_state(self, request_id: str) -> MigrationState:
        return self._state(self._get(request_id))

    def suspend(self, request_id: str) -> MigrationState:
        req = self._get(request_id)
        if req.phase not in (Phase.RUNNING, Phase.WAITING):
            raise InvalidStateError(f"{request_id} is {req.phase.label}; only running or waiting can be suspended")
        self.scheduler.suspend(req)
        self._load_version += 1
        return self._state(req)

    def _state(self, req: SimRequest) -> MigrationState:
        return MigrationState(
            spec=req.spec,
            output_token_ids=tuple(req.output_token_ids),
            num_computed_tokens=req.num_computed_tokens,
            num_preemptions=req.num_preemptions,
            engine_state=encode_state(req.seed),
            first_token_time=req.first_token_time,
        )

    def _get_suspended(self, request_id: str) -> SimRequest:
        req = self._get(request_id)
        if req.phase is not Phase.SUSPENDED:
            raise InvalidStateError(f"{request_id} is {req.phase.label}, not suspended")
        return req

    def resume(self, request_id: str) -> None:
        self.scheduler.resume(self._get_suspended(request_id))
        self._load_version += 1

    def release_suspended(self, request_id: str) -> None:
        self.scheduler.remove(self._get_suspended(request_id))
        del self._requests[request_id]
        self._load_version += 1

    # --- migration, destination side ---
    def reserve_blocks(self, n: int) -> list[int]:
        check_reservation(n, self.pool.num_free, self.scheduler.watermark_blocks)
        blocks = self.pool.reserve(n)
        self._load_version += 1  # after the change: a reader that sees the new version sees the reservation
        return blocks

    def _check_reserved(self, block_ids: Sequence[int]) -> None:
        check_reserved(block_ids, self.pool.is_reserved)

    def free_reserved(self, block_ids: Sequence[int]) -> None:
        self._check_reserved(block_ids)
        self.pool.unreserve(block_ids)
        self._load_version += 1

    def write_blocks(self, block_ids: Sequence[int], data: BlockBuffer) -> None:
        self._check_reserved(block_ids)
        check_block_data(block_ids, data, self.block_bytes)
        self.payload.write(block_ids, data)

    def _verify_payload(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> None:
        data = self.payload.read(block_ids)
        for i in range(len(block_ids)):
            expected = expected_block_bytes(
                request_id, i, num_tokens, block_size=self.block_size, bytes_per_token=self.profile.bytes_per_token
            )
            if not np.array_equal(data[i], expected):
                raise InvalidStateError(f"{request_id}: KV payload of block {i} differs from the source's")

    def commit_incoming(self, state: MigrationState, block_ids: Sequence[int], now: float) -> None:
        """A request with KV is installed running (it starts last, so it is the first preemption victim); one without
        KV joins the waiting queue by arrival time, and any blocks reserved for it return to the free pool. A running
        commit is not refused for a full batch (max_num_seqs): the destination's reservation is the admission check.
        A request without KV is refused (``OutOfBlocksError``, a destination abort: it stays on the source) unless the
        destination could admit it now: its prefill demand plus that of the requests it would queue behind must fit
        above the watermark. Otherwise it would just wait here instead of there, holding no blocks anywhere."""
        spec = state.spec
        if spec.request_id in self._requests:
            raise DuplicateRequestError(spec.request_id)
        self._validate(spec)
        num_tokens = len(spec.prompt_token_ids) + len(state.output_token_ids)
        if not 0 <= state.num_computed_tokens < num_tokens:
            raise InvalidRequestError(
                f"{spec.request_id}: num_computed_tokens {state.num_computed_tokens} not in [0, {num_tokens})"
            )
        if len(state.output_token_ids) >= spec.sampling.max_tokens:
            raise InvalidRequestError(f"{spec.request_id}: already produced max_tokens")
        self._check_reserved(block_ids)
        if not state.num_computed_tokens:
            sched = self.scheduler
            check_waiting_admission(
                spec.request_id,
                sched.blocks_for(num_tokens),
                sched.waiting_demand_ahead(spec.arrival_time, spec.priority),
                self.pool.num_free + len(block_ids),
                sched.watermark_blocks,
            )
        needed = self.scheduler.blocks_for(state.num_computed_tokens)
        if state.num_computed_tokens and len(block_ids) != needed:
            raise InvalidStateError(
                f"{spec.request_id}: {len(block_ids)} blocks for {state.num_computed_tokens} tokens (need {needed})"
            )
        if self.verify_incoming and self.payload.enabled:
            self._verify_payload(spec.request_id, block_ids, state.num_computed_tokens)
        seed = decode_state(state.engine_state)
        req = SimRequest(
            spec,
            seed if seed is not None else request_seed(spec.request_id, spec.sampling.seed),
            request_key(spec.request_id),
            output_token_ids=list(state.output_token_ids),
            num_computed_tokens=state.num_computed_tokens,
            num_preemptions=state.num_preemptions,
            first_token_time=state.first_token_time,
        )
        self._requests[spec.request_id] = req
        if state.num_computed_tokens:
            self.pool.claim(block_ids)
            req.block_ids = list(block_ids)
            self.scheduler.start_running(req)
        else:
            self.pool.unreserve(block_ids)
            req.preempted = bool(state.output_token_ids)  # lost its KV to a preemption; recompute pending
            self.scheduler.enqueue(req)
        self._load_version += 1  # after the change, as everywhere else
