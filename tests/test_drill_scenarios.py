"""``llumnix drill --scenario`` parsing: names, values, defaults, ``all``, attach-mode limits, and the CLI's errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyllumnix.tools.drill.cli import drill_command
from pyllumnix.tools.drill.scenarios import (
    ALL,
    FAULTS,
    Scenario,
    ScenarioError,
    check_attach_mode,
    etcd_members_needed,
    parse_scenarios,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("leader-kill", Scenario("leader-kill")),
        ("leader-stall 5", Scenario("leader-stall", 5.0)),
        ("leader-stall=2.5", Scenario("leader-stall", 2.5)),
        ("llumlet-stall:4", Scenario("llumlet-stall", 4.0)),
        ("  Etcd-Pause   10 ", Scenario("etcd-pause", 10.0)),
        ("burst 100", Scenario("burst", 100.0)),
        ("etcd-member-kill", Scenario("etcd-member-kill")),
    ],
)
def test_one_scenario(text: str, expected: Scenario) -> None:
    assert parse_scenarios([text]) == [expected]


def test_defaults_fill_a_missing_value() -> None:
    got = parse_scenarios(["burst", "etcd-pause", "frontend-stall", "leader-stall"])
    assert [(s.fault, s.value) for s in got] == [
        ("burst", 800.0),
        ("etcd-pause", 10.0),
        ("frontend-stall", 15.0),
        ("leader-stall", 5.0),
    ]
    assert got[0].requests == 800 and got[0].seconds == 0.0
    assert got[1].seconds == 10.0 and got[1].requests == 0


def test_lists_and_repeats_keep_their_order() -> None:
    got = parse_scenarios(["leader-kill, llumlet-stall 4", "burst 100"])
    assert [s.label for s in got] == ["leader-kill", "llumlet-stall 4", "burst 100"]


def test_all_is_every_fault_in_order() -> None:
    got = parse_scenarios(["all"])
    assert [s.label for s in got] == list(ALL)
    assert {s.fault for s in got} == set(FAULTS)


def test_labels() -> None:
    assert Scenario("leader-stall", 2.5).label == "leader-stall 2.5"
    assert Scenario("leader-stall", 5.0).label == "leader-stall 5"
    assert Scenario("leader-kill").label == "leader-kill"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("leader-explode", "unknown fault 'leader-explode'"),
        ("leader-kill 3", "leader-kill takes no value"),
        ("leader-stall soon", "seconds must be a number"),
        ("leader-stall -1", "must be positive"),
        ("leader-stall 0", "must be positive"),
        ("etcd-pause inf", "must be positive"),
        ("etcd-pause nan", "must be positive"),
        ("burst 2.5", "whole number"),
        ("all 3", "'all' takes no value"),
        ("", "empty scenario"),
        (" , ", "empty scenario"),
        ("leader-stall 5 6", "cannot read scenario"),
    ],
)
def test_bad_scenarios_say_why(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenarios([text])


def test_no_scenario_is_an_error() -> None:
    with pytest.raises(ScenarioError, match="no scenario"):
        parse_scenarios([])


def test_attach_mode_allows_only_faults_without_signals() -> None:
    check_attach_mode(parse_scenarios(["leader-resign, burst 10"]))
    with pytest.raises(ScenarioError, match=r"etcd-pause, leader-kill signal processes.*leader-resign, burst"):
        check_attach_mode(parse_scenarios(["leader-kill", "burst", "etcd-pause 3"]))


def test_etcd_members() -> None:
    assert etcd_members_needed(parse_scenarios(["leader-kill, burst"])) == 1
    assert etcd_members_needed(parse_scenarios(["all"])) == 3


def test_every_value_is_finite_and_positive() -> None:
    for kind in FAULTS.values():
        assert (kind.param is None) == (kind.default is None)
        if kind.default is not None:
            assert math.isfinite(kind.default) and kind.default > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "leader-explode"], "unknown fault"),
        (["--frontend", "127.0.0.1:1", "--scheduler", "127.0.0.1:2", "--scenario", "leader-kill"], "cannot run"),
        (["--frontend", "127.0.0.1:1", "--scenario", "burst"], "needs both --frontend and --scheduler"),
        (["--scenario", "etcd-member-kill", "--etcd-members", "1"], "need 3 etcd members"),
        (["--scenario", "leader-kill", "--schedulers", "1"], "need --schedulers 2"),
        (["--scenario", "burst", "--rate", "0"], "--rate"),
    ],
)
def test_cli_refuses_bad_usage_before_starting_anything(args: list[str], message: str) -> None:
    result = CliRunner().invoke(drill_command, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_attach_context_gives_endpoints_and_credentials(tmp_path: Path) -> None:
    from pyllumnix.tools.drill.credentials import from_context

    path = tmp_path / "context.yaml"
    path.write_text(
        "current-context: c\ncontexts:\n- name: c\n  frontend: [127.0.0.1:1]\n  scheduler: [127.0.0.1:2, 127.0.0.1:3]\n"
        "  api_key: llx_secret\n"
    )
    path.chmod(0o600)
    creds, ctx = from_context(str(path), None)
    assert (ctx.frontend, ctx.scheduler) == (["127.0.0.1:1"], ["127.0.0.1:2", "127.0.0.1:3"])
    # Plaintext context: the API key goes with every call and every HTTP probe.
    assert creds.call_metadata() == (("authorization", "Bearer llx_secret"),)
    assert creds.http_headers == {"Authorization": "Bearer llx_secret"}
    assert "API key" in creds.description
    with pytest.raises(ValueError, match="no client context file"):
        from_context(str(tmp_path / "missing.yaml"), None)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="accessible by others"):
        from_context(str(path), None)


def test_cli_refuses_a_missing_context(tmp_path: Path) -> None:
    result = CliRunner().invoke(drill_command, ["--context", str(tmp_path / "nope.yaml"), "--scenario", "burst"])
    assert result.exit_code == 2 and "no client context file" in result.output
