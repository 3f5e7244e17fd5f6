"""Aggregates (mean, bootstrap interval) and the batched similarity measures, against known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.errors import InvalidArgument
from workers.evaluation.aggregate import aggregate, metric
from workers.evaluation.similarity import average_ranks, mean_pairwise_spearman, spearman, ssim


def test_aggregate_is_seeded_and_brackets_the_mean() -> None:
    values = np.random.default_rng(1).normal(0.3, 0.1, size=200)
    first, again = aggregate(values, seed=7), aggregate(values, seed=7)
    assert first == again
    assert first.mean == pytest.approx(values.mean())
    assert first.ci_low < first.mean < first.ci_high
    # The percentile interval of a mean is about +-1.96 standard errors wide.
    assert first.ci_high - first.ci_low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.15)


def test_aggregate_leaves_out_nan_and_counts_it() -> None:
    result = aggregate([1.0, float("nan"), 3.0])
    assert (result.mean, result.n, result.missing) == (2.0, 2, 1)
    empty = aggregate([float("nan")])
    assert empty.n == 0 and np.isnan(empty.mean)


def test_constant_values_have_a_zero_width_interval() -> None:
    result = metric("x", torch.full((10,), 0.25))
    assert (result.aggregate.ci_low, result.aggregate.ci_high) == (0.25, 0.25)
    assert result.values.dtype == np.float64 and result.values.shape == (10,)


def test_aggregate_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        aggregate([1.0], confidence=1.5)
    with pytest.raises(InvalidArgument):
        aggregate(np.zeros((2, 2)))


def test_average_ranks_share_ties() -> None:
    ranks = average_ranks(torch.tensor([[10.0, 20.0, 20.0, 5.0]]))
    assert ranks.tolist() == [[1.0, 2.5, 2.5, 0.0]]


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 8, 8), generator=gen).float()  # many ties
    b = a + torch.randint(0, 3, (6, 8, 8), generator=gen).float()
    ours = spearman(a, b)
    for i in range(6):
        expected = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected, abs=1e-6)


def test_spearman_known_values_and_constant_maps() -> None:
    a = torch.arange(16.0).view(1, 4, 4)
    assert spearman(a, a * 3 + 1).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert spearman(a, torch.zeros_like(a)).item() == 0.0


def test_ssim_matches_skimage() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(3, 32, 32, generator=gen)
    b = (a + 0.3 * torch.rand(3, 32, 32, generator=gen)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(3):
        x = ((a[i] - a[i].min()) / (a[i].max() - a[i].min())).double().numpy()
        y = ((b[i] - b[i].min()) / (b[i].max() - b[i].min())).double().numpy()
        expected = metrics.structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=True)
        assert ours[i].item() == pytest.approx(expected, abs=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_mean_pairwise_spearman() -> None:
    a = torch.arange(16.0).view(1, 1, 4, 4)
    stacked = torch.cat([a, a * 2, -a], dim=1)  # pairs: +1, -1, -1
    assert mean_pairwise_spearman(stacked).item() == pytest.approx(-1 / 3)
    with pytest.raises(InvalidArgument):
        mean_pairwise_spearman(a)
