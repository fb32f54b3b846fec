"""Trace files: a workload saved as CSV or JSONL, so an exact request sequence can be replayed or shared.

Columns (CSV header / JSON keys): ``arrival_time`` (seconds, non-decreasing), ``input_len``, ``output_len``, and
optionally ``priority`` (1 normal, 2 high; default 1) and ``request_id`` (default ``req-<row index>``). Unknown
columns are rejected so a typo cannot silently drop data. Errors name the file's line number.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

from pyllumnix.tools.workload.request import PRIORITIES, PRIORITY_NORMAL, RequestArrival

TraceFormat = Literal["csv", "jsonl"]
REQUIRED_COLUMNS = ("arrival_time", "input_len", "output_len")
OPTIONAL_COLUMNS = ("priority", "request_id")
WRITE_COLUMNS = ("request_id", "arrival_time", "input_len", "output_len", "priority")


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


def default_request_id(index: int) -> str:
    return f"req-{index:06d}"


def detect_format(path: str | Path) -> TraceFormat:
    """The format from the file extension: ``.csv`` or ``.jsonl`` / ``.ndjson``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise ValueError(f"{path}: cannot tell the trace format from the extension {suffix!r}; use .csv or .jsonl")


def _as_int(value: object, column: str, where: str) -> int:
    if isinstance(value, bool):
        raise TraceFormatError(f"{where}: {column} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise TraceFormatError(f"{where}: {column} must be an integer, got {value!r}")


def _as_float(value: object, column: str, where: str) -> float:
    if isinstance(value, bool):
        raise TraceFormatError(f"{where}: {column} must be a number, got {value!r}")
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise TraceFormatError(f"{where}: {column} must be a number, got {value!r}") from None
    else:
        raise TraceFormatError(f"{where}: {column} must be a number, got {value!r}")
    if not math.isfinite(result):
        raise TraceFormatError(f"{where}: {column} must be finite, got {value!r}")
    return result


def _rows_to_arrivals(rows: Iterable[tuple[int, Mapping[str, object]]], source: str) -> list[RequestArrival]:
    arrivals: list[RequestArrival] = []
    seen_ids: set[str] = set()
    previous = 0.0
    for line, row in rows:
        where = f"{source}:{line}"
        missing = [c for c in REQUIRED_COLUMNS if row.get(c) in (None, "")]
        if missing:
            raise TraceFormatError(f"{where}: missing {', '.join(missing)}")
        unknown = sorted(set(row) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
        if unknown:
            raise TraceFormatError(f"{where}: unknown column(s) {', '.join(unknown)}")
        arrival = _as_float(row["arrival_time"], "arrival_time", where)
        input_len = _as_int(row["input_len"], "input_len", where)
        output_len = _as_int(row["output_len"], "output_len", where)
        raw_priority = row.get("priority")
        priority = PRIORITY_NORMAL if raw_priority in (None, "") else _as_int(raw_priority, "priority", where)
        raw_id = row.get("request_id")
        request_id = default_request_id(len(arrivals)) if raw_id in (None, "") else str(raw_id)
        if arrival < 0.0:
            raise TraceFormatError(f"{where}: arrival_time must be >= 0, got {arrival}")
        if arrival < previous:
            raise TraceFormatError(
                f"{where}: arrival_time {arrival} is earlier than the previous row's {previous} (sort the trace)"
            )
        if input_len < 1 or output_len < 1:
            raise TraceFormatError(f"{where}: input_len and output_len must be >= 1, got {input_len}, {output_len}")
        if priority not in PRIORITIES:
            raise TraceFormatError(f"{where}: priority must be one of {PRIORITIES}, got {priority}")
        if request_id in seen_ids:
            raise TraceFormatError(f"{where}: duplicate request_id {request_id!r}")
        seen_ids.add(request_id)
        previous = arrival
        arrivals.append(RequestArrival(request_id, arrival, input_len, output_len, priority))
    return arrivals


def _csv_rows(text: str, source: str) -> Iterator[tuple[int, Mapping[str, object]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    for fields in reader:
        if not fields or all(not f.strip() for f in fields):
            continue
        if header is None:
            header = [f.strip() for f in fields]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise TraceFormatError(
                    f"{source}:{reader.line_num}: header lacks {', '.join(missing)} (got {', '.join(header)})"
                )
            if len(set(header)) != len(header):
                raise TraceFormatError(f"{source}:{reader.line_num}: duplicate column in header")
            continue
        if len(fields) != len(header):
            raise TraceFormatError(
                f"{source}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}"
            )
        yield reader.line_num, dict(zip(header, fields, strict=True))


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[int, Mapping[str, object]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(f"{source}:{line_no}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TraceFormatError(f"{source}:{line_no}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row


def parse_trace(text: str, fmt: TraceFormat, source: str = "<trace>") -> list[RequestArrival]:
    """Parse trace text; ``source`` names it in error messages."""
    rows = _csv_rows(text, source) if fmt == "csv" else _jsonl_rows(text, source)
    return _rows_to_arrivals(rows, source)


def read_trace(path: str | Path, fmt: TraceFormat | None = None) -> list[RequestArrival]:
    """Read a CSV or JSONL trace (format from the extension unless given)."""
    fmt = fmt or detect_format(path)
    return parse_trace(Path(path).read_text(encoding="utf-8"), fmt, source=str(path))


def format_trace(arrivals: Iterable[RequestArrival], fmt: TraceFormat) -> str:
    """Trace text for ``arrivals``; floats use ``repr`` so a read-back is exact."""
    rows = [
        {
            "request_id": a.request_id,
            "arrival_time": a.arrival_time_s,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "priority": a.priority,
        }
        for a in arrivals
    ]
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=WRITE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "arrival_time": repr(row["arrival_time"])})
    return out.getvalue()


def write_trace(path: str | Path, arrivals: Iterable[RequestArrival], fmt: TraceFormat | None = None) -> None:
    """Write ``arrivals`` as a CSV or JSONL trace (format from the extension unless given)."""
    fmt = fmt or detect_format(path)
    Path(path).write_text(format_trace(arrivals, fmt), encoding="utf-8")
