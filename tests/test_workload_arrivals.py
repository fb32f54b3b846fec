"""Arrival processes reproduce their rate and burstiness (CV) on large seeded samples."""

from __future__ import annotations

import numpy as np
import pytest

from pyllumnix.tools.workload import Constant, Gamma, Poisson, arrival_times


def _rate_and_cv(times: np.ndarray) -> tuple[float, float]:
    gaps = np.diff(times)
    return 1.0 / float(gaps.mean()), float(gaps.std() / gaps.mean())


@pytest.mark.parametrize("rate", [0.5, 7.5, 32.0])
def test_poisson_rate_and_cv(rate: float) -> None:
    times = arrival_times(Poisson(rate), 200_000, np.random.default_rng(1))
    got_rate, cv = _rate_and_cv(times)
    assert got_rate == pytest.approx(rate, rel=0.01)
    assert cv == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize(("rate", "cv"), [(26.0, 2.0), (26.0, 4.0), (2.0, 6.0), (26.0, 8.0)])
def test_gamma_rate_and_cv(rate: float, cv: float) -> None:
    # Gamma gaps with shape 1/cv^2 have excess kurtosis 6 cv^2, so the sample CV converges slowly: 10^6 gaps keep the
    # sampling error of the CV around 1-4 % even at cv = 8.
    times = arrival_times(Gamma(rate, cv), 1_000_000, np.random.default_rng(2))
    got_rate, got_cv = _rate_and_cv(times)
    assert got_rate == pytest.approx(rate, rel=0.03)
    assert got_cv == pytest.approx(cv, rel=0.08)


def test_gamma_parameters_follow_the_paper() -> None:
    g = Gamma(rate=2.0, cv=4.0)
    assert g.shape == pytest.approx(1 / 16)
    assert g.scale == pytest.approx(16 / 2.0)
    assert g.shape * g.scale == pytest.approx(1 / 2.0)


def test_first_arrival_at_start_and_times_sorted() -> None:
    times = arrival_times(Poisson(3.0), 1000, np.random.default_rng(3), start_s=5.0)
    assert times[0] == 5.0
    assert np.all(np.diff(times) >= 0)
    assert arrival_times(Poisson(3.0), 0, np.random.default_rng(3)).size == 0


def test_constant_rate_is_evenly_spaced() -> None:
    times = arrival_times(Constant(4.0), 5, np.random.default_rng(0))
    assert times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_same_seed_same_times() -> None:
    a = arrival_times(Gamma(26.0, 4.0), 100, np.random.default_rng(9))
    b = arrival_times(Gamma(26.0, 4.0), 100, np.random.default_rng(9))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_rate_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        Poisson(bad)
    with pytest.raises(ValueError, match="rate"):
        Gamma(bad, 2.0)


def test_bad_cv_rejected() -> None:
    with pytest.raises(ValueError, match="cv"):
        Gamma(1.0, 0.0)
