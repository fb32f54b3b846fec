"""Workload SPEC strings: one compact, CLI-friendly line that names a reproducible workload.

Grammar (fields separated by ``:``, keys as ``key=value``, each key at most once)::

    SPEC     := LENGTHS ":" ARRIVAL (":" KEY "=" VALUE)*        synthetic workload
              | "trace" (":" KEY "=" VALUE)*                   replay of a trace file
    LENGTHS  := SIZE "-" SIZE      paper traces, Zipf lengths: S = 128, M = 256, L = 512, XL = 1024 tokens (mean)
              | "zipf" | "fixed" | "uniform" | "sharegpt" | "burstgpt"
    ARRIVAL  := "poisson" | "gamma" | "const"

Keys of a synthetic spec:
    rate=F (req/s, required)   cv=F (gamma only, required)   n=INT (requests, default 10000)
    priority_share=F (fraction of high-priority requests in [0, 1], default 0; exactly round(share * n) of them)
    max_len=INT (model context: each request is clipped to input + output <= max_len; default no clip)
  per LENGTHS (input ``in_*``, output ``out_*``):
    SIZE-SIZE   support=INT (Zipf ranks, default 2·mean - 1)  len_max=INT (length cap, default 6144)
    zipf        in_mean=F out_mean=F (required)  in_alpha=F out_alpha=F (required unless a paper mean)  support  len_max
    fixed       in=INT out=INT (required)
    uniform     in_min=INT in_max=INT out_min=INT out_max=INT (required, both ends included)
    sharegpt    in_mean=F out_mean=F in_sigma=F out_sigma=F (optional overrides of the lognormal fits)  len_max
    burstgpt    same keys as sharegpt
Keys of a trace spec: path=FILE (required; must come last, it takes the rest of the spec, ':' included)
    n=INT (replay at most the first n rows)  rate_scale=F (divide arrival times by F: 2 = twice the rate)  max_len=INT

Examples: ``M-M:poisson:rate=7.5:n=10000``, ``S-S:gamma:rate=26:cv=4:n=2000:priority_share=0.1``,
``sharegpt:poisson:rate=3``, ``fixed:const:rate=1:in=128:out=64:n=8``, ``trace:rate_scale=2:path=runs/a.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pyllumnix.tools.workload.arrivals import ArrivalProcess, Constant, Gamma, Poisson, arrival_times
from pyllumnix.tools.workload.lengths import (
    BURSTGPT_INPUT,
    BURSTGPT_OUTPUT,
    PAPER_LEN_RANGE,
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    Fixed,
    LengthDist,
    LogNormal,
    Uniform,
    Zipf,
)
from pyllumnix.tools.workload.request import PRIORITY_HIGH, PRIORITY_NORMAL, RequestArrival, clip_to_max_len
from pyllumnix.tools.workload.trace import default_request_id, read_trace

# The paper's trace names for input/output mean lengths (S-S, M-M, L-L, S-L, L-S); XL is the paper's 1,024 mean.
TRACE_SIZES: dict[str, int] = {"S": 128, "M": 256, "L": 512, "XL": 1024}
DEFAULT_N = 10_000

_COMMON_KEYS = {"n", "priority_share", "max_len"}
_ARRIVAL_KEYS = {"poisson": {"rate"}, "gamma": {"rate", "cv"}, "const": {"rate"}}
_LENGTH_KEYS = {
    "sizes": {"support", "len_max"},
    "zipf": {"in_mean", "out_mean", "in_alpha", "out_alpha", "support", "len_max"},
    "fixed": {"in", "out"},
    "uniform": {"in_min", "in_max", "out_min", "out_max"},
    "sharegpt": {"in_mean", "out_mean", "in_sigma", "out_sigma", "len_max"},
    "burstgpt": {"in_mean", "out_mean", "in_sigma", "out_sigma", "len_max"},
}
_TRACE_KEYS = {"path", "n", "rate_scale", "max_len"}


@dataclass(frozen=True)
class SyntheticSpec:
    """A generated workload: lengths and arrivals drawn from distributions."""

    text: str
    input_dist: LengthDist
    output_dist: LengthDist
    arrival: ArrivalProcess
    n: int = DEFAULT_N
    priority_share: float = 0.0
    max_model_len: int | None = None


@dataclass(frozen=True)
class TraceSpec:
    """A replayed trace file, optionally truncated and time-scaled."""

    text: str
    path: str
    n: int | None = None
    rate_scale: float = 1.0
    max_model_len: int | None = None


WorkloadSpec = SyntheticSpec | TraceSpec


class _Keys:
    """``key=value`` fields of a spec, consumed by typed getters; leftovers are reported as unknown."""

    def __init__(self, spec: str, fields: list[str]) -> None:
        self.spec = spec
        self.values: dict[str, str] = {}
        for item in fields:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"workload spec {spec!r}: expected key=value, got {item!r}")
            if key in self.values:
                raise ValueError(f"workload spec {spec!r}: key {key!r} given twice")
            self.values[key] = value.strip()

    def check_known(self, allowed: set[str], context: str) -> None:
        unknown = sorted(set(self.values) - allowed)
        if unknown:
            raise ValueError(
                f"workload spec {self.spec!r}: unknown key(s) {', '.join(unknown)} for {context} "
                f"(allowed: {', '.join(sorted(allowed))})"
            )

    def _missing(self, key: str, context: str) -> ValueError:
        return ValueError(f"workload spec {self.spec!r}: {context} needs {key}=")

    def get_float(self, key: str, context: str, default: float | None = None) -> float:
        if key not in self.values:
            if default is None:
                raise self._missing(key, context)
            return default
        raw = self.values[key]
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"workload spec {self.spec!r}: {key}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"workload spec {self.spec!r}: {key}={raw!r} must be finite")
        return value

    def get_int(self, key: str, context: str, default: int | None = None) -> int:
        if key not in self.values:
            if default is None:
                raise self._missing(key, context)
            return default
        raw = self.values[key]
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"workload spec {self.spec!r}: {key}={raw!r} is not an integer") from None

    def optional_int(self, key: str, context: str) -> int | None:
        return self.get_int(key, context) if key in self.values else None

    def optional_float(self, key: str, context: str) -> float | None:
        return self.get_float(key, context) if key in self.values else None


def _lengths(kind: str, keys: _Keys, spec: str) -> tuple[LengthDist, LengthDist]:
    """Input and output length distributions for a LENGTHS token (already validated against its keys)."""
    len_max = keys.get_int("len_max", kind, PAPER_LEN_RANGE)
    try:
        if kind in ("sharegpt", "burstgpt"):
            base_in, base_out = (
                (SHAREGPT_INPUT, SHAREGPT_OUTPUT) if kind == "sharegpt" else (BURSTGPT_INPUT, BURSTGPT_OUTPUT)
            )
            return (
                LogNormal(
                    keys.get_float("in_mean", kind, base_in.target_mean),
                    keys.get_float("in_sigma", kind, base_in.sigma),
                    max_len=len_max,
                ),
                LogNormal(
                    keys.get_float("out_mean", kind, base_out.target_mean),
                    keys.get_float("out_sigma", kind, base_out.sigma),
                    max_len=len_max,
                ),
            )
        if kind == "fixed":
            return Fixed(keys.get_int("in", kind)), Fixed(keys.get_int("out", kind))
        if kind == "uniform":
            return (
                Uniform(keys.get_int("in_min", kind), keys.get_int("in_max", kind)),
                Uniform(keys.get_int("out_min", kind), keys.get_int("out_max", kind)),
            )
        support = keys.optional_int("support", kind)
        if kind == "zipf":
            return (
                Zipf(keys.get_float("in_mean", kind), keys.optional_float("in_alpha", kind), support, len_max),
                Zipf(keys.get_float("out_mean", kind), keys.optional_float("out_alpha", kind), support, len_max),
            )
        in_size, out_size = kind.split("-")
        return (
            Zipf(TRACE_SIZES[in_size], None, support, len_max),
            Zipf(TRACE_SIZES[out_size], None, support, len_max),
        )
    except ValueError as exc:
        if str(exc).startswith("workload spec"):
            raise
        raise ValueError(f"workload spec {spec!r}: {exc}") from None


def _arrival(kind: str, keys: _Keys, spec: str) -> ArrivalProcess:
    rate = keys.get_float("rate", f"{kind} arrivals")
    try:
        if kind == "gamma":
            return Gamma(rate, keys.get_float("cv", "gamma arrivals"))
        return Poisson(rate) if kind == "poisson" else Constant(rate)
    except ValueError as exc:
        if str(exc).startswith("workload spec"):
            raise
        raise ValueError(f"workload spec {spec!r}: {exc}") from None


def _length_kind(token: str, spec: str) -> str:
    lowered = token.strip().lower()
    if lowered in _LENGTH_KEYS and lowered != "sizes":
        return lowered
    sizes = token.strip().upper().split("-")
    if len(sizes) == 2 and all(s in TRACE_SIZES for s in sizes):
        return "-".join(sizes)
    raise ValueError(
        f"workload spec {spec!r}: unknown lengths {token!r}; expected SIZE-SIZE with SIZE in "
        f"{'/'.join(TRACE_SIZES)} (e.g. M-M), or one of zipf, fixed, uniform, sharegpt, burstgpt"
    )


def _common(keys: _Keys, spec: str) -> tuple[int | None, int | None]:
    n = keys.optional_int("n", "the workload")
    if n is not None and n < 0:
        raise ValueError(f"workload spec {spec!r}: n must be >= 0, got {n}")
    max_len = keys.optional_int("max_len", "the workload")
    if max_len is not None and max_len < 2:
        raise ValueError(f"workload spec {spec!r}: max_len must be >= 2, got {max_len}")
    return n, max_len


def parse_spec(spec: str) -> WorkloadSpec:
    """Parse a SPEC string (grammar in the module docstring); raises ValueError naming the problem."""
    if not spec or not spec.strip():
        raise ValueError("workload spec is empty")
    parts = [p.strip() for p in spec.strip().split(":")]
    if parts[0].lower() == "trace":
        fields: list[str] = []
        for i, part in enumerate(parts[1:], start=1):
            if part.startswith("path="):
                fields.append(":".join(parts[i:]))
                break
            fields.append(part)
        keys = _Keys(spec, fields)
        keys.check_known(_TRACE_KEYS, "a trace")
        path = keys.values.get("path", "")
        if not path:
            raise ValueError(f"workload spec {spec!r}: a trace needs path=FILE")
        n, max_len = _common(keys, spec)
        rate_scale = keys.get_float("rate_scale", "a trace", 1.0)
        if not rate_scale > 0.0:
            raise ValueError(f"workload spec {spec!r}: rate_scale must be > 0, got {rate_scale}")
        return TraceSpec(spec, path, n, rate_scale, max_len)

    if len(parts) < 2:
        raise ValueError(
            f"workload spec {spec!r}: expected LENGTHS:ARRIVAL[:key=value...] (e.g. M-M:poisson:rate=7.5) "
            "or trace:path=FILE"
        )
    kind = _length_kind(parts[0], spec)
    arrival_kind = parts[1].lower()
    if arrival_kind not in _ARRIVAL_KEYS:
        raise ValueError(
            f"workload spec {spec!r}: unknown arrival process {parts[1]!r}; expected one of {', '.join(_ARRIVAL_KEYS)}"
        )
    keys = _Keys(spec, parts[2:])
    length_keys = _LENGTH_KEYS["sizes" if "-" in kind else kind]
    keys.check_known(_COMMON_KEYS | _ARRIVAL_KEYS[arrival_kind] | length_keys, f"{kind}:{arrival_kind}")
    n, max_len = _common(keys, spec)
    share = keys.get_float("priority_share", "the workload", 0.0)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"workload spec {spec!r}: priority_share must be in [0, 1], got {share}")
    input_dist, output_dist = _lengths(kind, keys, spec)
    arrival = _arrival(arrival_kind, keys, spec)
    return SyntheticSpec(spec, input_dist, output_dist, arrival, DEFAULT_N if n is None else n, share, max_len)


def synthesize(
    arrival: ArrivalProcess,
    input_dist: LengthDist,
    output_dist: LengthDist,
    n: int,
    seed: int,
    *,
    priority_share: float = 0.0,
    max_model_len: int | None = None,
    start_s: float = 0.0,
) -> list[RequestArrival]:
    """Draw a workload of ``n`` requests, deterministic for ``seed``.

    Arrival times, input lengths, output lengths and priorities come from four independent child streams of the
    seed, so changing one ingredient (say the length distribution) leaves the others' draws unchanged.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= priority_share <= 1.0:
        raise ValueError(f"priority_share must be in [0, 1], got {priority_share}")
    times_rng, in_rng, out_rng, prio_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    times = arrival_times(arrival, n, times_rng, start_s)
    inputs = input_dist.sample(n, in_rng)
    outputs = output_dist.sample(n, out_rng)
    priorities = np.full(n, PRIORITY_NORMAL, dtype=np.int64)
    n_high = round(priority_share * n)
    if n_high:
        priorities[prio_rng.choice(n, size=n_high, replace=False)] = PRIORITY_HIGH
    result: list[RequestArrival] = []
    for i in range(n):
        input_len, output_len = int(inputs[i]), int(outputs[i])
        if max_model_len is not None:
            input_len, output_len = clip_to_max_len(input_len, output_len, max_model_len)
        result.append(RequestArrival(default_request_id(i), float(times[i]), input_len, output_len, int(priorities[i])))
    return result


def generate(spec: str | WorkloadSpec, seed: int = 0, *, max_model_len: int | None = None) -> list[RequestArrival]:
    """The workload a spec names, deterministic for ``seed`` (a trace ignores it).

    ``max_model_len``, when given, overrides the spec's ``max_len``: every request is clipped to
    input + output <= max_model_len (see ``clip_to_max_len``).
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    limit = max_model_len if max_model_len is not None else parsed.max_model_len
    if isinstance(parsed, SyntheticSpec):
        return synthesize(
            parsed.arrival,
            parsed.input_dist,
            parsed.output_dist,
            parsed.n,
            seed,
            priority_share=parsed.priority_share,
            max_model_len=limit,
        )
    rows = read_trace(Path(parsed.path))
    if parsed.n is not None:
        rows = rows[: parsed.n]
    if parsed.rate_scale != 1.0 or limit is not None:
        rows = [_rescale(r, parsed.rate_scale, limit) for r in rows]
    return rows


def _rescale(arrival: RequestArrival, rate_scale: float, max_model_len: int | None) -> RequestArrival:
    input_len, output_len = arrival.input_len, arrival.output_len
    if max_model_len is not None:
        input_len, output_len = clip_to_max_len(input_len, output_len, max_model_len)
    return replace(
        arrival, arrival_time_s=arrival.arrival_time_s / rate_scale, input_len=input_len, output_len=output_len
    )
