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
    flat = maps.flatten(1).float()
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    return ((flat - low) / span.clamp_min(1e-12)).view(maps.shape)


def _window_1d(size: int, gaussian: bool, like: Tensor) -> Tensor:
    """The separable window's taps `# (size,)`, summing to one."""
    if not gaussian:
        return torch.full((size,), 1.0 / size, dtype=like.dtype, device=like.device)
    grid = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    g = torch.exp(-(grid**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _local_means(planes: Tensor, taps: Tensor) -> Tensor:
    """Window means `# (B, 1, H-s+1, W-s+1)` of `planes` `# (B, 1, H, W)`: two 1-D passes, no padding."""
    size = taps.shape[0]
    out = F.conv2d(planes, taps.view(1, 1, 1, size))
    return F.conv2d(out, taps.view(1, 1, size, 1))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean structural similarity `# (N,)` of maps `a[i]`, `b[i]` `# (N, H, W)` (Wang et al. 2004).

    Each map is min-max normalized to [0, 1] first (data range 1), then the SSIM index is taken
    under an 11 x 11 Gaussian window (sigma 1.5), with C1 = (0.01)^2, C2 = (0.03)^2 and sample
    (n - 1) window covariances, over the positions where the window fits (no padding), and
    averaged: skimage's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
    data_range=1)`. Maps smaller than the window use a uniform window of their own (odd) size.
    The window is separable, so it runs as two 1-D passes over the five planes at once.
    """
    _check_pair(a, b)
    n = a.shape[0]
    x = _min_max(a).unsqueeze(1)  # (N, 1, H, W) float32
    y = _min_max(b).unsqueeze(1)
    side = min(x.shape[-2], x.shape[-1])
    size = SSIM_WINDOW if side >= SSIM_WINDOW else (side if side % 2 else side - 1)
    taps = _window_1d(size, size == SSIM_WINDOW, x)
    means = _local_means(torch.cat([x, y, x * x, y * y, x * y]), taps).view(5, n, -1)  # (5, N, P)
    mu_x, mu_y, xx, yy, xy = means.double()
    # skimage corrects the window variances to the sample (n - 1) form; so do we, for agreement.
    count = size * size
    correction = count / (count - 1) if count > 1 else 1.0
    var_x = (xx - mu_x**2) * correction
    var_y = (yy - mu_y**2) * correction
    cov = (xy - mu_x * mu_y) * correction
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=1).float()


def mean_pairwise_spearman(maps: Tensor) -> Tensor:
    """Mean Spearman correlation `# (N,)` over the pairs of maps of each item, `maps` `# (N, K, H, W)`."""
    if maps.dim() != 4 or maps.shape[1] < 2:
        raise InvalidArgument.field("maps", f"need (N, K, H, W) with K >= 2, got {tuple(maps.shape)}")
    k = maps.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    rho = torch.stack([spearman(maps[:, i], maps[:, j]) for i, j in pairs], dim=1)  # (N, pairs)
    return rho.mean(dim=1)


__all__ = ["average_ranks", "spearman", "ssim", "mean_pairwise_spearman"]
