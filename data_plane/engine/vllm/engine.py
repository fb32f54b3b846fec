"""``VllmEngine``: the real vLLM V1 engine behind the llumnix ``Engine`` interface, with live migration that keeps the
KV cache (no recompute). All vLLM internals live in ``adapter.py``; this module is bookkeeping and validation.

Driving it: ``step(now)`` blocks for the real forward pass and returns its measured duration (run it in a worker
thread: ``Llumlet(engine, id, step_in_thread=True)``). ``read_blocks`` and ``write_blocks`` may run in another thread
while a step runs (they touch only completed blocks of a running request, or reserved blocks no request owns), and so
may ``load`` and ``request_ids`` (the llumlet's load reports do not wait for the step): they read under the adapter's
state lock, which a step holds only while it changes the scheduler's state or this module's request table, so they
never see a half-changed engine (nor a table changing size under them) and wait at most for that short part of a
step, never for its forward pass. Everything else must not run during a step (the llumlet's engine lock).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pyllumnix.data_plane.engine.base import (
    BlockBuffer,
    DuplicateRequestError,
    Engine,
    Finish,
    InvalidRequestError,
    InvalidStateError,
    KvBuffer,
    LoadSnapshot,
    MigrationState,
    Phase,
    RequestLoadInfo,
    RequestSpec,
    Sampling,
    StepResult,
    TokenOutput,
    UnknownRequestError,
)
from pyllumnix.data_plane.engine.checks import (
    check_block_data,
    check_reservation,
    check_reserved,
    check_waiting_admission,
)
from pyllumnix.data_plane.engine.device import Ready, device_of
from pyllumnix.data_plane.engine.kv_layout import KvLayout
from pyllumnix.data_plane.engine.vllm.adapter import CoreAdapter, CoreConfig, ReqView, SamplingArgs
from pyllumnix.data_plane.engine.vllm.stats import VllmSchedulerStats

ENGINE_STATE_VERSION = 1


# The engine's vLLM settings are the adapter's (one dataclass; the adapter is where they meet vLLM).
VllmEngineConfig = CoreConfig


@dataclass
class _Tracked:
    spec: RequestSpec
    num_output: int = 0
    first_token_time: float = 0.0


@functools.cache
def _input_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for sampling values it refuses: ValueError, and (vLLM >= 0.3x) its own client errors, e.g.
    ``VLLMValidationError`` ("temperature must be in [0, 2]"), which do not derive from ValueError. Both are the
    caller's bad input (INVALID_ARGUMENT), not an engine failure. Imported lazily: vLLM loads only with this engine."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # an older vLLM: its SamplingParams raises ValueError only
        return (ValueError,)
    return (ValueError, VLLMClientError)


def _sampling_args(s: Sampling) -> SamplingArgs:
    return SamplingArgs(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
    )


def encode_engine_state(generator_state: bytes | None) -> bytes:
    gen = base64.b64encode(generator_state).decode() if generator_state is not None else None
    return json.dumps({"vllm_state": ENGINE_STATE_VERSION, "generator": gen}).encode()


def decode_engine_state(data: bytes) -> bytes | None:
    """The sampler RNG state carried by ``engine_state`` (None when absent or from another engine kind)."""
    if not data:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("vllm_state") != ENGINE_STATE_VERSION:
        return None
    gen = obj.get("generator")
    return base64.b64decode(gen) if isinstance(gen, str) else None


class VllmEngine(Engine):
    """``VllmEngine(VllmEngineConfig(model=PATH))``: one in-process vLLM V1 engine core."""

    def __init__(self, config: VllmEngineConfig, *, watermark: float = 0.01) -> None:
        """``watermark``: the fraction of blocks a migration reservation may not take (vLLM V1 has none itself)."""
        self.config = config
        self.core = CoreAdapter(config)
        self.block_size = self.core.block_size
        self.total_blocks = self.core.num_blocks
        self.max_model_len = self.core.max_model_len
        self.block_bytes = self.core.block_bytes
        self.watermark_blocks = math.ceil(watermark * self.total_blocks)
        self._reqs: dict[str, _Tracked] = {}
        self._total_preemptions = 0

    def vllm_stats(self) -> VllmSchedulerStats:
        """vLLM's own scheduler statistics of this engine (exported by the llumlet's /metrics)."""
        return self.core.stats

    def close(self) -> None:
        self.core.shutdown()

    # --- helpers ---
    def _get(self, request_id: str) -> _Tracked:
        tracked = self._reqs.get(request_id)
        if tracked is None:
            raise UnknownRequestError(request_id)
        return tracked

    def _view(self, request_id: str) -> ReqView:
        self._get(request_id)
        view = self.core.view(request_id)
        if view is None:
            raise UnknownRequestError(request_id)
        return view

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
        bad = [t for t in spec.prompt_token_ids if not 0 <= t < self.core.vocab_size]
        if bad:
            raise InvalidRequestError(f"{spec.request_id}: token ids outside the vocabulary: {bad[:5]}")
        try:
            self.core.make_sampling_params(_sampling_args(spec.sampling))
        except _input_errors() as exc:
            raise InvalidRequestError(f"{spec.request_id}: {exc}") from exc

    # --- serving ---
    def add_request(self, spec: RequestSpec, now: float) -> None:
        if spec.request_id in self._reqs:
            raise DuplicateRequestError(spec.request_id)
        self._validate(spec)
        self.core.add(
            spec.request_id,
            spec.prompt_token_ids,
            _sampling_args(spec.sampling),
            spec.arrival_time or now,
            spec.priority,
        )
        self._reqs[spec.request_id] = _Tracked(spec)

    def abort_request(self, request_id: str) -> TokenOutput:
        tracked = self._get(request_id)
        self.core.abort(request_id)
        del self._reqs[request_id]
        return TokenOutput(request_id, (), tracked.num_output, finished=True, finish=Finish.ABORT)

    def step(self, now: float) -> StepResult:
        t0 = time.monotonic()
        result = self.core.step()
        duration = time.monotonic() - t0
        outputs: list[TokenOutput] = []
        with self.core.state_lock:  # ``load`` may be reading the table from the event loop's thread
            for out in result.outputs:
                tracked = self._reqs.get(out.request_id)
                if tracked is None:
                    continue
                first_index = tracked.num_output
                if out.token_ids and tracked.num_output == 0:
                    tracked.first_token_time = now + duration
                tracked.num_output += len(out.token_ids)
                finish = out.finish
                if finish is not None:
                    del self._reqs[out.request_id]
                if out.token_ids or finish is not None:
                    outputs.append(
                        TokenOutput(
                            out.request_id, out.token_ids, first_index, finished=finish is not None, finish=finish
                        )
                    )
            self._total_preemptions += len(result.preempted)
        return StepResult(
            outputs,
            duration if result.outputs or result.num_prefill_tokens or result.num_decode_tokens else 0.0,
            num_prefill_tokens=result.num_prefill_tokens,
            num_decode_tokens=result.num_decode_tokens,
            preempted=result.preempted,
        )

    def has_work(self) -> bool:
        """Requests waiting or running, or finished ones the worker has not yet been told about (one cheap step
        tells it, so a request id that comes back later finds no stale state)."""
        return self.core.has_unfinished() or self.core.has_pending_finished()

    def _demand(self, view: ReqView) -> int:
        if view.where is Phase.SUSPENDED:
            return 0
        num_tokens = view.num_prompt_tokens + len(view.output_token_ids)
        return max(0, -(-num_tokens // self.block_size) - view.num_blocks)

    def load(self) -> LoadSnapshot:
        """Safe while a step runs in another thread (see the module docstring)."""
        with self.core.state_lock:
            return self._load()

    def _load(self) -> LoadSnapshot:
        infos: list[RequestLoadInfo] = []
        views: dict[str, ReqView] = {}
        for rid, tracked in self._reqs.items():
            view = self.core.view(rid)
            if view is None:
                continue
            views[rid] = view
            infos.append(
                RequestLoadInfo(
                    request_id=rid,
                    phase=view.where,
                    priority=tracked.spec.priority,
                    num_blocks=view.num_blocks,
                    demand_blocks=self._demand(view),
                    num_prompt_tokens=view.num_prompt_tokens,
                    num_output_tokens=len(view.output_token_ids),
                    num_preemptions=view.num_preemptions,
                    arrival_time=tracked.spec.arrival_time,
                )
            )
        waiting = [views[r] for r in self.core.waiting_ids() if r in views]
        return LoadSnapshot(
            total_blocks=self.total_blocks,
            free_blocks=self.core.num_free_blocks(),
            block_size=self.block_size,
            watermark_blocks=self.watermark_blocks,
            num_running=len(self.core.running_ids()),
            num_waiting=len(waiting),
            num_preempted=sum(1 for v in waiting if v.preempted),
            head_of_line_demand_blocks=self._demand(waiting[0]) if waiting else 0,
            waiting_demand_blocks=sum(self._demand(v) for v in waiting),
            reserved_blocks=self.core.num_reserved,
            total_preemptions=self._total_preemptions,
            requests=tuple(infos),
        )

    def request_ids(self) -> list[str]:
        with self.core.state_lock:
            return list(self._reqs)

    def phase(self, request_id: str) -> Phase:
        return self._view(request_id).where

    # --- migration, source side ---
    def block_ids(self, request_id: str) -> list[int]:
        """The blocks that hold the request's computed tokens, in logical order."""
        view = self._view(request_id)
        needed = -(-view.num_computed_tokens // self.block_size)
        return self.core.block_ids(request_id)[:needed]

    def num_computed_tokens(self, request_id: str) -> int:
        return self._view(request_id).num_computed_tokens

    def read_blocks(self, block_ids: Sequence[int], out: BlockBuffer | None = None) -> BlockBuffer:
        """Safe from another thread while ``step`` runs; a block freed meanwhile raises KeyError."""
        if out is not None and (out.shape != (len(block_ids), self.block_bytes) or out.dtype != np.uint8):
            raise InvalidRequestError(
                f"out buffer {out.dtype}{out.shape} is not ({len(block_ids)}, {self.block_bytes})"
            )
        self._check_in_use(block_ids)
        data = self.core.read(block_ids, out)
        self._check_in_use(block_ids)
        return data

    def _check_in_use(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if not self.core.is_in_use(b) or self.core.is_reserved(b):
                raise KeyError(f"block {b} is not in use")

    def export_state(self, request_id: str) -> MigrationState:
        return self._state(request_id)

    def _state(self, request_id: str) -> MigrationState:
        tracked = self._get(request_id)
        view = self._view(request_id)
        return MigrationState(
            spec=tracked.spec,
            output_token_ids=view.output_token_ids,
            num_computed_tokens=view.num_computed_tokens,
            num_preemptions=view.num_preemptions,
            engine_state=encode_engine_state(self.core.generator_state(request_id)),
            first_token_time=tracked.first_token_time,
        )

    def suspend(self, request_id: str) -> MigrationState:
        view = self._view(request_id)
        if view.where not in (Phase.RUNNING, Phase.WAITING):
            raise InvalidStateError(f"{request_id} is {view.where.label}; only running or waiting can be suspended")
        self.core.suspend(request_id)
        return self._state(request_id)

    def _check_suspended(self, request_id: str) -> None:
        view = self._view(request_id)
        if view.where is not Phase.SUSPENDED:
            raise InvalidStateError(f"{request_id} is {view.where.label}, not suspended")

    def resume(self, request_id: str) -> None:
        self._check_suspended(request_id)
        self.core.resume(request_id)

    def release_suspended(self, request_id: str) -> None:
        self._check_suspended(request_id)
        self.core.release(request_id)
        del self._reqs[request_id]

    # --- migration, destination side ---
    def reserve_blocks(self, n: int) -> list[int]:
        check_reservation(n, self.core.num_free_blocks(), self.watermark_blocks)
        return self.core.reserve(n)

    def _check_reserved(self, block_ids: Sequence[int]) -> None:
        check_reserved(block_ids, self.core.is_reserved)

    def free_reserved(self, block_ids: Sequence[int]) -> None:
        self._check_reserved(block_ids)
        self.core.free_reserved(block_ids)

    def write_blocks(self, block_ids: Sequence[int], data: BlockBuffer) -> None:
        self._check_reserved(block_ids)
        check_block_data(block_ids, data, self.block_bytes)
        self.core.write(block_ids, data)

    # --- device-memory hooks: the migration's chunk buffers live on the KV device ---
    @property
    def kv_device(self) -> str:
        return self.core.kv_device

    def kv_layout(self) -> KvLayout:
        return self.core.layout

    def _device_buffer(self, block_ids: Sequence[int], buf: KvBuffer, what: str) -> KvBuffer:
        """``buf`` as a torch tensor on the KV device (a host numpy array is wrapped, without copying, on a CPU
        engine); anything else is refused with a clear error."""
        torch = self.core._torch
        if isinstance(buf, np.ndarray):
            if self.kv_device != "cpu":
                raise InvalidRequestError(f"{what}: host buffer given, the KV cache is on {self.kv_device}")
            check_block_data(block_ids, buf, self.block_bytes)
            return torch.from_numpy(buf)
        if not isinstance(buf, torch.Tensor):
            raise InvalidRequestError(f"{what}: not a block buffer: {type(buf).__name__}")
        if device_of(buf) != self.kv_device:
            raise InvalidRequestError(f"{what}: buffer on {device_of(buf)}, the KV cache is on {self.kv_device}")
        if tuple(buf.shape) != (len(block_ids), self.block_bytes) or buf.dtype != torch.uint8:
            raise InvalidRequestError(
                f"{what}: buffer {buf.dtype}{tuple(buf.shape)} is not uint8({len(block_ids)}, {self.block_bytes})"
            )
        if not buf.is_contiguous():
            raise InvalidRequestError(f"{what}: buffer must be contiguous")
        return buf

    def read_blocks_async(self, block_ids: Sequence[int], out: KvBuffer | None = None) -> tuple[KvBuffer, Ready]:
        """Gathers on the KV device (one kernel on vLLM's shared buffer; a side stream on CUDA)."""
        if out is None:
            torch = self.core._torch
            out = torch.empty((len(block_ids), self.block_bytes), dtype=torch.uint8, device=self.kv_device)
        target = self._device_buffer(block_ids, out, "read_blocks_async")
        self._check_in_use(block_ids)
        ready = self.core.gather_async(block_ids, target)
        self._check_in_use(block_ids)
        return out, ready

    def write_blocks_async(self, block_ids: Sequence[int], data: KvBuffer) -> Ready:
        self._check_reserved(block_ids)
        source = self._device_buffer(block_ids, data, "write_blocks_async")
        return self.core.scatter_async(block_ids, source)

    def commit_incoming(self, state: MigrationState, block_ids: Sequence[int], now: float) -> None:
        """With KV: installed running on the reserved blocks, with its priority and arrival time (vLLM's preemption
        victim is the running request of the lowest priority, latest arrival: a migrated-in request is no easier
        victim than a local one). Without KV: waiting (preempted, recomputed when admitted, if it has outputs); its
        reserved blocks are freed. Without KV it is refused (``OutOfBlocksError``: a destination abort, it stays on the
        source) unless its prefill demand, behind the requests waiting here that vLLM's priority queue serves first
        (higher priority, or equal priority and arrived no later), fits above the watermark."""
        spec = state.spec
        if spec.request_id in self._reqs:
            raise DuplicateRequestError(spec.request_id)
        self._validate(spec)
        num_tokens = len(spec.prompt_token_ids) + len(state.output_token_ids)
        if not 0 <= state.num_computed_tokens < num_tokens:
            raise InvalidRequestError(
                f"{spec.request_id}: num_computed_tokens {state.num_computed_tokens} not in [0, {num_tokens})"
            )
        if len(state.output_token_ids) >= spec.sampling.max_tokens:
            raise InvalidRequestError(f"{spec.request_id}: already produced max_tokens")
        bad = [t for t in state.output_token_ids if not 0 <= t < self.core.vocab_size]
        if bad:
            raise InvalidRequestError(f"{spec.request_id}: output token ids outside the vocabulary: {bad[:5]}")
        self._check_reserved(block_ids)
        if not state.num_computed_tokens:
            ahead = 0
            for rid in self.core.waiting_ids_ahead_of(spec.priority, spec.arrival_time or now):
                view = self.core.view(rid)
                ahead += self._demand(view) if view is not None else 0
            check_waiting_admission(
                spec.request_id,
                -(-num_tokens // self.block_size),
                ahead,
                self.core.num_free_blocks() + len(block_ids),
                self.watermark_blocks,
            )
        needed = -(-state.num_computed_tokens // self.block_size)
        if state.num_computed_tokens and len(block_ids) != needed:
            raise InvalidStateError(
                f"{spec.request_id}: {len(block_ids)} blocks for {state.num_computed_tokens} tokens (need {needed})"
            )
        self.core.install(
            spec.request_id,
            spec.prompt_token_ids,
            _sampling_args(spec.sampling),
            spec.arrival_time or now,
            spec.priority,
            state.output_token_ids,
            state.num_computed_tokens,
            state.num_preemptions,
            block_ids,
            decode_engine_state(state.engine_state),
        )
        self._reqs[spec.request_id] = _Tracked(
            spec, num_output=len(state.output_token_ids), first_token_time=state.first_token_time
        )
