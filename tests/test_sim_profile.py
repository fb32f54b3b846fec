"""Profiles: the 7B constants follow the paper, the latency model's shape, and the registry's error."""

from __future__ import annotations

import dataclasses

import pytest

from pyllumnix.data_plane.engine.profile import LLAMA_7B_A10, PROFILES, TINY, get_profile


def test_llama_7b_kv_geometry() -> None:
    p = get_profile("llama-7b-a10")
    assert p.bytes_per_token == 512 * 1024
    assert p.block_bytes == 8 * 1024 * 1024
    assert p.block_size == 16
    assert p.max_num_batched_tokens == 12800
    assert 1200 <= p.total_blocks <= 1500
    assert p.watermark_blocks == 13


@pytest.mark.parametrize(("tokens", "paper_ms"), [(256, 58), (512, 110), (1024, 220), (2048, 436), (8192, 1995)])
def test_llama_7b_prefill_matches_paper(tokens: int, paper_ms: float) -> None:
    assert LLAMA_7B_A10.prefill_ms(tokens) == pytest.approx(paper_ms, rel=0.01)


def test_prefill_table_interpolates_and_fit_outside() -> None:
    p = LLAMA_7B_A10
    assert p.prefill_ms(768) == pytest.approx((110 + 220) / 2)
    assert p.prefill_ms(100) == pytest.approx(0.2114 * 100 + 3.04)
    assert p.prefill_ms(12000) == pytest.approx(0.2114 * 12000 + 3.04)
    assert p.prefill_ms(0) == 0.0
    untabled = dataclasses.replace(p, prefill_table=())
    assert untabled.prefill_ms(1024) == pytest.approx(0.2114 * 1024 + 3.04)


def test_decode_step_exceeds_paper_downtime_and_grows() -> None:
    p = LLAMA_7B_A10
    one = p.decode_ms(1, 256)
    assert 26 < one < 65  # longer than the 7B migration downtime, shorter than a 30B step
    assert p.decode_ms(32, 32 * 256) > p.decode_ms(8, 8 * 256) > one
    assert p.decode_ms(0, 0) == 0.0
    assert p.step_seconds(256, 1, 256) == pytest.approx((58 + one) / 1000)


def test_tiny_is_small_and_fast() -> None:
    assert TINY.block_bytes <= 64 * 1024
    assert TINY.total_blocks <= 128
    assert TINY.step_seconds(256, 8, 2048) < 0.05


def test_unknown_profile_lists_names() -> None:
    with pytest.raises(KeyError) as info:
        get_profile("gpt-5")
    for name in PROFILES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "change",
    [
        {"bytes_per_token": 12},
        {"total_blocks": 0},
        {"watermark": 1.0},
        {"max_num_batched_tokens": 100},
        {"total_blocks": 20},
        {"prefill_table": ((512, 1.0), (256, 2.0))},
    ],
)
def test_invalid_profiles_rejected(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **change)  # type: ignore[arg-type]
