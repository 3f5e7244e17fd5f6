"""Integrated Gradients baselines (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks").

IG integrates gradients along the straight path from a baseline b to the input
x, so the attribution explains f(x) - f(b): the baseline decides what "absence
of signal" means. Every baseline is returned in model space `# (N, C, H, W)`,
the same space and layout as the inputs; pixel-space choices (black, uniform
noise, the dataset mean) are normalized with the model's per-channel mean/std.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.errors import InvalidArgument

BASELINE_KINDS = ("zero", "black", "blurred", "uniform_noise", "dataset_mean", "custom")
MAX_BLUR_SIGMA = 64.0
_FIELD = "integrated_gradients.baseline"


def make_baseline(kind: str, inputs: Tensor, *, mean: Sequence[float], std: Sequence[float],
                  seed: int, blur_sigma: float = 5.0, custom: Tensor | None = None) -> Tensor:
    """Build the IG baseline `# (N, C, H, W)` for model-space `inputs` `# (N, C, H, W)`.

    kind: "zero" (zeros in model space), "black" (pixel 0), "blurred" (Gaussian
    blur of the input, `blur_sigma` pixels, reflect padding), "uniform_noise"
    (pixels uniform in [0, 1] from a generator seeded with `seed`),
    "dataset_mean" (the mean pixel), "custom" (`custom`, `# (C, H, W)`,
    `# (1, C, H, W)` or `# (N, C, H, W)`, in model space).
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        raise InvalidArgument.field("inputs", "must be a floating tensor shaped (N, C, H, W)")
    if kind not in BASELINE_KINDS:
        raise InvalidArgument.field(
            f"{_FIELD}.kind", f"unknown baseline {kind!r}; choose one of {', '.join(BASELINE_KINDS)}")
    mean_t, std_t = _channel_stats(inputs, mean, std)
    return _make(kind, inputs, mean_t, std_t, seed, blur_sigma, custom)


def _make(kind: str, inputs: Tensor, mean: Tensor, std: Tensor, seed: int,
          blur_sigma: float, custom: Tensor | None) -> Tensor:
    if kind == "zero":
        return torch.zeros_like(inputs)
    if kind == "black":
        return ((0.0 - mean) / std).expand_as(inputs).clone()
    if kind == "dataset_mean":
        # The mean pixel normalizes to zero; computed, not assumed, so a spec
        # whose mean is not what it normalizes by still gets its mean image.
        return ((mean - mean) / std).expand_as(inputs).clone()
    if kind == "uniform_noise":
        generator = torch.Generator(device=inputs.device).manual_seed(_check_seed(seed))
        pixels = torch.rand(inputs.shape, generator=generator, dtype=inputs.dtype,
                            device=inputs.device)
        return (pixels - mean) / std
    if kind == "blurred":
        return gaussian_blur(inputs, _check_sigma(blur_sigma))
    return _custom(inputs, custom)


def _channel_stats(inputs: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    channels = inputs.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise InvalidArgument.field(
            "input_spec", f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
    if any(not math.isfinite(s) or s <= 0 for s in std) or any(not math.isfinite(m) for m in mean):
        raise InvalidArgument.field("input_spec.std", "std must be finite and positive, mean finite")
    as_tensor = lambda values: torch.tensor(  # noqa: E731 - (1, C, 1, 1) broadcast shape
        list(values), dtype=inputs.dtype, device=inputs.device).view(1, channels, 1, 1)
    return as_tensor(mean), as_tensor(std)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidArgument.field("seed", f"must be an integer in [0, 2^64), got {seed!r}")
    return seed


def _check_sigma(sigma: float) -> float:
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or not 0 < sigma <= MAX_BLUR_SIGMA:
        raise InvalidArgument.field(
            f"{_FIELD}.blur_sigma", f"must be in (0, {MAX_BLUR_SIGMA:g}] pixels, got {sigma!r}")
    return float(sigma)


def _gaussian_kernel(sigma: float, radius: int, like: Tensor) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=like.device)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(like.dtype)  # (K,)


def gaussian_blur(inputs: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of `inputs` `# (N, C, H, W)`, reflect padding, on its device.

    Blurring is linear with a kernel that sums to one, so it commutes with the
    per-channel affine normalization: blurring in model space equals blurring
    the pixels and normalizing. The kernel spans 3 sigma, truncated (and
    renormalized) where reflect padding would exceed the image.
    """
    radius = int(math.ceil(3.0 * sigma))
    out = _blur_axis(inputs, sigma, radius, axis=3)  # (N, C, H, W), along the width
    out = _blur_axis(out, sigma, radius, axis=2)  # (N, C, H, W), along the height
    return out if out is not inputs else inputs.clone()


def _blur_axis(x: Tensor, sigma: float, radius: int, axis: int) -> Tensor:
    radius = min(radius, x.shape[axis] - 1)  # reflect padding needs pad < size
    if radius <= 0:
        return x
    channels = x.shape[1]
    kernel = _gaussian_kernel(sigma, radius, x)  # (K,)
    if axis == 3:
        weight = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, kernel.numel())  # (C, 1, 1, K)
        padding = (radius, radius, 0, 0)
    else:
        weight = kernel.view(1, 1, -1, 1).expand(channels, 1, kernel.numel(), 1)  # (C, 1, K, 1)
        padding = (0, 0, radius, radius)
    # Depthwise: each channel blurred by itself.
    return F.conv2d(F.pad(x, padding, mode="reflect"), weight, groups=channels)


def _custom(inputs: Tensor, custom: Tensor | None) -> Tensor:
    field = f"{_FIELD}.tensor"
    if not isinstance(custom, Tensor):
        raise InvalidArgument.field(field, "a custom baseline needs a tensor")
    n, item_shape = inputs.shape[0], tuple(inputs.shape[1:])
    if custom.dim() == 3:
        custom = custom.unsqueeze(0)  # (1, C, H, W)
    if custom.dim() != 4 or tuple(custom.shape[1:]) != item_shape or custom.shape[0] not in (1, n):
        raise InvalidArgument.field(
            field, f"must be shaped {item_shape}, (1, *{item_shape}) or ({n}, *{item_shape}), "
                   f"got {tuple(custom.shape)}")
    if not custom.is_floating_point() or not bool(torch.isfinite(custom).all()):
        raise InvalidArgument.field(field, "must be a finite floating tensor")
    return custom.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs).clone()
