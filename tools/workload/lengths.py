"""Token-length distributions: the paper's rescaled Zipf, fixed, uniform, and ShareGPT/BurstGPT-like lognormal fits.

Every distribution returns integer lengths in ``[1, max_len]`` drawn from a caller-supplied numpy Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# The paper's length range (Zipf "range 6,144"): no sampled length exceeds it.
PAPER_LEN_RANGE = 6144
# The paper's Zipf exponent for each target mean (artifact: benchmark_serving.py, distribution "zipf").
PAPER_ZIPF_ALPHA: dict[int, float] = {128: 2.0, 256: 1.5, 512: 1.15, 1024: 1.0005}


class LengthDist(Protocol):
    """Draws ``n`` token lengths; ``mean`` is the distribution's expected value after rounding and clipping."""

    @property
    def mean(self) -> float: ...

    def sample(self, n: int, rng: np.random.Generator) -> IntArray: ...


@dataclass(frozen=True)
class Fixed:
    """Every request has the same length."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"fixed length must be >= 1, got {self.value}")

    @property
    def mean(self) -> float:
        return float(self.value)

    def sample(self, n: int, rng: np.random.Generator) -> IntArray:
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    """Integer lengths uniform on ``[low, high]``, both ends included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"uniform lengths need 1 <= low <= high, got low={self.low} high={self.high}")

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2.0

    def sample(self, n: int, rng: np.random.Generator) -> IntArray:
        return rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)


def _zipf_expected(ranks: FloatArray, pmf: FloatArray, scale: float, max_len: int) -> float:
    return float(np.dot(pmf, np.minimum(np.ceil(scale * ranks), max_len)))


@dataclass(frozen=True)
class Zipf:
    """The paper's power-law lengths: a bounded Zipf over ranks, stretched by a factor so the mean hits a target.

    Procedure (the artifact's, with one change): ranks ``k = 1..support`` have probability ``∝ k^-alpha``; a drawn rank
    becomes the length ``min(ceil(scale·k), max_len)``. ``support`` defaults to ``2·mean - 1`` and ``max_len`` to the
    paper's range 6,144, as in the artifact; ``alpha`` defaults to the paper's exponent for ``mean`` (128 → 2.0,
    256 → 1.5, 512 → 1.15, 1,024 → 1.0005).

    The change: the artifact sets ``scale = mean / (sample mean of the ranks)``, which depends on the sample and is
    then skewed by the ceil and the clip. Here ``scale`` is solved once, by bisection, so that the *expected* length
    after ceil and clip equals ``mean`` (to within one rank-1 step, < 1 token). Sample means therefore converge to
    the target, and a length distribution does not change with the number of requests drawn.
    """

    target_mean: float
    alpha: float | None = None
    support: int | None = None
    max_len: int = PAPER_LEN_RANGE
    _alpha: float = field(init=False, repr=False, compare=False)
    _pmf: FloatArray = field(init=False, repr=False, compare=False)
    _scale: float = field(init=False, repr=False, compare=False)
    _mean: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        alpha = self.alpha
        if alpha is None:
            key = round(self.target_mean)
            if key != self.target_mean or key not in PAPER_ZIPF_ALPHA:
                raise ValueError(
                    f"no paper Zipf exponent for mean {self.target_mean}; pass alpha "
                    f"(paper: {', '.join(f'{m} -> {a}' for m, a in PAPER_ZIPF_ALPHA.items())})"
                )
            alpha = PAPER_ZIPF_ALPHA[key]
        if not alpha > 0.0:
            raise ValueError(f"Zipf alpha must be > 0, got {alpha}")
        if not 1.0 < self.target_mean < self.max_len:
            raise ValueError(f"Zipf mean must lie in (1, max_len={self.max_len}), got {self.target_mean}")
        support = self.support if self.support is not None else max(2, math.ceil(2 * self.target_mean) - 1)
        if support < 2:
            raise ValueError(f"Zipf support must be >= 2 ranks, got {support}")
        ranks = np.arange(1, support + 1, dtype=np.float64)
        weights = ranks**-alpha
        pmf = weights / weights.sum()
        # E(scale) is non-decreasing in scale, -> 1 as scale -> 0 and = max_len at scale = max_len.
        lo, hi = 0.0, float(self.max_len)
        for _ in range(200):
            mid = (lo + hi) / 2.0
            if _zipf_expected(ranks, pmf, mid, self.max_len) < self.target_mean:
                lo = mid
            else:
                hi = mid
        e_lo = _zipf_expected(ranks, pmf, lo, self.max_len)
        e_hi = _zipf_expected(ranks, pmf, hi, self.max_len)
        scale, mean = (lo, e_lo) if abs(e_lo - self.target_mean) < abs(e_hi - self.target_mean) else (hi, e_hi)
        object.__setattr__(self, "_alpha", alpha)
        object.__setattr__(self, "_pmf", pmf)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_mean", mean)

    @property
    def effective_alpha(self) -> float:
        return self._alpha

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def mean(self) -> float:
        return self._mean

    def sample(self, n: int, rng: np.random.Generator) -> IntArray:
        ranks = rng.choice(len(self._pmf), size=n, p=self._pmf).astype(np.float64) + 1.0
        lengths: IntArray = np.minimum(np.ceil(self._scale * ranks), self.max_len).astype(np.int64)
        return lengths


@dataclass(frozen=True)
class LogNormal:
    """Lognormal lengths with a given mean (before rounding and clipping) and log-space sigma, clipped to a range.

    ``mu = ln(mean) - sigma²/2`` so the unclipped mean is ``mean``; rounding and clipping to ``[min_len, max_len]``
    move it slightly (``mean`` reports the exact value after both).
    """

    target_mean: float
    sigma: float
    min_len: int = 1
    max_len: int = PAPER_LEN_RANGE

    def __post_init__(self) -> None:
        if not self.target_mean > 0.0 or not self.sigma > 0.0:
            raise ValueError(f"lognormal needs mean > 0 and sigma > 0, got {self.target_mean}, {self.sigma}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"lognormal needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    @property
    def mu(self) -> float:
        return math.log(self.target_mean) - self.sigma**2 / 2.0

    @property
    def mean(self) -> float:
        # Exact: sum over every possible length v of v * P(clip(round(X)) = v), with the tails folded onto the ends.
        edges = np.arange(self.min_len, self.max_len, dtype=np.float64) + 0.5
        z = (np.log(edges) - self.mu) / (self.sigma * math.sqrt(2.0))
        cdf = 0.5 * (1.0 + np.asarray(np.frompyfunc(math.erf, 1, 1)(z), dtype=np.float64))
        probs = np.diff(np.concatenate(([0.0], cdf, [1.0])))
        values = np.arange(self.min_len, self.max_len + 1, dtype=np.float64)
        return float(np.dot(probs, values))

    def sample(self, n: int, rng: np.random.Generator) -> IntArray:
        raw = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(np.rint(raw), self.min_len, self.max_len).astype(np.int64)


# ShareGPT-like and BurstGPT-like lengths, fitted as lognormals to published summary statistics (no dataset download).
# These are assumptions, not measurements of ours; override the means with the spec keys in_mean= / out_mean=.
# - ShareGPT (ShareGPT_V3 conversations, LLaMA tokenizer, as used by vLLM-style benchmarks): the project's reference
#   summary is input mean ~306 tokens, output mean ~500 tokens, both right-skewed with long tails. The vLLM paper
#   (Kwon et al., SOSP'23, Fig. 11) reports shorter means for its filtered subset; any such choice fits here.
#   sigma 1.0 (input) / 0.8 (output) put the medians at ~186 / ~363 tokens.
# - BurstGPT (Wang et al. 2024, Azure OpenAI ChatGPT/GPT-4 trace, release v1.1): requests are widely spread (the
#   paper fits a Zipf to request tokens) with a mean of several hundred tokens; responses are narrower, a few hundred
#   tokens. Rough fit from the paper's figures and the public sample rows (zero-token failures excluded): input mean
#   600, sigma 1.2; output mean 350, sigma 0.9.
# All are clipped to [1, 6,144] (the paper's range); pair-wise clipping to a model's context is done per request.
SHAREGPT_INPUT = LogNormal(target_mean=306.0, sigma=1.0)
SHAREGPT_OUTPUT = LogNormal(target_mean=500.0, sigma=0.8)
BURSTGPT_INPUT = LogNormal(target_mean=600.0, sigma=1.2)
BURSTGPT_OUTPUT = LogNormal(target_mean=350.0, sigma=0.9)
