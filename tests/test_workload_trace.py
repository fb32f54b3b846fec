"""Trace files round-trip exactly through CSV and JSONL, and malformed rows fail with their line number."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyllumnix.tools.workload import TraceFormatError, generate, read_trace, write_trace
from pyllumnix.tools.workload.request import PRIORITY_HIGH, PRIORITY_NORMAL, RequestArrival
from pyllumnix.tools.workload.trace import detect_format, format_trace, parse_trace


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    workload = generate("S-S:gamma:rate=26:cv=4:n=300:priority_share=0.1", seed=5)
    path = tmp_path / f"trace{suffix}"
    write_trace(path, workload)
    assert read_trace(path) == workload  # floats written with repr: exact


def test_minimal_csv_defaults() -> None:
    text = "arrival_time,input_len,output_len\n0,10,20\n\n1.5,11,21\n"
    assert parse_trace(text, "csv") == [
        RequestArrival("req-000000", 0.0, 10, 20, PRIORITY_NORMAL),
        RequestArrival("req-000001", 1.5, 11, 21, PRIORITY_NORMAL),
    ]


def test_columns_in_any_order_and_optional_priority() -> None:
    text = "priority,output_len,input_len,arrival_time\n2,5,6,0.25\n,7,8,0.5\n"
    assert parse_trace(text, "csv") == [
        RequestArrival("req-000000", 0.25, 6, 5, PRIORITY_HIGH),
        RequestArrival("req-000001", 0.5, 8, 7, PRIORITY_NORMAL),
    ]


def test_jsonl_minimal() -> None:
    text = (
        '{"arrival_time": 0, "input_len": 3, "output_len": 4}\n\n'
        '{"arrival_time": 2, "input_len": 5, "output_len": 6, "priority": 2, "request_id": "x"}\n'
    )
    assert parse_trace(text, "jsonl") == [
        RequestArrival("req-000000", 0.0, 3, 4, PRIORITY_NORMAL),
        RequestArrival("x", 2.0, 5, 6, PRIORITY_HIGH),
    ]


HEADER = "arrival_time,input_len,output_len,priority\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input_len,output_len\n1,2\n", r"t\.csv:1: header lacks arrival_time"),
        (HEADER + "0,1,2,1\n1,abc,2,1\n", r"t\.csv:3: input_len must be an integer, got 'abc'"),
        (HEADER + "0,1.5,2,1\n", r"t\.csv:2: input_len must be an integer"),
        (HEADER + "x,1,2,1\n", r"t\.csv:2: arrival_time must be a number"),
        (HEADER + "inf,1,2,1\n", r"t\.csv:2: arrival_time must be finite"),
        (HEADER + "-1,1,2,1\n", r"t\.csv:2: arrival_time must be >= 0"),
        (HEADER + "0,1,2,1\n\n0,1,2\n", r"t\.csv:4: expected 4 fields"),
        (HEADER + "0,1,2,3\n", r"t\.csv:2: priority must be one of"),
        (HEADER + "0,0,2,1\n", r"t\.csv:2: input_len and output_len must be >= 1"),
        (HEADER + "0,1,,1\n", r"t\.csv:2: missing output_len"),
        (HEADER + "2,1,2,1\n1,1,2,1\n", r"t\.csv:3: arrival_time 1\.0 is earlier than the previous row's 2\.0"),
        ("arrival_time,input_len,output_len,colour\n0,1,2,red\n", r"t\.csv:2: unknown column\(s\) colour"),
        ("arrival_time,input_len,output_len,input_len\n0,1,2,3\n", r"t\.csv:1: duplicate column"),
        ("request_id,arrival_time,input_len,output_len\na,0,1,2\na,1,1,2\n", r"t\.csv:3: duplicate request_id 'a'"),
    ],
)
def test_malformed_csv(text: str, message: str) -> None:
    with pytest.raises(TraceFormatError, match=message):
        parse_trace(text, "csv", source="t.csv")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"arrival_time": 0, "input_len": 1, "output_len": 2}\n{"arrival_time": 1,\n', r"t:2: invalid JSON"),
        ("[1, 2, 3]\n", r"t:1: expected a JSON object, got list"),
        ('\n{"arrival_time": 0, "input_len": 1}\n', r"t:2: missing output_len"),
        ('{"arrival_time": 0, "input_len": 1.0, "output_len": 2}\n', r"t:1: input_len must be an integer, got 1\.0"),
        ('{"arrival_time": 0, "input_len": true, "output_len": 2}\n', r"t:1: input_len must be an integer"),
        ('{"arrival_time": NaN, "input_len": 1, "output_len": 2}\n', r"t:1: arrival_time must be finite"),
        ('{"arrival_time": [0], "input_len": 1, "output_len": 2}\n', r"t:1: arrival_time must be a number"),
    ],
)
def test_malformed_jsonl(text: str, message: str) -> None:
    with pytest.raises(TraceFormatError, match=message):
        parse_trace(text, "jsonl", source="t")


def test_read_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "0,1,2,1\n0,1,x,1\n")
    with pytest.raises(TraceFormatError, match=r"bad\.csv:3: output_len"):
        read_trace(path)


def test_format_detection() -> None:
    assert detect_format("a.CSV") == "csv"
    assert detect_format("a.ndjson") == "jsonl"
    with pytest.raises(ValueError, match=r"use \.csv or \.jsonl"):
        detect_format("a.txt")


def test_csv_text_layout() -> None:
    text = format_trace([RequestArrival("r", 0.1, 2, 3, PRIORITY_HIGH)], "csv")
    assert text == "request_id,arrival_time,input_len,output_len,priority\nr,0.1,2,3,2\n"
