"""The drill's verdict from recorded outcomes: classification against the reference, the gap measure, the checks."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from pyllumnix.tools.drill.report import (
    ERROR,
    FINISHED,
    HUNG,
    LOST,
    BlockReport,
    Check,
    DrillReport,
    ErrorPolicy,
    FaultRecord,
    ProbeRecord,
    RequestRecord,
    classify,
    judge,
    longest_first_token_gap,
    render,
)
from pyllumnix.tools.drill.scenarios import AllowedErrors, Scenario

REF = [5, 6, 7, 8]
REFS = {("stream", 0): REF}
NONE = ErrorPolicy()


def rec(
    *,
    tokens: list[int] | None = None,
    status: str = "OK",
    reason: str | None = "length",
    error: str = "",
    sent: float = 0.0,
    first: float | None = 0.1,
    ended: float | None = 1.0,
    **kw: object,
) -> RequestRecord:
    r = RequestRecord(f"r{sent}", "stream", 0, sent_at=sent, first_token_at=first, ended_at=ended)
    r.token_ids = list(REF if tokens is None else tokens)
    r.status, r.finish_reason, r.error = status, reason, error
    for key, value in kw.items():
        setattr(r, key, value)
    return r


def test_finished_and_exact_is_clean() -> None:
    c = classify(rec(), REF, NONE)
    assert (c.outcome, c.altered) == (FINISHED, False)


def test_finished_with_other_tokens_is_altered() -> None:
    assert classify(rec(tokens=[5, 6, 9, 8]), REF, NONE).altered
    assert classify(rec(tokens=[5, 6, 7]), REF, NONE).altered  # one token lost
    assert classify(rec(tokens=[5, 6, 7, 8, 8]), REF, NONE).altered  # one duplicated


def test_index_gaps_or_repeats_are_altered_even_when_tokens_match() -> None:
    assert classify(rec(index_errors=1), REF, NONE).altered


def test_no_reference_cannot_pass() -> None:
    assert classify(rec(), None, NONE).altered


def test_deadline_is_hung() -> None:
    c = classify(rec(status="", reason=None, deadline_hit=True, tokens=[5]), REF, NONE)
    assert c.outcome == HUNG and not c.altered


def test_ok_status_without_final_message_is_lost() -> None:
    assert classify(rec(reason=None), REF, NONE).outcome == LOST


@pytest.mark.parametrize("details", ["Socket closed", "recvmsg:Connection reset by peer", ""])
def test_connection_drop_is_lost_not_an_error(details: str) -> None:
    c = classify(rec(status="UNAVAILABLE", reason=None, error=details, tokens=[5, 6]), REF, NONE)
    assert c.outcome == LOST
    assert not c.altered  # a prefix of the reference


def test_a_frontend_answer_quoting_a_transport_failure_is_a_clear_error() -> None:
    details = "no instance can take the request: etcd unavailable: range failed: failed to connect to all addresses"
    r = rec(status="UNAVAILABLE", reason=None, error=details, tokens=[], first=None)
    c = classify(r, REF, ErrorPolicy(AllowedErrors.UNAVAILABLE_REJECT))
    assert (c.outcome, c.allowed) == (ERROR, True)


def test_error_final_message_without_cause_is_lost() -> None:
    assert classify(rec(status="INTERNAL", reason="error", error=""), REF, NONE).outcome == LOST


def test_partial_stream_that_is_not_a_prefix_is_altered() -> None:
    c = classify(rec(status="INTERNAL", reason="error", error="instance x lost", tokens=[5, 9]), REF, NONE)
    assert c.outcome == ERROR and c.altered and not c.allowed


def test_killed_instance_errors_are_allowed_only_when_they_name_it() -> None:
    policy = ErrorPolicy(AllowedErrors.KILLED_INSTANCE, ("instance-1",))
    named = rec(status="INTERNAL", reason="error", error="instance instance-1 was lost", tokens=[5])
    other = rec(status="INTERNAL", reason="error", error="instance instance-2 was lost", tokens=[5])
    assert classify(named, REF, policy).allowed
    assert not classify(other, REF, policy).allowed
    assert not classify(named, REF, NONE).allowed


@pytest.mark.parametrize(
    ("allowed", "status", "ok"),
    [
        (AllowedErrors.UNAVAILABLE_REJECT, "UNAVAILABLE", True),
        (AllowedErrors.UNAVAILABLE_REJECT, "RESOURCE_EXHAUSTED", False),
        (AllowedErrors.OVERLOAD_REJECT, "RESOURCE_EXHAUSTED", True),
        (AllowedErrors.OVERLOAD_REJECT, "UNAVAILABLE", False),
        (AllowedErrors.NONE, "RESOURCE_EXHAUSTED", False),
    ],
)
def test_rejections_before_the_first_token(allowed: AllowedErrors, status: str, ok: bool) -> None:
    r = rec(status=status, reason=None, error="no instance can take the request: overloaded", tokens=[], first=None)
    c = classify(r, REF, ErrorPolicy(allowed))
    assert c.outcome == ERROR and c.allowed is ok


def test_a_rejection_after_tokens_is_not_a_rejection() -> None:
    r = rec(status="RESOURCE_EXHAUSTED", reason=None, error="overloaded", tokens=[5])
    assert not classify(r, REF, ErrorPolicy(AllowedErrors.OVERLOAD_REJECT)).allowed


def test_any_clear_error_allows_errors_but_not_silence() -> None:
    policy = ErrorPolicy(AllowedErrors.ANY_CLEAR)
    assert classify(rec(status="INTERNAL", reason="error", error="push failed"), REF, policy).allowed
    assert classify(rec(status="UNAVAILABLE", reason=None, error="Socket closed"), REF, policy).outcome == LOST


def test_longest_first_token_gap() -> None:
    records = [rec(sent=0.0, first=0.1), rec(sent=0.2, first=0.3), rec(sent=0.4, first=3.3), rec(sent=3.4, first=3.5)]
    assert longest_first_token_gap(records) == pytest.approx(3.0)
    # Requests sent after the last first token that never got one stretch the outage to their end.
    unserved = [*records, rec(sent=3.6, first=None, ended=9.5, status="INTERNAL", reason=None, error="x")]
    assert longest_first_token_gap(unserved) == pytest.approx(6.0)
    assert longest_first_token_gap([]) is None


def clean_blocks() -> BlockReport:
    return BlockReport(used_blocks={"i0": 0, "i1": 0}, requests={"i0": [], "i1": []})


def fault(**kw: object) -> FaultRecord:
    f = FaultRecord("x", injected_at=1.0)
    for key, value in kw.items():
        setattr(f, key, value)
    return f


def failed(result_checks: list[Check]) -> set[str]:
    return {c.name for c in result_checks if not c.passed}


def served() -> list[RequestRecord]:
    return [rec(sent=0.5), rec(sent=2.0, first=2.1, ended=3.0)]


def test_clean_scenario_passes() -> None:
    result = judge(Scenario("burst", 10), fault(), served(), REFS, clean_blocks(), [], 0.0)
    assert result.passed, [(c.name, c.detail) for c in result.checks]


def test_lost_hung_altered_and_unexpected_errors_each_fail() -> None:
    records = [
        *served(),
        rec(reason=None),
        rec(status="", reason=None, deadline_hit=True),
        rec(tokens=[1, 2, 3, 4]),
        rec(status="INTERNAL", reason="error", error="boom"),
    ]
    result = judge(Scenario("leader-kill"), fault(time_to_new_leader_s=0.5), records, REFS, clean_blocks(), [], 0.0)
    assert failed(result.checks) == {
        "no request lost",
        "no request hung",
        "no stream altered",
        "errors only where allowed (none)",
    }
    j = result.to_json()
    assert (j["lost"], j["hung"], j["altered"], j["errors_unexpected"], j["finished"]) == (1, 1, 1, 1, 3)
    assert len(j["failures"]) == 4


def test_failures_list_what_fails_first() -> None:
    refused = [
        rec(sent=0.1 * i, status="RESOURCE_EXHAUSTED", reason=None, error="full", tokens=[], first=None)
        for i in range(60)
    ]
    records = [*served(), *refused, rec(sent=9.0, reason=None)]
    result = judge(Scenario("burst", 60), fault(), records, REFS, clean_blocks(), [], 0.0)
    j = result.to_json()
    assert j["failures"][0]["outcome"] == LOST
    assert len(j["failures"]) == 50 and j["failures_left_off"] == 11
    assert j["errors_allowed"] == 60


def test_held_blocks_or_requests_fail() -> None:
    blocks = BlockReport(used_blocks={"i0": 3, "i1": 0}, requests={"i0": ["r"], "i1": []})
    result = judge(Scenario("burst", 10), fault(), served(), REFS, blocks, [], 0.0)
    assert failed(result.checks) == {"no KV blocks held afterwards"}
    assert result.to_json()["blocks_held"] == {"i0": 3, "i1": 0}


def test_leader_bound() -> None:
    slow = judge(Scenario("leader-kill"), fault(time_to_new_leader_s=3.5), served(), REFS, clean_blocks(), [], 0.0)
    assert failed(slow.checks) == {"new leader within 3 s"}
    none = judge(Scenario("leader-kill"), fault(), served(), REFS, clean_blocks(), [], 0.0)
    assert failed(none.checks) == {"new leader within 3 s"}
    # A stalled leader may keep its lease: what counts is one leader soon after the resume.
    kept = judge(Scenario("leader-stall", 5), fault(recovery_s=0.2), served(), REFS, clean_blocks(), [], 0.0)
    assert kept.passed
    split = judge(Scenario("leader-stall", 5), fault(recovery_s=None), served(), REFS, clean_blocks(), [], 0.0)
    assert failed(split.checks) == {"one leader within 3 s after the stall"}


def test_exited_llumlet_fails() -> None:
    result = judge(Scenario("burst", 10), fault(exited_llumlets=["i1"]), served(), REFS, clean_blocks(), [], 0.0)
    assert failed(result.checks) == {"no llumlet exited on its own"}


def test_nothing_served_after_the_fault_fails() -> None:
    result = judge(Scenario("burst", 10), fault(injected_at=5.0), served(), REFS, clean_blocks(), [], 0.0)
    assert failed(result.checks) == {"served after the fault"}


def test_etcd_pause_checks() -> None:
    f = fault(injected_at=1.0, resumed_at=1.8, recovery_s=1.0)
    inflight = rec(sent=0.5, first=0.6, ended=2.0)
    probes = [ProbeRecord(1.1, 503, "1", 0.01), ProbeRecord(1.2, 200, None, 0.2)]
    ok = judge(Scenario("etcd-pause", 1), f, [inflight, *served()], REFS, clean_blocks(), probes, 0.0)
    assert ok.passed, [(c.name, c.detail) for c in ok.checks]

    # A gRPC refusal must carry a retry-after trailer like HTTP's Retry-After.
    refusal = rec(sent=1.5, first=None, tokens=[], status="UNAVAILABLE", reason=None, error="etcd unreachable")
    no_trailer = judge(Scenario("etcd-pause", 1), f, [refusal, *served()], REFS, clean_blocks(), probes, 0.0)
    assert failed(no_trailer.checks) == {"new requests served or answered 503 + Retry-After"}
    refusal.retry_after = "1"
    with_trailer = judge(Scenario("etcd-pause", 1), f, [refusal, *served()], REFS, clean_blocks(), probes, 0.0)
    assert with_trailer.passed
    assert with_trailer.to_json()["refusals"] == {"count": 1, "by_status": {"UNAVAILABLE": 1}, "without_retry_after": 0}

    broken = rec(sent=0.5, first=0.6, ended=2.0, status="UNAVAILABLE", reason=None, error="no instance")
    no_retry = [ProbeRecord(1.1, 503, None, 0.01), ProbeRecord(1.2, 500, None, 0.01, "internal")]
    slow = fault(injected_at=1.0, resumed_at=1.8, recovery_s=6.0)
    bad = judge(Scenario("etcd-pause", 1), slow, [broken, *served()], REFS, clean_blocks(), no_retry, 0.0)
    assert failed(bad.checks) == {
        "in-flight streams finished",
        "new requests served or answered 503 + Retry-After",
        "full service within 5 s after etcd returns",
        # The broken in-flight stream had tokens: UNAVAILABLE then is no rejection.
        "errors only where allowed (unavailable-reject)",
    }


def test_skipped_scenario_fails_with_the_reason() -> None:
    f = fault(skipped="leader resign is not supported by this server")
    result = judge(Scenario("leader-resign"), f, [], REFS, BlockReport(), [], 0.0)
    assert not result.passed
    assert result.checks[0].detail == "leader resign is not supported by this server"


def test_report_json_and_summary() -> None:
    good = judge(Scenario("burst", 10), fault(), served(), REFS, clean_blocks(), [], 0.0)
    bad = judge(Scenario("leader-kill"), fault(), [*served(), rec(reason=None)], REFS, clean_blocks(), [], 0.0)
    report = DrillReport({"scenarios": ["burst 10", "leader-kill"]}, {"streams": 1}, [good, bad])
    data = json.loads(json.dumps(report.to_json()))
    assert data["passed"] is False
    assert [s["scenario"] for s in data["scenarios"]] == ["burst 10", "leader-kill"]
    assert {"time_to_new_leader_s", "longest_first_token_gap_s", "lost", "hung", "altered", "blocks_held"} <= set(
        data["scenarios"][0]
    )
    out = io.StringIO()
    render(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "PASS" in text and "FAIL" in text and "no request lost" in text and "drill failed" in text
    assert DrillReport({}, {}, [good]).passed
    assert not DrillReport({}, {}, []).passed
    assert not DrillReport({}, {}, [good], error="interrupted").passed
