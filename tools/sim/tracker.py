"""Per-request bookkeeping in virtual time, turned into ``tools.metrics`` records at the end of a run.

Preemption loss needs the re-admission time, which the engine does not report: a request preempted in a step that
starts at ``t`` is re-admitted by the first later step that emits a token for it (its recompute prefill); that step's
start is ``readmit_time`` and its duration is ``recompute_prefill_s``. The decode step subtracted is the request's own
mean decode latency (``tools.metrics`` default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyllumnix.data_plane.engine.base import TokenOutput
from pyllumnix.tools.metrics.records import Migration, Preemption, RequestRecord
from pyllumnix.tools.workload.request import RequestArrival


@dataclass(slots=True)
class Track:
    arrival: RequestArrival
    first_token_time: float | None = None
    finish_time: float | None = None
    num_tokens: int = 0
    # Outputs flagged finished (conservation: exactly one per request).
    finished_count: int = 0
    preempted_at: float | None = None
    instance: str = ""
    preemptions: list[Preemption] = field(default_factory=list)
    migrations: list[Migration] = field(default_factory=list)

    def record(self) -> RequestRecord:
        a = self.arrival
        return RequestRecord(
            request_id=a.request_id,
            priority=a.priority,
            arrival=a.arrival_time_s,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            num_output_tokens=self.num_tokens,
            input_len=a.input_len,
            preemptions=tuple(self.preemptions),
            migrations=tuple(self.migrations),
        )


class Tracker:
    """Request id -> Track; the step loop feeds it outputs and preemptions."""

    def __init__(self) -> None:
        self.tracks: dict[str, Track] = {}
        self.unfinished = 0

    def arrive(self, arrival: RequestArrival) -> Track:
        track = self.tracks[arrival.request_id] = Track(arrival)
        self.unfinished += 1
        return track

    def on_outputs(self, outputs: Sequence[TokenOutput], step_start: float, step_end: float) -> None:
        """One step's outputs (they reach the client at ``step_end``); called once per step, so kept tight."""
        tracks = self.tracks
        for out in outputs:
            t = tracks[out.request_id]
            if t.first_token_time is None:
                t.first_token_time = step_end
            if t.preempted_at is not None:
                t.preemptions.append(Preemption(t.preempted_at, step_start, step_end - step_start))
                t.preempted_at = None
            t.num_tokens += len(out.token_ids)
            if out.finished:
                t.finished_count += 1
                if t.finish_time is None:
                    t.finish_time = step_end
                    self.unfinished -= 1

    def on_preempted(self, request_id: str, now: float) -> None:
        t = self.tracks[request_id]
        if t.preempted_at is None:
            t.preempted_at = now

    def records(self) -> list[RequestRecord]:
        return [t.record() for t in self.tracks.values()]
