"""Integrated Gradients completeness, as a distribution over items.

Definition (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks", proposition 1):
IG's attributions sum to f_t(x) - f_t(b). The gradients kernel (workers/kernels/gradients.py)
reports per item the error |sum(a) - (f_t(x) - f_t(b))| / |f_t(x) - f_t(b)| (absolute where the
change is below COMPLETENESS_TINY), its `GradientResult.completeness_error` `# (N,)`. A large error
means the path integral was under-sampled (too few steps for the rule) or the model is not smooth
along the path: the map then is not IG's answer. A small error says the integral was computed
well, NOT that the baseline or the map are meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.evaluation.aggregate import MetricResult, as_values, metric

# Relative error above which an item is counted as not complete (Sundararajan et al. suggest
# checking that the sum is "within 5%" of the difference).
COMPLETENESS_TOLERANCE = 0.05


@dataclass
class CompletenessResult:
    """The errors per item and aggregated, their quantiles, and the share within the tolerance."""

    error: MetricResult
    quantiles: dict[str, float]  # p50, p90, p99, max
    within_tolerance: MetricResult  # per item 1.0 / 0.0
    tolerance: float


def completeness_distribution(errors: torch.Tensor | np.ndarray, *, tolerance: float = COMPLETENESS_TOLERANCE,
                              seed: int = 0) -> CompletenessResult:
    """Summarize IG completeness errors `# (N,)` (as the gradients kernel reports them)."""
    values = as_values(errors)
    finite = values[np.isfinite(values)]
    quantiles = ({name: float(np.quantile(finite, q)) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
                 if finite.size else {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")})
    quantiles["max"] = float(finite.max()) if finite.size else float("nan")
    within = np.where(np.isfinite(values), (values <= tolerance).astype(np.float64), np.nan)
    return CompletenessResult(metric("ig_completeness_error", values, seed=seed), quantiles,
                              metric("ig_within_tolerance", within, seed=seed), tolerance)
