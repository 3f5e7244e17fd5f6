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


# The report's figure keeps at most this many randomization steps (the first, the last and evenly spaced ones
# between: a deep net re-initialises dozens of layers) at most this many pixels a side, so an evaluation's
# result stays a few MB whatever the model (every step's Spearman is in the metrics in full).
FIGURE_STEPS, FIGURE_SIDE = 8, 64


def _figure_planes(maps: torch.Tensor) -> np.ndarray:
    """Maps `# (n, H, W)` area-averaged down to at most FIGURE_SIDE a side, then min-max scaled."""
    h, w = maps.shape[-2:]
    if max(h, w) > FIGURE_SIDE:
        size = (max(1, round(h * FIGURE_SIDE / max(h, w))), max(1, round(w * FIGURE_SIDE / max(h, w))))
        maps = torch.nn.functional.adaptive_avg_pool2d(maps.detach().float().cpu().unsqueeze(1), size).squeeze(1)
    return min_max(maps)


def randomization_figure(result: RandomizationResult, mode: str, items: int) -> RandomizationData:
    """The first `items` items' maps, trained then after each kept step (at most FIGURE_STEPS), and each
    kept step's mean Spearman."""
    names, previous = [], ()
    for step in result.steps:
        added = [layer for layer in step.layers if layer not in previous]
        names.append("+".join(added or step.layers))
        previous = step.layers if mode == "cascading" else ()
    count = len(result.steps)
    keep = sorted({round(i * (count - 1) / (FIGURE_STEPS - 1)) for i in range(FIGURE_STEPS)}) if count else []
    keep = keep if count > FIGURE_STEPS else list(range(count))
    planes = [result.trained_maps[:items]] + [result.randomized_maps[i][:items] for i in keep]
    maps = np.stack([_figure_planes(p) for p in planes])  # (kept steps + 1, items, h, w)
    spearman = [1.0] + [float(result.steps[i].spearman.aggregate.mean) for i in keep]
    return RandomizationData(mode, ["trained"] + [names[i] for i in keep], maps, spearman)


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
