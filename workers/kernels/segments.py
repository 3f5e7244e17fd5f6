"""XRAI's over-segmentation: Felzenszwalb regions at several scales, each dilated.

Kapishnikov et al. 2019 ("XRAI: Better Attributions Through Regions", arXiv:1906.02825,
section 3.1) segment the image with Felzenszwalb & Huttenlocher's graph method at several
scales so that small and large regions compete, and dilate every segment so that region
borders (where attributions often sit) belong to the regions on both sides. The settings are
the paper's reference implementation's: values min-max rescaled to [-1, 1], the image resized
to 224 x 224 (bicubic) for the segmentation so that the scales mean the same at every input
size, sigma 0.8, minimum segment 150 pixels (at 224 x 224), the labels resized back with
nearest neighbour, and a disk of radius 5 pixels (at the input's size) for the dilation.

Dilation works on each scale's label image at once: a pixel joins segment l when a pixel of
label l lies within the disk around it, so one scatter per disk offset builds every dilated
mask of the scale, rather than one morphological dilation per segment.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SCALES: tuple[float, ...] = (50.0, 100.0, 150.0, 250.0, 500.0, 1200.0)
SIGMA = 0.8
MIN_SEGMENT = 150
SEGMENT_SIZE = (224, 224)
DILATION_RADIUS = 5


def segment_masks(image: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES, *,
                  dilation_radius: int = DILATION_RADIUS) -> torch.Tensor:
    """Dilated segment masks `# (S, H, W)` bool of one image `# (H, W, C)` (any value range).

    Order: scale by scale as given, labels ascending within a scale; segments that vanish when
    the labels are resized back to H x W are left out.
    """
    from skimage.segmentation import felzenszwalb  # here: importing the kernels stays light
    from skimage.transform import resize

    height, width = image.shape[:2]
    low, high = float(image.min()), float(image.max())
    # [-1, 1]; a constant image has no edges: every scale gives it one segment.
    unit = (image - low) / (high - low) if high > low else np.zeros_like(image, dtype=np.float64)
    small = resize(unit * 2.0 - 1.0, SEGMENT_SIZE, order=3, mode="constant", preserve_range=True,
                   anti_aliasing=True)
    masks = []
    for scale in scales:
        labels = felzenszwalb(small, scale=float(scale), sigma=SIGMA, min_size=MIN_SEGMENT)
        labels = resize(labels, (height, width), order=0, preserve_range=True, mode="constant",
                        anti_aliasing=False).astype(np.int64)
        masks.append(dilated_label_masks(torch.from_numpy(labels), dilation_radius))
    return torch.cat(masks)


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) of a disk footprint: dy^2 + dx^2 <= radius^2, as skimage's `disk`."""
    span = range(-radius, radius + 1)
    return [(dy, dx) for dy in span for dx in span if dy * dy + dx * dx <= radius * radius]


def dilated_label_masks(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """One mask per label present in `labels` `# (H, W)` int64 >= 0, dilated by a disk: `# (L, H, W)`
    bool, labels ascending (a binary dilation with zero padding outside the image)."""
    height, width = labels.shape
    present, dense = torch.unique(labels, return_inverse=True)            # (L,), (H, W) in 0..L-1
    out = torch.zeros((present.numel(), height * width), dtype=torch.bool)
    if radius <= 0:
        out[dense.flatten(), torch.arange(height * width)] = True
        return out.view(-1, height, width)
    padded = F.pad(dense[None, None].float(), (radius,) * 4, value=-1.0)[0, 0].long()  # (H+2r, W+2r)
    # The label at p + (dy, dx) for every p and disk offset: p joins each such label's mask.
    near = torch.stack([padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width]
                        for dy, dx in disk_offsets(radius)])                 # (O, H, W)
    pixels = torch.arange(height * width).view(1, height, width).expand_as(near)
    inside = near >= 0
    out[near[inside], pixels[inside]] = True
    return out.view(-1, height, width)
