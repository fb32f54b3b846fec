"""SPEC strings: table-driven good and bad specs, determinism, priorities and max_len clipping."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pyllumnix.tools.workload import (
    PRIORITY_HIGH,
    PRIORITY_NORMAL,
    Constant,
    Fixed,
    Gamma,
    LogNormal,
    Poisson,
    Uniform,
    Zipf,
    generate,
    parse_spec,
    write_trace,
)
from pyllumnix.tools.workload.request import RequestArrival, clip_to_max_len
from pyllumnix.tools.workload.spec import SyntheticSpec, TraceSpec


def _synthetic(text: str) -> SyntheticSpec:
    spec = parse_spec(text)
    assert isinstance(spec, SyntheticSpec)
    return spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M-M:poisson:rate=7.5:n=10000", (256, 256, Poisson(7.5), 10000, 0.0, None)),
        ("S-S:gamma:rate=26:cv=4:n=2000:priority_share=0.1", (128, 128, Gamma(26.0, 4.0), 2000, 0.1, None)),
        ("L-L:poisson:rate=3", (512, 512, Poisson(3.0), 10000, 0.0, None)),
        ("S-L:poisson:rate=4.2", (128, 512, Poisson(4.2), 10000, 0.0, None)),
        ("L-S:const:rate=10:max_len=2048", (512, 128, Constant(10.0), 10000, 0.0, 2048)),
        ("s-xl:poisson:rate=1", (128, 1024, Poisson(1.0), 10000, 0.0, None)),
        (" M-M : poisson : rate=2 : n=5 ", (256, 256, Poisson(2.0), 5, 0.0, None)),
    ],
)
def test_paper_trace_specs(text: str, expected: tuple[int, int, object, int, float, int | None]) -> None:
    in_mean, out_mean, arrival, n, share, max_len = expected
    spec = _synthetic(text)
    assert spec.input_dist == Zipf(in_mean) and spec.output_dist == Zipf(out_mean)
    assert spec.arrival == arrival
    assert (spec.n, spec.priority_share, spec.max_model_len) == (n, share, max_len)


def test_other_length_kinds() -> None:
    spec = _synthetic("sharegpt:poisson:rate=3")
    assert isinstance(spec.input_dist, LogNormal) and spec.input_dist.target_mean == 306.0
    assert isinstance(spec.output_dist, LogNormal) and spec.output_dist.target_mean == 500.0
    spec = _synthetic("burstgpt:gamma:rate=1:cv=2:in_mean=700:out_sigma=0.5:len_max=4096")
    assert spec.input_dist == LogNormal(700.0, 1.2, max_len=4096)
    assert spec.output_dist == LogNormal(350.0, 0.5, max_len=4096)
    spec = _synthetic("fixed:const:rate=1:in=128:out=64:n=8")
    assert (spec.input_dist, spec.output_dist) == (Fixed(128), Fixed(64))
    spec = _synthetic("uniform:poisson:rate=1:in_min=1:in_max=10:out_min=5:out_max=6")
    assert (spec.input_dist, spec.output_dist) == (Uniform(1, 10), Uniform(5, 6))
    spec = _synthetic("zipf:poisson:rate=1:in_mean=128:out_mean=300:out_alpha=1.2:support=6144")
    assert spec.input_dist == Zipf(128, None, 6144) and spec.output_dist == Zipf(300, 1.2, 6144)
    spec = _synthetic("M-M:poisson:rate=1:support=6144:len_max=4096")
    assert spec.input_dist == Zipf(256, None, 6144, 4096)


def test_trace_spec_path_takes_the_rest() -> None:
    spec = parse_spec("trace:n=5:rate_scale=2:path=/tmp/a:b.csv")
    assert spec == TraceSpec("trace:n=5:rate_scale=2:path=/tmp/a:b.csv", "/tmp/a:b.csv", 5, 2.0, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("M-M", "expected LENGTHS:ARRIVAL"),
        ("X-M:poisson:rate=1", "unknown lengths 'X-M'"),
        ("M-M-M:poisson:rate=1", "unknown lengths"),
        ("M-M:weibull:rate=1", "unknown arrival process 'weibull'"),
        ("M-M:poisson", "poisson arrivals needs rate="),
        ("M-M:gamma:rate=1", "gamma arrivals needs cv="),
        ("M-M:poisson:rate=fast", "rate='fast' is not a number"),
        ("M-M:poisson:rate=nan", "must be finite"),
        ("M-M:poisson:rate=0", "rate must be a finite number > 0"),
        ("M-M:poisson:rate=-2", "rate must be a finite number > 0"),
        ("M-M:gamma:rate=1:cv=0", "cv must be"),
        ("M-M:poisson:rate=1:n=1e4", "n='1e4' is not an integer"),
        ("M-M:poisson:rate=1:n=-1", "n must be >= 0"),
        ("M-M:poisson:rate=1:cv=2", "unknown key.*cv"),
        ("M-M:poisson:rate=1:seed=3", "unknown key.*seed"),
        ("M-M:poisson:rate=1:rate=2", "key 'rate' given twice"),
        ("M-M:poisson:rate", "expected key=value, got 'rate'"),
        ("M-M:poisson:=3", "expected key=value"),
        ("M-M:poisson:rate=1:priority_share=1.5", r"priority_share must be in \[0, 1\]"),
        ("M-M:poisson:rate=1:max_len=1", "max_len must be >= 2"),
        ("M-M:poisson:rate=1:in=5", "unknown key.*in "),
        ("fixed:poisson:rate=1:in=5", "fixed needs out="),
        ("fixed:poisson:rate=1:in=0:out=1", "fixed length must be >= 1"),
        ("uniform:poisson:rate=1:in_min=5:in_max=4:out_min=1:out_max=1", "low <= high"),
        ("zipf:poisson:rate=1:in_mean=300:out_mean=128", "no paper Zipf exponent for mean 300"),
        ("sharegpt:poisson:rate=1:support=10", "unknown key.*support"),
        ("trace", "a trace needs path=FILE"),
        ("trace:path=", "a trace needs path=FILE"),
        ("trace:path=a.csv:n=x", None),  # the path swallows ':n=x'; the missing file surfaces only on generate
        ("trace:rate_scale=0:path=a.csv", "rate_scale must be > 0"),
        ("trace:priority_share=0.1:path=a.csv", "unknown key.*priority_share"),
    ],
)
def test_bad_specs(text: str, message: str | None) -> None:
    if message is None:
        assert isinstance(parse_spec(text), TraceSpec)
        return
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


def test_error_names_the_spec() -> None:
    with pytest.raises(ValueError, match=r"workload spec 'M-M:poisson:rate=x'"):
        parse_spec("M-M:poisson:rate=x")


def test_generate_is_deterministic_and_sorted() -> None:
    a = generate("S-S:gamma:rate=26:cv=4:n=500:priority_share=0.1", seed=7)
    b = generate("S-S:gamma:rate=26:cv=4:n=500:priority_share=0.1", seed=7)
    c = generate("S-S:gamma:rate=26:cv=4:n=500:priority_share=0.1", seed=8)
    assert a == b
    assert a != c
    assert len(a) == 500
    assert [r.request_id for r in a[:2]] == ["req-000000", "req-000001"]
    assert all(x.arrival_time_s <= y.arrival_time_s for x, y in itertools.pairwise(a))


def test_arrivals_do_not_depend_on_lengths() -> None:
    # Independent child streams: swapping the length distribution keeps the arrival times (and priorities).
    a = generate("S-S:poisson:rate=5:n=200:priority_share=0.2", seed=3)
    b = generate("L-L:poisson:rate=5:n=200:priority_share=0.2", seed=3)
    assert [r.arrival_time_s for r in a] == [r.arrival_time_s for r in b]
    assert [r.priority for r in a] == [r.priority for r in b]


def test_priority_share_is_exact() -> None:
    workload = generate("S-S:gamma:rate=26:cv=2:n=2000:priority_share=0.1", seed=0)
    assert sum(r.priority == PRIORITY_HIGH for r in workload) == 200
    assert all(r.priority in (PRIORITY_NORMAL, PRIORITY_HIGH) for r in workload)
    assert all(r.priority == PRIORITY_NORMAL for r in generate("S-S:poisson:rate=1:n=50", seed=0))


def test_priority_values_match_the_proto_enum() -> None:
    from pyllumnix.protos.llumnix.v1 import common_pb2

    assert PRIORITY_NORMAL == common_pb2.PRIORITY_NORMAL
    assert PRIORITY_HIGH == common_pb2.PRIORITY_HIGH


def test_generated_rate_and_mean_lengths() -> None:
    workload = generate("M-M:poisson:rate=7.5:n=20000", seed=11)
    span = workload[-1].arrival_time_s - workload[0].arrival_time_s
    assert (len(workload) - 1) / span == pytest.approx(7.5, rel=0.03)
    assert np.mean([r.input_len for r in workload]) == pytest.approx(256, rel=0.08)
    assert np.mean([r.output_len for r in workload]) == pytest.approx(256, rel=0.08)


def test_max_len_clipping() -> None:
    # clip_to_max_len: prompt first capped to max - 1, then output to what is left.
    assert clip_to_max_len(100, 50, 2048) == (100, 50)
    assert clip_to_max_len(2000, 100, 2048) == (2000, 48)
    assert clip_to_max_len(5000, 100, 2048) == (2047, 1)
    workload = generate("L-L:poisson:rate=3:n=3000:max_len=2048", seed=1)
    assert all(r.input_len + r.output_len <= 2048 and r.output_len >= 1 for r in workload)
    assert any(r.input_len + r.output_len == 2048 for r in workload)
    # The keyword overrides the spec's max_len.
    tighter = generate("L-L:poisson:rate=3:n=3000:max_len=2048", seed=1, max_model_len=1024)
    assert max(r.input_len + r.output_len for r in tighter) == 1024


def test_fixed_const_workload_exactly() -> None:
    assert generate("fixed:const:rate=2:in=3:out=4:n=3", seed=0) == [
        RequestArrival("req-000000", 0.0, 3, 4, PRIORITY_NORMAL),
        RequestArrival("req-000001", 0.5, 3, 4, PRIORITY_NORMAL),
        RequestArrival("req-000002", 1.0, 3, 4, PRIORITY_NORMAL),
    ]


def test_trace_spec_replays_a_file(tmp_path: Path) -> None:
    original = generate("S-L:poisson:rate=4:n=30:priority_share=0.5", seed=2)
    path = tmp_path / "w.csv"
    write_trace(path, original)
    assert generate(f"trace:path={path}") == original
    halved = generate(f"trace:n=10:rate_scale=2:max_len=300:path={path}", seed=99)
    assert len(halved) == 10
    for got, want in zip(halved, original, strict=False):
        assert got.arrival_time_s == pytest.approx(want.arrival_time_s / 2)
        assert got.input_len + got.output_len <= 300
        assert got.priority == want.priority
    with pytest.raises(FileNotFoundError):
        generate(f"trace:path={tmp_path / 'missing.csv'}")
