"""Batched similarity of two stacks of maps `# (N, H, W)`: Spearman rank correlation and SSIM, one value per pair.

Both are the measures of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps"), used here by the
randomization check, the stability check and class discrimination alike.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from workers.errors import InvalidArgument

# SSIM constants of Wang et al. 2004 for a data range of 1 (maps are min-max normalized first).
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise InvalidArgument.field("maps", f"need two stacks of maps shaped (N, H, W), got {tuple(a.shape)} "
                                            f"and {tuple(b.shape)}")


def average_ranks(values: Tensor) -> Tensor:
    """Ranks `# (N, P)` (0-based, float64) of each row of `values` `# (N, P)`; ties get their average rank.

    Exact and batched: a value's rank is between the number of entries below it and the
    number of entries at or below it, found by binary search in the sorted row.
    """
    x = values.double()
    ordered = x.sort(dim=1).values
    below = torch.searchsorted(ordered, x, side="left")  # (N, P)
    at_or_below = torch.searchsorted(ordered, x, side="right")
    return (below + at_or_below - 1).double() / 2.0


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation `# (N,)` between maps `a[i]` and `b[i]` `# (N, H, W)`.

    The Pearson correlation of the average ranks (Spearman 1904). A constant map has no ranking:
    its correlation with anything is defined as 0 here (it shares no rank information).
    """
    _check_pair(a, b)
    ra = average_ranks(a.flatten(1))
    rb = average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)  # (N,)
    rho = (ra * rb).sum(dim=1) / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, rho, torch.zeros_like(rho)).float()


def _min_max(maps: Tensor) -> Tensor:
    flat = maps.flatten(1).double()
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    return ((flat - low) / span.clamp_min(1e-12)).view(maps.shape)


def _gaussian_window(like: Tensor) -> Tensor:
    radius = SSIM_WINDOW // 2
    grid = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    g = torch.exp(-(grid**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean structural similarity `# (N,)` of maps `a[i]`, `b[i]` `# (N, H, W)` (Wang et al. 2004).

    Each map is min-max normalized to [0, 1] first (data range 1), then the SSIM index is taken
    under an 11 x 11 Gaussian window (sigma 1.5), with C1 = (0.01)^2, C2 = (0.03)^2, over the
    positions where the window fits (no padding), and averaged: the definition of
    skimage's `structural_similarity(..., gaussian_weights=True, sigma=1.5, data_range=1)`.
    Maps smaller than the window use a window of their own size (odd).
    """
    _check_pair(a, b)
    x = _min_max(a).unsqueeze(1)  # (N, 1, H, W) float64
    y = _min_max(b).unsqueeze(1)
    window = _gaussian_window(x)
    side = min(x.shape[-2], x.shape[-1])
    if side < SSIM_WINDOW:
        size = side if side % 2 else side - 1
        window = torch.full((1, 1, size, size), 1.0 / (size * size), dtype=x.dtype, device=x.device)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    # skimage corrects the window variances to the sample (n - 1) form; so do we, for agreement.
    n = window.shape[-1] * window.shape[-2]
    correction = n / (n - 1) if n > 1 else 1.0
    var_x, var_y, cov = var_x * correction, var_y * correction, cov * correction
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1).float()


def mean_pairwise_spearman(maps: Tensor) -> Tensor:
    """Mean Spearman correlation `# (N,)` over the pairs of maps of each item, `maps` `# (N, K, H, W)`."""
    if maps.dim() != 4 or maps.shape[1] < 2:
        raise InvalidArgument.field("maps", f"need (N, K, H, W) with K >= 2, got {tuple(maps.shape)}")
    k = maps.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    rho = torch.stack([spearman(maps[:, i], maps[:, j]) for i, j in pairs], dim=1)  # (N, pairs)
    return rho.mean(dim=1)


__all__ = ["average_ranks", "spearman", "ssim", "mean_pairwise_spearman"]
