"""The engine interface shared by the simulated engine and the vLLM V1 adapter.

Shaped after vLLM V1: an engine core with a scheduler (waiting/running queues, a paged KV block pool) that advances by
``step()``. The interface is synchronous and reads no clock: the caller passes ``now`` and receives the step's
duration (modelled for the sim engine, measured for vLLM), so one engine runs in real time (the llumlet sleeps or
waits out the duration) and in virtual time (the simulator advances its clock).

Migration needs block-level hooks: read a request's blocks into a buffer while it keeps decoding, reserve and write
blocks on the destination, take a request out between two steps without freeing its blocks (``suspend``), and either
install it on the destination (``commit_incoming``) and release it on the source (``release_suspended``), or put it
back (``resume``) when the migration aborts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pyllumnix.data_plane.engine.device import READY, Ready, host_view, is_torch_tensor
from pyllumnix.data_plane.engine.kv_layout import KvLayout, host_bytes_layout
from pyllumnix.infra.vocabulary import FinishReason, RequestPhase

BlockBuffer = npt.NDArray[np.uint8]
"""KV payload of n blocks: shape (n, block_bytes), C-contiguous."""

KvBuffer = Any
"""A block buffer on the engine's KV device: a ``BlockBuffer`` for host engines, or a contiguous uint8 torch tensor of
shape (n, block_bytes) on ``Engine.kv_device`` (torch stays an optional dependency, hence ``Any``)."""


class EngineError(Exception):
    """Base of the errors an engine raises for bad calls; the llumlet maps each to a gRPC status."""


class DuplicateRequestError(EngineError):
    """The request id is already in the engine (ALREADY_EXISTS)."""


class UnknownRequestError(EngineError):
    """No such request (NOT_FOUND)."""


class InvalidRequestError(EngineError):
    """Empty prompt, non-positive max_tokens, or longer than the model allows (INVALID_ARGUMENT)."""


class OutOfBlocksError(EngineError):
    """A reservation would take free blocks below the watermark (RESOURCE_EXHAUSTED)."""


class InvalidStateError(EngineError):
    """The request is not in a state that allows the call, e.g. suspending a waiting request (FAILED_PRECONDITION)."""


# The engines speak the one vocabulary (the same ints as the wire): a request's phase (WAITING, RUNNING, SUSPENDED,
# FINISHED; SUSPENDED is the wire's MIGRATING) and why it finished (STOP, LENGTH, ABORT, ERROR). ``.label`` is the
# lowercase name.
Phase = RequestPhase
Finish = FinishReason


@dataclass(frozen=True)
class Sampling:
    """Sampling knobs (mirrors llumnix.v1.SamplingParams; stop strings stay in the frontend)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class RequestSpec:
    """What the engine needs to run a request."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    priority: int = 1
    arrival_time: float = 0.0


@dataclass(frozen=True)
class TokenOutput:
    """New tokens of one request from one step. ``first_index`` is the index of ``token_ids[0]`` among the request's
    generated tokens, so receivers can drop duplicates across migrations."""

    request_id: str
    token_ids: tuple[int, ...]
    first_index: int
    finished: bool = False
    finish: Finish | None = None
    error: str = ""


@dataclass(frozen=True)
class StepResult:
    outputs: list[TokenOutput]
    # Seconds the step takes (modelled or measured); 0 when there was nothing to do.
    duration: float
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # Requests preempted (recompute) in this step.
    preempted: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestLoadInfo:
    request_id: str
    phase: Phase
    priority: int
    num_blocks: int
    demand_blocks: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    arrival_time: float


@dataclass(frozen=True)
class LoadSnapshot:
    """What the policies read about one engine (mirrors llumnix.v1.InstanceLoad's engine part)."""

    total_blocks: int
    free_blocks: int
    block_size: int
    watermark_blocks: int
    num_running: int
    num_waiting: int
    num_preempted: int
    head_of_line_demand_blocks: int
    waiting_demand_blocks: int
    reserved_blocks: int
    total_preemptions: int
    requests: tuple[RequestLoadInfo, ...] = field(default=())


@dataclass(frozen=True)
class MigrationState:
    """Everything needed to continue a request on another engine, besides its KV blocks."""

    spec: RequestSpec
    output_token_ids: tuple[int, ...]
    # Tokens whose KV is in the blocks (0 for a waiting request: it migrates without KV).
    num_computed_tokens: int
    num_preemptions: int = 0
    # Engine-specific continuation state (sampler RNG, detokenizer offsets); opaque to the protocol.
    engine_state: bytes = b""
    first_token_time: float = 0.0


class Engine(ABC):
    """One inference-engine instance. Not thread-safe: the llumlet calls it from one place, between steps."""

    block_size: int
    total_blocks: int
    max_model_len: int
    # Bytes of one KV block, all layers, K and V.
    block_bytes: int

    # --- serving ---
    @abstractmethod
    def add_request(self, spec: RequestSpec, now: float) -> None:
        """Queues a request (FCFS). Raises DuplicateRequestError or InvalidRequestError."""

    @abstractmethod
    def abort_request(self, request_id: str) -> TokenOutput:
        """Removes a request and frees its blocks; returns its final ABORT output. Raises UnknownRequestError."""

    @abstractmethod
    def step(self, now: float) -> StepResult:
        """Runs one iteration: schedule (maybe preempt), compute, emit one token per running request."""

    @abstractmethod
    def has_work(self) -> bool:
        """True while any request is waiting or running."""

    @abstractmethod
    def load(self) -> LoadSnapshot: ...

    def load_version(self) -> tuple[int, int] | None:
        """``(version, growth_version)``: the pair changes whenever ``load`` would differ in anything but the requests'
        output-token counts; ``version`` stays only if every change since was running requests' block growth (their
        blocks and block demand grew, the free blocks fell by exactly the blocks they took). None: this engine does
        not track it, so callers must build and compare snapshots."""
        return None

    @abstractmethod
    def request_ids(self) -> list[str]:
        """All requests the engine holds (waiting, running, suspended)."""

    @abstractmethod
    def phase(self, request_id: str) -> Phase:
        """Raises UnknownRequestError."""

    # --- migration, source side ---
    @abstractmethod
    def block_ids(self, request_id: str) -> list[int]:
        """Physical block ids of the request in logical order (empty when waiting)."""

    @abstractmethod
    def num_computed_tokens(self, request_id: str) -> int: ...

    @abstractmethod
    def read_blocks(self, block_ids: Sequence[int], out: BlockBuffer | None = None) -> BlockBuffer:
        """Copies the blocks' bytes into ``out`` (shape (len, block_bytes); reused buffers spare the page faults of
        fresh memory) or a new buffer, and returns it. May run in another thread while the engine
        steps: pre-copy stages read completed blocks, whose bytes no longer change. Raises KeyError for a block
        that is not in use."""

    @abstractmethod
    def export_state(self, request_id: str) -> MigrationState:
        """A read-only snapshot of the request's continuation state (any phase). Raises UnknownRequestError."""

    @abstractmethod
    def suspend(self, request_id: str) -> MigrationState:
        """Takes a request out of scheduling between two steps, keeping its blocks. Running or waiting requests only."""

    @abstractmethod
    def resume(self, request_id: str) -> None:
        """Puts a suspended request back where it was (migration aborted); nothing is lost."""

    @abstractmethod
    def release_suspended(self, request_id: str) -> None:
        """Frees a suspended request and its blocks after it was committed elsewhere."""

    # --- migration, destination side ---
    @abstractmethod
    def reserve_blocks(self, n: int) -> list[int]:
        """Reserves n free blocks for an incoming request. Raises OutOfBlocksError below the watermark."""

    @abstractmethod
    def free_reserved(self, block_ids: Sequence[int]) -> None:
        """Returns reserved (not committed) blocks to the free pool."""

    @abstractmethod
    def write_blocks(self, block_ids: Sequence[int], data: BlockBuffer) -> None:
        """Writes (len, block_bytes) bytes into reserved blocks. May run in another thread while the engine steps
        (reserved blocks belong to no request yet)."""

    # --- device-memory hooks (defaults: a host-memory engine; GPU engines override) ---
    @property
    def kv_device(self) -> str:
        """Where the KV blocks live: ``cpu`` or ``cuda:N``. Chunk buffers of a migration are allocated there."""
        return "cpu"

    def kv_layout(self) -> KvLayout:
        """What a peer's blocks must match byte for byte (see ``kv_layout.check_compatible``)."""
        return host_bytes_layout(self.block_bytes, self.block_size)

    def read_blocks_async(self, block_ids: Sequence[int], out: KvBuffer | None = None) -> tuple[KvBuffer, Ready]:
        """Like ``read_blocks`` into ``out`` on ``kv_device``; the copy may still run when this returns: the handle
        says when ``out`` holds the bytes. Host engines copy synchronously and return a ready handle (a CPU torch
        ``out`` is filled through its zero-copy numpy view, so torch chunk buffers work with every engine)."""
        if out is not None and is_torch_tensor(out):
            self.read_blocks(block_ids, host_view(out))
            return out, READY
        return self.read_blocks(block_ids, out), READY

    def write_blocks_async(self, block_ids: Sequence[int], data: KvBuffer) -> Ready:
        """Like ``write_blocks`` from ``data`` on ``kv_device``; ``data`` must not be reused and the blocks not
        committed before the handle is done."""
        self.write_blocks(block_ids, host_view(data) if is_torch_tensor(data) else data)
        return READY

    @abstractmethod
    def commit_incoming(self, state: MigrationState, block_ids: Sequence[int], now: float) -> None:
        """Installs a migrated request with its reserved blocks (running if it has KV, else waiting at its arrival
        position); the next step continues it. Raises DuplicateRequestError or InvalidRequestError."""
