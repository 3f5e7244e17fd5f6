"""The rows and the reductions of two folded path methods: Expected Gradients (GradientSHAP) and Blur IG.

Expected Gradients (Erion et al. 2021, "Improving performance of deep learning models with axiomatic
attribution priors and expected gradients") averages, over S draws per item, the gradient at one
uniformly drawn point of the straight path from a baseline drawn from a reference set to the input,
times (input - baseline): a Monte Carlo estimate of IG averaged over a baseline distribution. With
Gaussian noise added to the input before each draw it is GradientSHAP (Lundberg & Lee 2017), as
Captum's `GradientShap` computes it:

    a = mean_s  grad f(b_s + alpha_s (x~_s - b_s)) * (x~_s - b_s),   x~_s = x + N(0, sigma^2)

Blur IG (Xu et al. 2020, "Attribution in Scale and Space") integrates along the path of Gaussian blurs
of the input, from a blur of `max_sigma` pixels down to the input itself, as PAIR's `saliency` library
defines it: sigma_i = i * max_sigma / T (i = 0..T-1, a left Riemann sum), the blur a separable
Gaussian truncated at 4 sigma with zero padding (scipy.ndimage.gaussian_filter, mode="constant"), and
d blur / d sigma the forward difference over 0.01 px:

    a = -(max_sigma / T) sum_i  grad f(B(x, sigma_i)) * (B(x, sigma_i + h) - B(x, sigma_i)) / h

Its attributions sum to about f(x) - f(B(x, max_sigma)). Zero padding is in model space: the blur
fades the border toward zero, which for a mean/std-normalized model is the dataset's mean colour.

Every draw comes from the request's own generator (seeded by the request seed), so a request's rows
are the same alone or folded with others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BLUR_TRUNCATE = 4.0   # scipy.ndimage.gaussian_filter's default: the kernel spans 4 sigma
BLUR_GRAD_STEP = 0.01  # px: the forward difference of d blur / d sigma (PAIR's grad_step)
MAX_BLUR_IG_SIGMA = 64.0


@dataclass(frozen=True)
class ExpectedGradientsDraws:
    """One request's random draws: the reference row of each sample `# (N, S)` int64, the point on
    its path `# (N, S)` in [0, 1) and the input noise `# (N, S, C, H, W)` (None when noise_stdev is 0)."""

    index: Tensor
    alphas: Tensor
    noise: Tensor | None


def expected_gradients_draws(inputs: Tensor, references: Tensor, samples: int, noise_stdev: float,
                             seed: int) -> ExpectedGradientsDraws:
    """The draws of one request, from a generator seeded with `seed` (in this order: references,
    points, noise); noise std per item is noise_stdev * (max - min) of the item."""
    n, device = inputs.shape[0], inputs.device
    gen = torch.Generator(device=device).manual_seed(seed)
    index = torch.randint(0, references.shape[0], (n, samples), generator=gen, device=device)
    alphas = torch.rand((n, samples), generator=gen, device=device, dtype=inputs.dtype)
    noise = None
    if noise_stdev > 0:
        noise = torch.randn((n, samples, *inputs.shape[1:]), generator=gen, device=device, dtype=inputs.dtype)
        spread = inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))  # (N,)
        noise.mul_((spread * noise_stdev).view(-1, 1, 1, 1, 1))
    return ExpectedGradientsDraws(index, alphas, noise)


def _noisy_and_baselines(inputs: Tensor, references: Tensor, draws: ExpectedGradientsDraws) -> tuple[Tensor, Tensor]:
    """x~ `# (N, S, C, H, W)` (the inputs plus noise, or the inputs broadcast) and each sample's baseline."""
    n, s = draws.index.shape
    baselines = references.to(inputs.dtype)[draws.index.reshape(-1)].view(n, s, *inputs.shape[1:])
    noisy = inputs.unsqueeze(1) if draws.noise is None else inputs.unsqueeze(1) + draws.noise
    return noisy.expand(n, s, *inputs.shape[1:]), baselines


def expected_gradients_rows(inputs: Tensor, references: Tensor, draws: ExpectedGradientsDraws, out: Tensor) -> None:
    """Writes the path points `# (N*S, C, H, W)` into `out`: alpha x~ + (1 - alpha) b, as Captum scales them."""
    noisy, baselines = _noisy_and_baselines(inputs, references, draws)
    alphas = draws.alphas.view(*draws.alphas.shape, 1, 1, 1)  # (N, S, 1, 1, 1)
    points = out.view(noisy.shape)
    torch.mul(alphas, noisy, out=points)
    points.add_((1 - alphas) * baselines)


def expected_gradients_reduce(inputs: Tensor, references: Tensor, draws: ExpectedGradientsDraws,
                              grads: Tensor) -> Tensor:
    """Row gradients `# (N*S, C, H, W)` -> attributions `# (N, C, H, W)` float32: mean_s g_s (x~_s - b_s)."""
    noisy, baselines = _noisy_and_baselines(inputs, references, draws)
    g = grads.float().view(noisy.shape)
    return (g * (noisy - baselines).float()).mean(dim=1)


# ----------------------------------------------------------------------------- Blur IG --

def _scipy_gaussian(sigma: float, device: torch.device) -> Tensor:
    """scipy.ndimage's normalized 1-D Gaussian `# (2r+1,)` float64, r = int(4 sigma + 0.5)."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    phi = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return phi / phi.sum()


def zero_padded_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of `x` `# (N, C, H, W)` over H and W as scipy.ndimage.gaussian_filter(mode="constant")
    computes it: separable, truncated at 4 sigma, zeros beyond the border; sigma 0 is `x` itself."""
    if sigma <= 0:
        return x.clone()
    kernel = _scipy_gaussian(float(sigma), x.device).to(x.dtype)
    k, channels = kernel.numel(), x.shape[1]
    if k == 1:
        return x.clone()
    radius = k // 2
    out = F.conv2d(x, kernel.view(1, 1, 1, k).expand(channels, 1, 1, k), padding=(0, radius), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, k, 1).expand(channels, 1, k, 1), padding=(radius, 0), groups=channels)


def blur_sigmas(max_sigma: float, steps: int) -> list[float]:
    """The path's sigmas, i * max_sigma / steps for i = 0..steps-1 (PAIR's, without its sqrt option)."""
    return [float(i) * max_sigma / float(steps) for i in range(steps)]


def blur_ig_rows(inputs: Tensor, max_sigma: float, steps: int, out: Tensor) -> None:
    """Writes the blurred path points `# (N*T, C, H, W)`, item-major, into `out`."""
    path = out.view(inputs.shape[0], steps, *inputs.shape[1:])  # (N, T, C, H, W)
    for i, sigma in enumerate(blur_sigmas(max_sigma, steps)):
        path[:, i] = zero_padded_blur(inputs, sigma)


def blur_ig_reduce(inputs: Tensor, max_sigma: float, steps: int, grads: Tensor) -> Tensor:
    """Row gradients `# (N*T, C, H, W)` -> attributions `# (N, C, H, W)` float32 (see the module's formula).

    The slope is a difference of two close blurs over 0.01 px, so it is taken in float64: in float32
    its rounding would be a hundred times the input's.
    """
    g = grads.view(inputs.shape[0], steps, *inputs.shape[1:])  # (N, T, C, H, W)
    x = inputs.double()
    total = torch.zeros(inputs.shape, dtype=torch.float64, device=inputs.device)
    for i, sigma in enumerate(blur_sigmas(max_sigma, steps)):
        if sigma == 0:  # the blur does not move at sigma 0: a zero slope (PAIR's difference gives 0 too)
            continue
        slope = (zero_padded_blur(x, sigma + BLUR_GRAD_STEP) - zero_padded_blur(x, sigma)) / BLUR_GRAD_STEP
        total += g[:, i].double() * slope
    return total.mul_(-float(max_sigma) / float(steps)).float()


def blur_ig_start(inputs: Tensor, max_sigma: float) -> Tensor:
    """The path's start, the input blurred by max_sigma: the attributions sum to about f(x) - f(start)."""
    return zero_padded_blur(inputs, max_sigma)


def check_max_sigma(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 < value <= MAX_BLUR_IG_SIGMA
