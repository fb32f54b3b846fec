"""Workloads: request arrivals (time, lengths, priority) synthesised from a SPEC string or read from a trace file.

A workload is a plain ``list[RequestArrival]``, deterministic for a seed, so the same requests can be replayed by the
simulator and by the live benchmark client against several policies.
"""

from __future__ import annotations

from pyllumnix.tools.workload.arrivals import ArrivalProcess, Constant, Gamma, Poisson, arrival_times
from pyllumnix.tools.workload.lengths import (
    BURSTGPT_INPUT,
    BURSTGPT_OUTPUT,
    PAPER_ZIPF_ALPHA,
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    Fixed,
    LengthDist,
    LogNormal,
    Uniform,
    Zipf,
)
from pyllumnix.tools.workload.request import PRIORITY_HIGH, PRIORITY_NORMAL, RequestArrival, clip_to_max_len
from pyllumnix.tools.workload.spec import TRACE_SIZES, WorkloadSpec, generate, parse_spec, synthesize
from pyllumnix.tools.workload.trace import TraceFormatError, read_trace, write_trace

__all__ = [
    "BURSTGPT_INPUT",
    "BURSTGPT_OUTPUT",
    "PAPER_ZIPF_ALPHA",
    "PRIORITY_HIGH",
    "PRIORITY_NORMAL",
    "SHAREGPT_INPUT",
    "SHAREGPT_OUTPUT",
    "TRACE_SIZES",
    "ArrivalProcess",
    "Constant",
    "Fixed",
    "Gamma",
    "LengthDist",
    "LogNormal",
    "Poisson",
    "RequestArrival",
    "TraceFormatError",
    "Uniform",
    "WorkloadSpec",
    "Zipf",
    "arrival_times",
    "clip_to_max_len",
    "generate",
    "parse_spec",
    "read_trace",
    "synthesize",
    "write_trace",
]
