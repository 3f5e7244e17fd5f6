"""XRAI (Kapishnikov et al. 2019, "XRAI: Better Attributions Through Regions", arXiv:1906.02825):
Integrated Gradients attributions summed over image regions, regions ranked greedily.

1. Attributions: Integrated Gradients from a black and from a white baseline (pixel values 0 and 1
   in every channel, in model space), averaged, as the paper does; both run through the folded IG
   kernel (workers/kernels/gradients.py) in one fold, the items grouped so that a fold fills about
   one backward chunk. Channels are reduced by their maximum, as the reference implementation.
2. Regions: Felzenszwalb over-segmentation at several scales, each segment dilated
   (workers/kernels/segments.py), on the image in pixel space.
3. Selection: starting from nothing, repeatedly add the region whose not-yet-covered pixels have
   the highest mean attribution (the gain density), until no region adds at least
   `min_pixel_diff` new pixels; pixels never covered get the mean attribution over themselves.

The map gives every pixel the gain of the region that added it, as the reference implementation's
saliency output: high where the first, densest regions lie, constant inside each added region.
Region sums are kept up to date incrementally (each pixel is subtracted from the regions holding
it once, when it is covered), so the selection costs O(regions x pixels) in all rather than per
step; the reported gain of each chosen region is its mean taken afresh over its new pixels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from workers.batching import FoldBudget, FoldWatch, rows_per_chunk
from workers.errors import Cancelled, InvalidArgument
from workers.kernels.cam import check_batch
from workers.kernels.gradients import GradientLimits, GradientRequest, explain_gradients
from workers.kernels.perturbation import IsCancelled, Progress
from workers.kernels.segments import DEFAULT_SCALES, segment_masks

MAX_SCALES = 16
MAX_SCALE = 100_000.0
MIN_PIXEL_DIFF = 50  # the reference implementation's: regions adding fewer new pixels are dropped


def check_xrai_params(steps: int, scales: Sequence[float], max_steps: int = 4096) -> tuple[float, ...]:
    """The scales as floats; typed errors naming the XraiParams field out of its range."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise InvalidArgument.field("xrai.steps", f"must be an integer in [1, {max_steps}], got {steps!r}")
    scales = tuple(scales)
    if not 1 <= len(scales) <= MAX_SCALES:
        raise InvalidArgument.field("xrai.segmentation_scales", f"give 1 to {MAX_SCALES} scales, got {len(scales)}")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not 0.0 < scale <= MAX_SCALE:
            raise InvalidArgument.field("xrai.segmentation_scales", f"each scale must lie in (0, {MAX_SCALE:g}], "
                                                                    f"got {scale!r}")
    return tuple(float(s) for s in scales)


def xrai(model: nn.Module, inputs: Tensor, targets: Tensor, *, mean: Sequence[float], std: Sequence[float],
         steps: int = 32, scales: Sequence[float] = DEFAULT_SCALES, budget: FoldBudget = FoldBudget(),
         num_classes: int | None = None, progress: Progress = None, cancelled: IsCancelled = None) -> Tensor:
    """XRAI maps `# (N, H, W)` float32 on the inputs' device for model-space `inputs` `# (N, C, H, W)`
    and `targets` `# (N,)`; `mean`/`std` are the model's pixel statistics (baselines, segmentation)."""
    check_batch(inputs, targets)
    scales = check_xrai_params(steps, scales)
    n, channels = inputs.shape[:2]
    if len(mean) != channels or len(std) != channels:
        raise InvalidArgument.field("input_spec", f"mean and std need {channels} values")
    mean_t = torch.tensor(list(mean), dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
    chunk = rows_per_chunk(model, tuple(inputs.shape[1:]), budget, device=inputs.device, dtype=inputs.dtype)
    group = max(1, chunk // (2 * steps))  # items whose IG rows fill about one backward chunk
    maps = torch.empty((n, *inputs.shape[-2:]), dtype=torch.float32, device=inputs.device)
    masks, segmented = None, None
    for start in range(0, n, group):
        if cancelled is not None and cancelled():
            raise Cancelled(f"xrai cancelled after {start} of {n} items")
        part = slice(start, min(n, start + group))
        attributions = ig_attributions(model, inputs[part], targets[part], mean_t, std_t, steps, budget,
                                       num_classes, cancelled).amax(dim=1)  # (g, H, W)
        pixels = (inputs[part] * std_t + mean_t).permute(0, 2, 3, 1).double().cpu().numpy()  # (g, H, W, C)
        for i in range(pixels.shape[0]):
            # Rows of one item repeated for several targets (top-k) share its segments.
            if masks is None or not np.array_equal(pixels[i], segmented):
                masks, segmented = segment_masks(pixels[i], scales), pixels[i]  # (S, H, W)
            maps[start + i] = xrai_regions(attributions[i], masks).to(maps.device, torch.float32)
        if progress is not None:
            progress(part.stop / n)
    return maps


def ig_attributions(model: nn.Module, inputs: Tensor, targets: Tensor, mean: Tensor, std: Tensor, steps: int,
                    budget: FoldBudget, num_classes: int | None, cancelled: IsCancelled = None) -> Tensor:
    """IG from the black and the white baseline, averaged: `# (N, C, H, W)` float32."""
    black = ((0.0 - mean) / std).expand_as(inputs).contiguous()
    white = ((1.0 - mean) / std).expand_as(inputs).contiguous()
    requests = [GradientRequest(inputs, targets, "integrated_gradients", steps=steps, baselines=b)
                for b in (black, white)]
    limits = GradientLimits(max_samples=1, max_steps=steps, max_items=int(inputs.shape[0]))
    watch = FoldWatch(lambda _: cancelled is None or not cancelled())
    results = explain_gradients(model, requests, budget, limits, num_classes, watch=watch)
    if watch.dropped or any(r is None for r in results):
        raise Cancelled("xrai cancelled during its Integrated Gradients")
    return (results[0].attributions + results[1].attributions) / 2       # (N, C, H, W)


def xrai_regions(attributions: Tensor, masks: Tensor, min_pixel_diff: int = MIN_PIXEL_DIFF) -> Tensor:
    """The XRAI map `# (H, W)` float64 (CPU) from attributions `# (H, W)` and region masks `# (S, H, W)`.

    Greedy: the region of highest mean attribution over its uncovered pixels is added while any
    region adds at least `min_pixel_diff` uncovered pixels (ties: the first region); each pixel
    holds the gain of the region that covered it, uncovered pixels the mean over themselves.
    """
    if isinstance(min_pixel_diff, bool) or not isinstance(min_pixel_diff, int) or min_pixel_diff < 1:
        raise InvalidArgument.field("min_pixel_diff", f"must be a positive integer, got {min_pixel_diff!r}")
    height, width = attributions.shape
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (height, width):
        raise InvalidArgument.field("segments", f"must be shaped (S, {height}, {width}), got {tuple(masks.shape)}")
    attr = attributions.detach().to("cpu", torch.float64).flatten()         # (P,)
    regions = masks.to("cpu", torch.bool).flatten(1)                         # (S, P)
    counts = regions.sum(dim=1)                                              # (S,) uncovered pixels per region
    sums = torch.cat([r.double() @ attr for r in regions.split(256)])        # (S,) their attribution
    alive = counts >= min_pixel_diff
    covered = torch.zeros_like(attr, dtype=torch.bool)
    out = torch.full_like(attr, -math.inf)
    while bool(alive.any()):
        gains = torch.where(alive, sums / counts.clamp_min(1), -math.inf)
        best = int(gains.argmax())                                           # first of equal gains
        new = (regions[best] & ~covered).nonzero().flatten()                 # pixels it adds
        out[new] = attr[new].mean()
        covered[new] = True
        holding = regions[:, new]                                            # (S, |new|)
        counts -= holding.sum(dim=1)
        sums -= holding.double() @ attr[new]
        alive &= counts >= min_pixel_diff
    if not bool(covered.all()):
        out[~covered] = attr[~covered].mean()
    return out.view(height, width)
