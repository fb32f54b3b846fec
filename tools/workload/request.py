"""The unit of a workload: one request's arrival time, prompt and output lengths, and priority."""

from __future__ import annotations

from dataclasses import dataclass

from pyllumnix.infra.vocabulary import Priority

# The vocabulary's priorities (the proto's ints), kept as plain ints: records, CSV traces and JSON summaries carry the
# number, and workloads stay free of protobuf.
PRIORITY_NORMAL = int(Priority.NORMAL)
PRIORITY_HIGH = int(Priority.HIGH)
PRIORITIES = (PRIORITY_NORMAL, PRIORITY_HIGH)


@dataclass(frozen=True)
class RequestArrival:
    """One request of a workload; times are seconds from the workload's start."""

    request_id: str
    arrival_time_s: float
    input_len: int
    output_len: int
    priority: int = PRIORITY_NORMAL

    def __post_init__(self) -> None:
        if not self.arrival_time_s >= 0.0 or self.arrival_time_s == float("inf"):
            raise ValueError(f"{self.request_id}: arrival_time_s must be finite and >= 0, got {self.arrival_time_s}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(
                f"{self.request_id}: input_len and output_len must be >= 1, got {self.input_len}, {self.output_len}"
            )
        if self.priority not in PRIORITIES:
            raise ValueError(f"{self.request_id}: priority must be one of {PRIORITIES}, got {self.priority}")


def clip_to_max_len(input_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Clip a length pair so that input + output <= max_model_len, keeping at least one output token.

    The prompt is cut first to ``max_model_len - 1`` (a request must produce a token), then the output to what is
    left; this keeps the prompt, which the engine must admit whole, as intact as the output allows.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    input_len = min(input_len, max_model_len - 1)
    output_len = min(output_len, max_model_len - input_len)
    return input_len, output_len
