"""Length distributions: the paper's rescaled Zipf hits each target mean; the other shapes behave as documented."""

from __future__ import annotations

import numpy as np
import pytest

from pyllumnix.tools.workload import (
    BURSTGPT_INPUT,
    BURSTGPT_OUTPUT,
    PAPER_ZIPF_ALPHA,
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    Fixed,
    LogNormal,
    Uniform,
    Zipf,
)


@pytest.mark.parametrize("support", [None, 6144])
@pytest.mark.parametrize(("mean", "alpha"), sorted(PAPER_ZIPF_ALPHA.items()))
def test_zipf_rescaled_mean(mean: int, alpha: float, support: int | None) -> None:
    dist = Zipf(mean, support=support)
    assert dist.effective_alpha == alpha
    # The scale is solved so the expected length after ceil and clip is the target (to within one rank-1 step).
    assert dist.mean == pytest.approx(mean, abs=1.0)
    # Very heavy tails: at 200k draws the standard error of the sample mean is ~0.6 % of the target.
    sample = dist.sample(200_000, np.random.default_rng(mean))
    assert sample.mean() == pytest.approx(mean, rel=0.03)
    assert sample.min() >= 1
    assert sample.max() <= 6144


def test_zipf_is_a_power_law() -> None:
    # Ranks 1 and 2 map to lengths ceil(scale) and ceil(2 scale), with probability ratio 2^alpha.
    dist = Zipf(256)
    sample = dist.sample(400_000, np.random.default_rng(0))
    first, second = int(np.ceil(dist.scale)), int(np.ceil(2 * dist.scale))
    ratio = np.count_nonzero(sample == first) / np.count_nonzero(sample == second)
    assert ratio == pytest.approx(2**1.5, rel=0.03)


def test_zipf_needs_alpha_off_the_paper_means() -> None:
    with pytest.raises(ValueError, match="no paper Zipf exponent for mean 300"):
        Zipf(300)
    assert Zipf(300, alpha=1.2).mean == pytest.approx(300, abs=1.0)
    with pytest.raises(ValueError, match="mean must lie in"):
        Zipf(7000, alpha=1.0)


def test_fixed_and_uniform() -> None:
    rng = np.random.default_rng(0)
    assert Fixed(7).sample(3, rng).tolist() == [7, 7, 7]
    sample = Uniform(10, 20).sample(100_000, rng)
    assert sample.min() == 10 and sample.max() == 20
    assert sample.mean() == pytest.approx(15.0, rel=0.01)
    with pytest.raises(ValueError):
        Uniform(5, 4)
    with pytest.raises(ValueError):
        Fixed(0)


@pytest.mark.parametrize("dist", [SHAREGPT_INPUT, SHAREGPT_OUTPUT, BURSTGPT_INPUT, BURSTGPT_OUTPUT])
def test_dataset_like_lognormals(dist: LogNormal) -> None:
    sample = dist.sample(200_000, np.random.default_rng(4))
    assert sample.min() >= 1 and sample.max() <= 6144
    # ``mean`` is exact after rounding and clipping, and within a few % of the published mean it was fitted to.
    assert sample.mean() == pytest.approx(dist.mean, rel=0.02)
    assert dist.mean == pytest.approx(dist.target_mean, rel=0.05)


def test_lognormal_clips() -> None:
    dist = LogNormal(1000.0, 2.0, min_len=10, max_len=2000)
    sample = dist.sample(10_000, np.random.default_rng(0))
    assert sample.min() == 10 and sample.max() == 2000
    assert sample.mean() == pytest.approx(dist.mean, rel=0.03)
