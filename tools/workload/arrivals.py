"""Inter-arrival processes: Poisson, Gamma (the paper's bursty arrivals) and a constant rate.

Each process draws gaps from a caller-supplied numpy Generator, so a workload is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class ArrivalProcess(Protocol):
    """Draws ``n`` inter-arrival gaps in seconds."""

    @property
    def rate(self) -> float: ...

    def inter_arrivals(self, n: int, rng: np.random.Generator) -> FloatArray: ...


def _check_rate(rate: float) -> None:
    if not (rate > 0.0 and np.isfinite(rate)):
        raise ValueError(f"rate must be a finite number > 0 (requests/s), got {rate}")


@dataclass(frozen=True)
class Poisson:
    """Poisson arrivals: exponential gaps with mean ``1 / rate``."""

    rate: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)

    def inter_arrivals(self, n: int, rng: np.random.Generator) -> FloatArray:
        return rng.exponential(1.0 / self.rate, size=n)


@dataclass(frozen=True)
class Gamma:
    """Gamma gaps with mean ``1 / rate`` and coefficient of variation ``cv`` (paper: shape 1/CV², scale CV²/rate).

    Mean = shape·scale = 1/rate and std = sqrt(shape)·scale = cv/rate, so CV = cv; cv = 1 is Poisson, cv > 1 bursty.
    """

    rate: float
    cv: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)
        if not (self.cv > 0.0 and np.isfinite(self.cv)):
            raise ValueError(f"cv must be a finite number > 0, got {self.cv}")

    @property
    def shape(self) -> float:
        return 1.0 / self.cv**2

    @property
    def scale(self) -> float:
        return self.cv**2 / self.rate

    def inter_arrivals(self, n: int, rng: np.random.Generator) -> FloatArray:
        return rng.gamma(self.shape, self.scale, size=n)


@dataclass(frozen=True)
class Constant:
    """Evenly spaced arrivals, ``1 / rate`` apart: a noise-free load for tests and calibration."""

    rate: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)

    def inter_arrivals(self, n: int, rng: np.random.Generator) -> FloatArray:
        return np.full(n, 1.0 / self.rate, dtype=np.float64)


def arrival_times(process: ArrivalProcess, n: int, rng: np.random.Generator, start_s: float = 0.0) -> FloatArray:
    """Absolute arrival times of ``n`` requests: the first at ``start_s``, then one gap after another.

    Starting at the first request (rather than one gap in) makes a replay begin at once; the n - 1 gaps still carry
    the process's rate and CV.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    gaps = process.inter_arrivals(n - 1, rng)
    return start_s + np.concatenate(([0.0], np.cumsum(gaps)))
