"""Smoke test of ``llumnix bench engine`` (7B profile, no payload, ~8 s): the report's figures must agree with each
other and with the profile's latency model, computed here independently of the benchmark (a modelled time taken
from the wrong shape, a ratio inverted, a verdict that ignores the target, fail here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyllumnix.data_plane.engine.profile import LLAMA_7B_A10, get_profile
from pyllumnix.tools.bench_engine import SHAPES, Shape, fit_shape, shapes_for
from pyllumnix.tools.cli import cli

# (shape, modelled ms per step): a prefill step of one fresh prompt; a decode step of ``batch`` requests whose
# context grows by one token per step, averaged over the measured steps (context prompt + 1 ... prompt + steps).
P = LLAMA_7B_A10


def decode_mean(batch: int, prompt: int, steps: int) -> float:
    return sum(P.decode_ms(batch, batch * (prompt + i)) for i in range(1, steps + 1)) / steps


EXPECTED_MODELLED_MS = {
    "prefill-256": P.prefill_ms(256),
    "prefill-1024": P.prefill_ms(1024),
    "decode-b1-ctx1024": decode_mean(1, 1024, 40),
    "decode-b8-ctx128": decode_mean(8, 128, 40),
    "decode-b32-ctx32": decode_mean(32, 32, 30),
}


def test_bench_engine_figures_agree_with_the_model_and_each_other(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    args = ["bench", "engine", "--profile", "llama-7b-a10", "--no-payload", "--json", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    report = json.loads(out.read_text())
    assert (report["profile"], report["payload"]) == ("llama-7b-a10", False)
    rows = {row["shape"]: row for row in report["shapes"]}
    assert set(rows) == set(EXPECTED_MODELLED_MS)
    for name, row in rows.items():
        assert row["modelled_ms"] == pytest.approx(EXPECTED_MODELLED_MS[name], rel=1e-6), name
        assert row["ratio"] == pytest.approx(row["measured_ms"] / row["modelled_ms"], rel=1e-9), name
        # the engine's own work is inside the paced step, which sleeps out the rest of the modelled time
        assert 0 < row["compute_ms"] < row["measured_ms"], name
        assert f"{name}={row['ratio']:.3f}" in summary, summary
    worst = max(abs(row["ratio"] - 1) for row in rows.values())
    assert report["worst_abs_error"] == pytest.approx(worst)
    assert report["within_target"] == (worst <= report["target_abs_error"])
    assert f"worst {worst * 100:.1f}%" in summary, summary
    assert summary.endswith(" OK") == report["within_target"], summary


def test_bench_engine_every_offered_profile_runs_or_refuses_clearly(tmp_path: Path) -> None:
    """``--profile tiny`` used to crash with a traceback (a 1024-token prefill against tiny's 512-token limit): the
    shapes are scaled to what the profile can run, and the run reports them."""
    out = tmp_path / "tiny.json"
    result = CliRunner().invoke(cli, ["bench", "engine", "--profile", "tiny", "--no-payload", "--json", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    tiny = get_profile("tiny")
    assert report["profile"] == "tiny" and report["shapes"]
    for row in report["shapes"]:
        shape = next(s for s in shapes_for(tiny) if s.name == row["shape"])
        generated = 1 if shape.is_prefill else shape.steps + 2
        assert shape.prompt + generated <= tiny.max_model_len and shape.batch <= tiny.max_num_seqs, shape
        assert row["steps"] == shape.steps and row["modelled_ms"] > 0, row


def test_shapes_that_fit_stay_and_the_others_shrink_to_the_profile() -> None:
    assert shapes_for(P) == SHAPES, "the 7B profile runs the documented shapes unchanged"
    tiny = get_profile("tiny")
    fitted = {s.name: s for s in shapes_for(tiny)}
    assert "prefill-256" in fitted, "a shape that fits keeps its name"
    for shape in fitted.values():
        generated = 1 if shape.is_prefill else shape.steps + 2
        blocks = max(shape.batch, 1) * -(-(shape.prompt + generated) // tiny.block_size)
        assert shape.prompt + generated <= tiny.max_model_len, shape
        assert max(shape.batch, 1) * shape.prompt <= tiny.max_num_batched_tokens, shape
        assert shape.batch <= tiny.max_num_seqs and blocks <= tiny.total_blocks, shape
        assert shape.prompt % tiny.block_size == 0 or shape in SHAPES, shape
    assert fit_shape(Shape("huge", 0, 10**6, 1), tiny) is not None
    assert fit_shape(Shape("x", 1, 64, 600), tiny) is None, "600 decode steps alone overrun tiny's 512 tokens"
