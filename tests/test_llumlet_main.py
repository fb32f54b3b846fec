"""``llumnix llumlet`` options of the reliability settings: validated up front, with a clear message."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pyllumnix.data_plane.llumlet.main import LlumletOptions, llumlet_command


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--push-budget", "0"], "--push-budget"),
        (["--sink-idle-close", "-1"], "--sink-idle-close"),
        (["--max-waiting", "-1"], "--max-waiting"),
        (["--lease-ttl", "0"], "--lease-ttl"),
    ],
)
def test_bad_reliability_settings_are_refused_with_a_usage_error(args: list[str], option: str) -> None:
    result = CliRunner().invoke(llumlet_command, args)
    assert result.exit_code == 2
    assert option in result.output


def test_defaults_ride_out_short_stalls_and_slow_frontends() -> None:
    opts = LlumletOptions()
    assert opts.lease_ttl == 5 and opts.push_budget_s == 30.0 and opts.max_waiting == 256
    help_text = CliRunner().invoke(llumlet_command, ["--help"]).output
    for option in ("--push-budget", "--sink-idle-close", "--max-waiting", "--lease-ttl"):
        assert option in help_text
