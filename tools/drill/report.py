"""What the drill recorded, how it is judged, and how it is shown (pure: no I/O but rendering to a console).

Each request's stream is recorded as a :class:`RequestRecord` and classified against the fault-free reference run of
the same catalog entry (same prompt, seed and max_tokens give the same tokens on the sim engine):

- ``finished``: the final message arrived with reason stop/length and the status is OK;
- ``error``: the stream ended with a clear error (a gRPC status with a message, or a final message with reason
  ERROR and a cause); it is *allowed* or *unexpected* depending on the fault (:class:`AllowedErrors`);
- ``lost``: it ended without finishing and without an error (status OK with no final message, a final message with no
  cause, a connection dropped under it);
- ``hung``: no final message within the per-request deadline the drill set.

Independently, a stream is ``altered`` when its tokens are not exactly the reference's (for an unfinished stream:
not a prefix of it), or when its token indexes skipped or repeated.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pyllumnix.tools.drill.scenarios import (
    ETCD_RECOVERY_DEADLINE_S,
    LEADER_DEADLINE_S,
    REJOIN_DEADLINE_S,
    AllowedErrors,
    Scenario,
)

FINISHED = "finished"
ERROR = "error"
LOST = "lost"
HUNG = "hung"

# How grpc core's own status details begin when the connection itself broke (an answer of the frontend begins with
# its own words, even when it quotes such a message further on).
_TRANSPORT_DROP = re.compile(
    r"^\s*(socket closed|connection reset|broken pipe|goaway|stream removed|connection refused|failed to connect"
    r"|keepalive|end of tcp stream|recvmsg|sendmsg|connection aborted|received rst_stream|ipv[46]:)",
    re.IGNORECASE,
)
# Codes with which a frontend refuses a request before placing it (HTTP 503 and 429).
REJECT_CODES = {"UNAVAILABLE": AllowedErrors.UNAVAILABLE_REJECT, "RESOURCE_EXHAUSTED": AllowedErrors.OVERLOAD_REJECT}


@dataclass
class RequestRecord:
    """One stream as the drill's client saw it. Times are seconds on the drill's clock (monotonic)."""

    request_id: str
    # Index into the request catalog (which reference it is compared with); "burst" streams use the burst catalog.
    catalog: str
    index: int
    sent_at: float
    first_token_at: float | None = None
    ended_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    # Messages whose first_token_index was not the number of tokens already received (a gap or a duplicate).
    index_errors: int = 0
    max_token_gap_s: float = 0.0
    # The final message's reason ("stop", "length", "error", "abort"), None when none arrived.
    finish_reason: str | None = None
    # gRPC status name at the end ("OK", "INTERNAL", ...), "" when the deadline cut the stream.
    status: str = ""
    # The status details, or the error a final ERROR message carried.
    error: str = ""
    instances: list[str] = field(default_factory=list)
    deadline_hit: bool = False
    # The "retry-after" trailer of an error status (the frontend sets it on refusals a client should retry).
    retry_after: str | None = None


@dataclass(frozen=True)
class Classification:
    outcome: str
    altered: bool
    # For errors: whether the fault allows it.
    allowed: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ErrorPolicy:
    """Which errors a scenario allows; ``killed_instances`` names the llumlets the fault killed."""

    allowed: AllowedErrors = AllowedErrors.NONE
    killed_instances: tuple[str, ...] = ()


def classify(record: RequestRecord, reference: Sequence[int] | None, policy: ErrorPolicy) -> Classification:
    """Judges one stream (module docstring); ``reference`` None means the reference run had no such entry."""
    tokens = record.token_ids
    if reference is None:
        altered = True
    else:
        altered = record.index_errors > 0 or (
            list(reference) != tokens if _is_finished(record) else list(reference[: len(tokens)]) != tokens
        )
    if record.deadline_hit:
        return Classification(HUNG, altered, reason="no final message within the deadline")
    if _is_finished(record):
        return Classification(FINISHED, altered)
    error = record.error.strip()
    if record.status in ("", "OK") and record.finish_reason is None:
        return Classification(LOST, altered, reason="stream ended without a final message or an error")
    if record.status == "DEADLINE_EXCEEDED":
        return Classification(HUNG, altered, reason="gRPC deadline exceeded")
    if record.status in ("UNAVAILABLE", "CANCELLED", "UNKNOWN") and (not error or _TRANSPORT_DROP.search(error)):
        return Classification(LOST, altered, reason=f"connection dropped: {record.status} {error}".strip())
    if not error:
        return Classification(LOST, altered, reason=f"ended ({record.status}, {record.finish_reason}) with no cause")
    return Classification(ERROR, altered, _error_allowed(record, policy), f"{record.status}: {error}")


def _is_finished(record: RequestRecord) -> bool:
    return record.finish_reason in ("stop", "length") and record.status == "OK" and not record.deadline_hit


def _rejected(record: RequestRecord) -> bool:
    """Refused before its first token (an admission or placement refusal, not a failure mid-stream)."""
    return record.first_token_at is None and not record.token_ids


def _error_allowed(record: RequestRecord, policy: ErrorPolicy) -> bool:
    rejected = _rejected(record)
    if policy.allowed is AllowedErrors.ANY_CLEAR:
        return True
    if policy.allowed is AllowedErrors.KILLED_INSTANCE:
        return any(instance and instance in record.error for instance in policy.killed_instances)
    if policy.allowed in (AllowedErrors.UNAVAILABLE_REJECT, AllowedErrors.OVERLOAD_REJECT):
        return rejected and REJECT_CODES.get(record.status) is policy.allowed
    return False


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ProbeRecord:
    """One HTTP probe (a small non-streaming completion) sent while a fault was active."""

    sent_at: float
    status: int
    retry_after: str | None
    elapsed_s: float
    error: str = ""


@dataclass
class FaultRecord:
    """What the fault injector did and observed. Times on the drill's clock."""

    scenario: str
    target: str = ""
    injected_at: float | None = None
    # SIGCONT of a stall/pause (None for kills).
    resumed_at: float | None = None
    old_leader: str = ""
    new_leader: str = ""
    # From the fault to a replica answering as the new leader.
    time_to_new_leader_s: float | None = None
    # From SIGCONT (or the kill) to the stalled/killed part serving again (leader agreed, instance registered, ...).
    recovery_s: float | None = None
    killed_instances: list[str] = field(default_factory=list)
    # Llumlets that exited on their own during the scenario.
    exited_llumlets: list[str] = field(default_factory=list)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)
    # The leader before the scenario and after it ended ("replica (term N)"): a fault that is not about the leader
    # may still cost an election (etcd paused past the election lease), which this shows.
    leader_before: str = ""
    leader_after: str = ""
    # Wall time of the whole scenario (load, fault, waiting for every stream, blocks).
    duration_s: float = 0.0


@dataclass
class BlockReport:
    """KV blocks still held per instance once every stream ended (and the settle time passed)."""

    used_blocks: dict[str, int] = field(default_factory=dict)
    requests: dict[str, list[str]] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    settle_s: float = 0.0

    @property
    def leaked(self) -> int:
        return sum(self.used_blocks.values())


@dataclass
class ScenarioResult:
    scenario: Scenario
    fault: FaultRecord
    records: list[RequestRecord]
    classifications: list[Classification]
    blocks: BlockReport
    probes: list[ProbeRecord]
    checks: list[Check]
    started_at: float
    healthy_before: bool = True

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def count(self, outcome: str, *, allowed: bool | None = None) -> int:
        return sum(
            1 for c in self.classifications if c.outcome == outcome and (allowed is None or c.allowed == allowed)
        )

    def _pairs(self) -> list[tuple[RequestRecord, Classification]]:
        return list(zip(self.records, self.classifications, strict=True))

    @property
    def altered(self) -> int:
        return sum(1 for c in self.classifications if c.altered)

    def to_json(self) -> dict[str, Any]:
        ttfts = [r.first_token_at - r.sent_at for r in self.records if r.first_token_at is not None]
        rel = self.started_at
        fault = asdict(self.fault)
        for key in ("injected_at", "resumed_at"):
            if fault[key] is not None:
                fault[key] = round(fault[key] - rel, 3)
        failures = [
            {
                "request_id": r.request_id,
                "outcome": c.outcome,
                "altered": c.altered,
                "allowed": c.allowed,
                "reason": c.reason,
                "tokens": len(r.token_ids),
                "instances": r.instances,
                "sent_at": round(r.sent_at - rel, 3),
            }
            for r, c in zip(self.records, self.classifications, strict=True)
            if c.outcome != FINISHED or c.altered
        ]
        # What fails the scenario first (the list is cut at 50; a burst may bring hundreds of allowed refusals).
        failures.sort(key=lambda f: (f["allowed"] and not f["altered"], f["sent_at"]))
        return {
            "scenario": self.scenario.label,
            "passed": self.passed,
            "healthy_before": self.healthy_before,
            "requests": len(self.records),
            "finished": self.count(FINISHED),
            "errors_allowed": self.count(ERROR, allowed=True),
            "errors_unexpected": self.count(ERROR, allowed=False),
            "lost": self.count(LOST),
            "hung": self.count(HUNG),
            "altered": self.altered,
            "time_to_new_leader_s": _round(self.fault.time_to_new_leader_s),
            "recovery_s": _round(self.fault.recovery_s),
            "longest_first_token_gap_s": _round(longest_first_token_gap(self.records)),
            "max_ttft_s": _round(max(ttfts, default=None)),
            "median_ttft_s": _round(statistics.median(ttfts) if ttfts else None),
            "max_token_gap_s": _round(max((r.max_token_gap_s for r in self.records), default=None)),
            "blocks_held": self.blocks.used_blocks,
            "requests_held": self.blocks.requests,
            "blocks_unreachable": self.blocks.unreachable,
            "blocks_settle_s": round(self.blocks.settle_s, 3),
            "refusals": {
                "count": sum(1 for r, c in self._pairs() if c.outcome == ERROR and _rejected(r)),
                "by_status": _count_by(r.status for r, c in self._pairs() if c.outcome == ERROR and _rejected(r)),
                "without_retry_after": sum(
                    1 for r, c in self._pairs() if c.outcome == ERROR and _rejected(r) and not r.retry_after
                ),
            },
            "probes": {
                "sent": len(self.probes),
                "by_status": _count_by(str(p.status) for p in self.probes),
                "without_retry_after_503": sum(1 for p in self.probes if p.status == 503 and not p.retry_after),
            },
            "fault": fault,
            "checks": [asdict(c) for c in self.checks],
            "failures": failures[:50],
            "failures_left_off": max(0, len(failures) - 50),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _count_by(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def longest_first_token_gap(records: Sequence[RequestRecord]) -> float | None:
    """Longest stretch, from the first request sent, with no stream receiving its first token.

    Measured up to the last first token; when requests sent after it never got one (they failed or hung), the
    stretch runs on to the end of the last of those, so a cluster that stopped serving shows the whole outage.
    """
    if not records:
        return None
    start = min(r.sent_at for r in records)
    firsts = sorted(r.first_token_at for r in records if r.first_token_at is not None)
    points = [start, *firsts]
    last_first = points[-1]
    unserved = [r.ended_at or r.sent_at for r in records if r.first_token_at is None and r.sent_at >= last_first]
    if unserved:
        points.append(max(unserved))
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def judge(
    scenario: Scenario,
    fault: FaultRecord,
    records: list[RequestRecord],
    references: dict[tuple[str, int], list[int]],
    blocks: BlockReport,
    probes: list[ProbeRecord],
    started_at: float,
    *,
    healthy_before: bool = True,
) -> ScenarioResult:
    """Classifies every stream and computes the scenario's checks (the acceptance criteria of issue #12)."""
    policy = ErrorPolicy(scenario.kind.allowed_errors, tuple(fault.killed_instances))
    classes = [classify(r, references.get((r.catalog, r.index)), policy) for r in records]
    result = ScenarioResult(scenario, fault, records, classes, blocks, probes, [], started_at, healthy_before)
    checks = result.checks
    if fault.skipped:
        checks.append(Check("scenario ran", False, fault.skipped))
        return result
    checks.append(Check("cluster healthy before the fault", healthy_before, "" if healthy_before else "see notes"))
    checks.append(_zero("no request lost", result.count(LOST), classes, LOST))
    checks.append(_zero("no request hung", result.count(HUNG), classes, HUNG))
    altered = [c for c in classes if c.altered]
    checks.append(Check("no stream altered", not altered, f"{len(altered)} streams differ from the reference"))
    unexpected = [c for c in classes if c.outcome == ERROR and not c.allowed]
    checks.append(
        Check(
            f"errors only where allowed ({scenario.kind.allowed_errors.value})",
            not unexpected,
            f"{len(unexpected)} unexpected: {_sample(c.reason for c in unexpected)}" if unexpected else "",
        )
    )
    finished_after = [
        r
        for r, c in zip(records, classes, strict=True)
        if c.outcome == FINISHED and r.sent_at >= (fault.resumed_at or fault.injected_at or 0.0)
    ]
    checks.append(
        Check(
            "served after the fault",
            bool(finished_after),
            f"{len(finished_after)} streams sent after the fault finished",
        )
    )
    held = {k: v for k, v in blocks.used_blocks.items() if v}
    checks.append(
        Check(
            "no KV blocks held afterwards",
            not held and not any(blocks.requests.values()),
            f"held: {held} requests: {blocks.requests}" if held or any(blocks.requests.values()) else "",
        )
    )
    if scenario.fault == "leader-stall":
        # A stalled leader may keep its lease (the election lease can outlive a short stall) or be replaced; either
        # way exactly one replica must answer as leader soon after it runs again.
        t = fault.recovery_s
        checks.append(
            Check(
                f"one leader within {LEADER_DEADLINE_S:g} s after the stall",
                t is not None and t <= LEADER_DEADLINE_S,
                f"{t:.2f} s" if t is not None else "no single leader seen",
            )
        )
    elif scenario.kind.replaces_leader:
        t = fault.time_to_new_leader_s
        checks.append(
            Check(
                f"new leader within {LEADER_DEADLINE_S:g} s",
                t is not None and t <= LEADER_DEADLINE_S,
                f"{t:.2f} s" if t is not None else "no new leader seen",
            )
        )
    if scenario.fault == "llumlet-stall":
        t = fault.recovery_s
        checks.append(
            Check(
                f"stalled llumlet serving again within {REJOIN_DEADLINE_S:g} s",
                t is not None and t <= REJOIN_DEADLINE_S,
                f"{t:.2f} s" if t is not None else "not registered again",
            )
        )
    checks.append(Check("no llumlet exited on its own", not fault.exited_llumlets, ", ".join(fault.exited_llumlets)))
    if scenario.fault == "etcd-pause":
        paused = fault.injected_at or 0.0
        inflight = [
            (r, c)
            for r, c in zip(records, classes, strict=True)
            if r.first_token_at is not None and r.first_token_at < paused and (r.ended_at or paused) > paused
        ]
        broken = [c for _, c in inflight if c.outcome != FINISHED]
        checks.append(
            Check(
                "in-flight streams finished",
                not broken,
                f"{len(inflight) - len(broken)}/{len(inflight)} finished; {_sample(c.reason for c in broken)}",
            )
        )
        no_retry = sum(1 for p in probes if p.status == 503 and not p.retry_after)
        bad = [p for p in probes if p.status not in (200, 503)]
        refused = [(r, c) for r, c in zip(records, classes, strict=True) if c.outcome == ERROR and _rejected(r)]
        grpc_no_retry = sum(1 for r, _ in refused if r.status == "UNAVAILABLE" and not r.retry_after)
        checks.append(
            Check(
                "new requests served or answered 503 + Retry-After",
                no_retry == 0 and not bad and grpc_no_retry == 0,
                f"HTTP: {len(probes)} probes, {no_retry} 503 without Retry-After, other: "
                f"{_sample(f'{p.status} {p.error}' for p in bad)}; gRPC: {len(refused)} refused, "
                f"{grpc_no_retry} UNAVAILABLE without a retry-after trailer",
            )
        )
        t = fault.recovery_s
        checks.append(
            Check(
                f"full service within {ETCD_RECOVERY_DEADLINE_S:g} s after etcd returns",
                t is not None and t <= ETCD_RECOVERY_DEADLINE_S,
                f"{t:.2f} s" if t is not None else "not recovered",
            )
        )
    return result


def _zero(name: str, n: int, classes: Sequence[Classification], outcome: str) -> Check:
    return Check(name, n == 0, f"{n}: {_sample(c.reason for c in classes if c.outcome == outcome)}" if n else "")


def _sample(reasons: Iterable[str], k: int = 3) -> str:
    """The ``k`` most common reasons with their counts (reasons often repeat across a fault's requests)."""
    counts = _count_by(r[:200] for r in reasons)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
    return "; ".join(f"{n}x {r}" for r, n in ranked)


@dataclass
class DrillReport:
    config: dict[str, Any]
    reference: dict[str, Any]
    results: list[ScenarioResult]
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.results) and all(r.passed for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "error": self.error,
            "config": self.config,
            "reference": self.reference,
            "scenarios": [r.to_json() for r in self.results],
        }


def render(report: DrillReport, console: Any) -> None:
    """The readable summary: one row per scenario, then every failed check (``console`` is a rich Console)."""
    from rich.table import Table

    table = Table(title="llumnix drill", show_lines=False)
    for col in ("scenario", "verdict", "reqs", "ok", "err ok/bad", "lost", "hung", "altered", "leader s", "gap s"):
        table.add_column(col, justify="right" if col not in ("scenario", "verdict") else "left")
    table.add_column("blocks held", justify="right")
    for r in report.results:
        j = r.to_json()
        verdict = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        if r.fault.skipped:
            verdict = "[yellow]SKIP[/yellow]"
        table.add_row(
            j["scenario"],
            verdict,
            str(j["requests"]),
            str(j["finished"]),
            f"{j['errors_allowed']}/{j['errors_unexpected']}",
            str(j["lost"]),
            str(j["hung"]),
            str(j["altered"]),
            _fmt(j["time_to_new_leader_s"]),
            _fmt(j["longest_first_token_gap_s"]),
            str(r.blocks.leaked),
        )
    console.print(table)
    for r in report.results:
        for c in r.checks:
            if not c.passed:
                console.print(f"[red]✗[/red] {r.scenario.label}: {c.name}" + (f" — {c.detail}" if c.detail else ""))
        for note in r.fault.notes:
            console.print(f"  {r.scenario.label}: {note}")
        if r.fault.leader_before != r.fault.leader_after:
            console.print(f"  {r.scenario.label}: leader {r.fault.leader_before} -> {r.fault.leader_after}")
    if report.error:
        console.print(f"[red]drill error:[/red] {report.error}")
    console.print("[green]drill passed[/green]" if report.passed else "[red]drill failed[/red]")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
