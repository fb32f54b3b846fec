"""Per-request records: what the simulator and the live benchmark client log for each request, in seconds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pyllumnix.tools.workload.request import PRIORITIES, PRIORITY_NORMAL


@dataclass(frozen=True)
class Preemption:
    """One preemption of a running request (its KV cache dropped, to be recomputed).

    ``readmit_time`` is when the request was scheduled again and its re-prefill began; ``recompute_prefill_s`` is
    how long that re-prefill took. ``decode_step_s`` is the decode step the re-prefill stands in for (it emits one
    token); left ``None``, the request's own mean decode latency is used.
    """

    preempt_time: float
    readmit_time: float
    recompute_prefill_s: float
    decode_step_s: float | None = None

    def __post_init__(self) -> None:
        if self.readmit_time < self.preempt_time:
            raise ValueError(f"readmit_time {self.readmit_time} precedes preempt_time {self.preempt_time}")
        if self.recompute_prefill_s < 0.0:
            raise ValueError(f"recompute_prefill_s must be >= 0, got {self.recompute_prefill_s}")


@dataclass(frozen=True)
class Migration:
    """One live migration attempt of the request; ``downtime_s`` is the last stage's stall (0 when aborted early)."""

    start_time: float
    end_time: float
    downtime_s: float = 0.0
    succeeded: bool = True
    source: str = ""
    destination: str = ""


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request. Times are absolute seconds on one clock; ``None`` means it never happened.

    ``token_times`` (optional) are the arrival times of every output token at the client, first token included;
    when given, decode latency and inter-token gaps come from them.
    """

    request_id: str
    priority: int
    arrival: float
    first_token_time: float | None
    finish_time: float | None
    num_output_tokens: int
    input_len: int = 0
    token_times: tuple[float, ...] | None = None
    preemptions: tuple[Preemption, ...] = ()
    migrations: tuple[Migration, ...] = ()

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"{self.request_id}: priority must be one of {PRIORITIES}, got {self.priority}")
        if self.num_output_tokens < 0:
            raise ValueError(f"{self.request_id}: num_output_tokens must be >= 0")
        if self.first_token_time is not None and self.first_token_time < self.arrival:
            raise ValueError(f"{self.request_id}: first_token_time precedes arrival")
        if self.finish_time is not None:
            if self.first_token_time is None:
                raise ValueError(f"{self.request_id}: finish_time without first_token_time")
            if self.finish_time < self.first_token_time:
                raise ValueError(f"{self.request_id}: finish_time precedes first_token_time")
        if self.token_times is not None and any(b < a for a, b in itertools.pairwise(self.token_times)):
            raise ValueError(f"{self.request_id}: token_times must be non-decreasing")

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    @property
    def is_high_priority(self) -> bool:
        return self.priority != PRIORITY_NORMAL
