"""Per-item values -> the numbers a report shows: mean and a seeded bootstrap confidence interval.

Every metric of this package scores each item on its own (a value per item), then
aggregates with `aggregate`: the mean, and a percentile bootstrap interval (Efron &
Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13): resample the items with
replacement `resamples` times, take the mean of each resample, and report the
(1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means. The resampling
generator is seeded, so the same values always give the same interval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.errors import InvalidArgument

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Aggregate:
    """Mean of the finite per-item values and its bootstrap interval [ci_low, ci_high].

    n: the finite values aggregated; missing: the NaN values left out (an item a metric
    cannot score, e.g. a constant map's rank correlation). With n == 0 every number is NaN.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    missing: int = 0
    confidence: float = DEFAULT_CONFIDENCE


@dataclass(frozen=True)
class MetricResult:
    """One metric over a set of items: `values` `# (N,)` float64, one per item, and their aggregate."""

    name: str
    values: np.ndarray
    aggregate: Aggregate


def as_values(values: torch.Tensor | np.ndarray | list[float]) -> np.ndarray:
    """Per-item values as a float64 numpy vector `# (N,)` on the host."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InvalidArgument.field("values", f"must be one value per item, shape (N,), got {array.shape}")
    return array


def aggregate(values: torch.Tensor | np.ndarray | list[float], *, confidence: float = DEFAULT_CONFIDENCE,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Aggregate:
    """Mean and percentile-bootstrap interval of the finite entries of `values` `# (N,)`."""
    if not 0.0 < confidence < 1.0:
        raise InvalidArgument.field("confidence", f"must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise InvalidArgument.field("resamples", f"must be >= 1, got {resamples}")
    array = as_values(values)
    finite = array[np.isfinite(array)]
    missing = int(array.size - finite.size)
    if finite.size == 0:
        nan = float("nan")
        return Aggregate(nan, nan, nan, 0, missing, confidence)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, finite.size, size=(resamples, finite.size))  # (B, n)
    means = finite[picks].mean(axis=1)  # (B,)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return Aggregate(float(finite.mean()), float(low), float(high), int(finite.size), missing, confidence)


def metric(name: str, values: torch.Tensor | np.ndarray | list[float], *, seed: int = 0,
           confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES) -> MetricResult:
    """A `MetricResult` named `name` from per-item `values` `# (N,)`."""
    array = as_values(values)
    return MetricResult(name, array, aggregate(array, confidence=confidence, resamples=resamples, seed=seed))
