"""RayInstanceProvider's option checks and the CLI wiring of ``--provider ray`` (the Ray cluster itself is exercised
in integration/test_multihost.py on emulated hosts)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pyllumnix.control_plane.scheduler.main import scheduler_command
from pyllumnix.control_plane.scheduler.provider_ray import RayInstanceProvider
from pyllumnix.tools.serve import serve_command


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="placement must be 'spread' or 'pack'"):
        RayInstanceProvider("127.0.0.1:6379", [], placement="random")
    with pytest.raises(ValueError, match="an instance needs CPUs or GPUs"):
        RayInstanceProvider("127.0.0.1:6379", [], cpus=0, gpus=0)


def test_ray_provider_needs_an_address() -> None:
    """Both the scheduler and serve refuse ``--provider ray`` without ``--ray-address`` before starting anything."""
    runner = CliRunner()
    result = runner.invoke(scheduler_command, ["--etcd", "127.0.0.1:1", "--insecure", "--provider", "ray"])
    assert result.exit_code == 2 and "--provider ray needs --ray-address" in result.output
    result = runner.invoke(serve_command, ["--insecure", "--provider", "ray", "--llumlets", "0"])
    assert result.exit_code == 2 and "--provider ray needs --ray-address" in result.output
