"""From the library's results to an evaluation's answer: metric values with their verdicts, the
report's figures, and the ranking of the methods.

Verdicts (MetricData.reference / passed), where a metric has a chance level or a threshold:
    deletion / insertion gain over the random order: reference 0; passed when the interval lies above 0;
    model / data randomization Spearman: reference the threshold; passed when the decisive step's mean
        is at or below it (workers/evaluation/randomization.py);
    pointing game, IoU, energy in box: reference the ground truth's mean share of the image (chance);
        passed when the interval lies above it;
    completeness relative error: reference the 5 % tolerance; passed when the interval lies below it.

Ranking. Each ranking criterion present (the deletion gain and the insertion gain under each baseline,
the pointing game's hit rate) ranks the methods by their mean, best 1, ties sharing the average rank,
an unscored (NaN) mean last. A method's score is its mean rank over the criteria; methods that failed a
randomization check come after every method that did not, whatever their rank. The recommendation is
the first method of the ranking that failed no randomization check; none when no ranking criterion was
computed or every method failed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from workers.evaluation.aggregate import aggregate, as_values
from workers.evaluation.jobspec import (DELETION, INSERTION, POINTING_GAME, EvalOptions, MethodOutcome,
                                        MetricData, RandomizationData)
from workers.evaluation.randomization import RandomizationResult

RANKING_STATISTICS = {DELETION: "gain_vs_random", INSERTION: "gain_vs_random", POINTING_GAME: "hit"}


def metric_data(metric: str, variant: str, statistic: str, values, options: EvalOptions, *,
                reference: float | None = None, passed: bool | None = None) -> MetricData:
    """Per-item `values` `# (N,)` aggregated with the job's bootstrap settings."""
    array = as_values(values)
    agg = aggregate(array, confidence=options.confidence, resamples=options.bootstrap_samples, seed=options.seed)
    return MetricData(metric, variant, statistic, array.astype(np.float32), agg.mean, agg.ci_low, agg.ci_high,
                      agg.missing, reference, passed)


def above(data: MetricData, reference: float) -> MetricData:
    """`data` judged against a chance level: passed when its interval lies above `reference`."""
    data.reference, data.passed = float(reference), bool(np.isfinite(data.ci_low) and data.ci_low > reference)
    return data


def below(data: MetricData, reference: float) -> MetricData:
    """`data` judged against a tolerance: passed when its interval lies below `reference`."""
    data.reference, data.passed = float(reference), bool(np.isfinite(data.ci_high) and data.ci_high <= reference)
    return data


def min_max(maps: torch.Tensor) -> np.ndarray:
    """Each map `# (N, H, W)` scaled to [0, 1] on its own (a constant map is all zeros), float32."""
    flat = maps.detach().float().cpu().flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = (flat.max(dim=1, keepdim=True).values - low).clamp_min(torch.finfo(torch.float32).tiny)
    return ((flat - low) / span).view_as(maps).numpy().astype(np.float32)


def randomization_figure(result: RandomizationResult, mode: str, items: int) -> RandomizationData:
    """The first `items` items' maps, trained then after each step, and each step's mean Spearman."""
    steps, previous = ["trained"], ()
    for step in result.steps:
        added = [layer for layer in step.layers if layer not in previous]
        steps.append("+".join(added or step.layers))
        previous = step.layers if mode == "cascading" else ()
    planes = [result.trained_maps[:items]] + [maps[:items] for maps in result.randomized_maps]
    maps = np.stack([min_max(p) for p in planes])  # (steps, items, H, W)
    spearman = [1.0] + [float(step.spearman.aggregate.mean) for step in result.steps]
    return RandomizationData(mode, steps, maps, spearman)


def _ranks(means: Sequence[float]) -> list[float]:
    """Rank 1 = the largest mean; ties share the average rank; NaN ranks after every number."""
    keyed = [(-m if math.isfinite(m) else math.inf) for m in means]
    order = sorted(range(len(keyed)), key=lambda i: keyed[i])
    ranks = [0.0] * len(keyed)
    position = 0
    while position < len(order):
        end = position
        while end + 1 < len(order) and keyed[order[end + 1]] == keyed[order[position]]:
            end += 1
        for index in order[position:end + 1]:
            ranks[index] = (position + end) / 2.0 + 1.0
        position = end + 1
    return ranks


def rank_methods(methods: Sequence[MethodOutcome]) -> tuple[list[str], str, list[str]]:
    """(labels best first, the recommended label or "", the metrics the ranking used); see the module docstring."""
    criteria: dict[tuple[str, str], list[float]] = {}
    for index, method in enumerate(methods):
        for m in method.metrics:
            if RANKING_STATISTICS.get(m.metric) == m.statistic:
                criteria.setdefault((m.metric, m.variant), [math.nan] * len(methods))[index] = m.mean
    totals = [0.0] * len(methods)
    for means in criteria.values():
        for index, rank in enumerate(_ranks(means)):
            totals[index] += rank
    mean_rank = [t / len(criteria) if criteria else 0.0 for t in totals]
    order = sorted(range(len(methods)), key=lambda i: (methods[i].failed_randomization, mean_rank[i], i))
    ranking = [methods[i].label for i in order]
    passing = [methods[i].label for i in order if not methods[i].failed_randomization]
    recommended = passing[0] if criteria and passing else ""
    used = list(dict.fromkeys(metric for metric, _ in criteria))
    return ranking, recommended, used
