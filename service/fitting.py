"""A decoded image of any size -> the model's input size, by the model's resize policy.

`stretch` scales each side to the model's (the aspect ratio is not kept); `center_crop` scales
the image to cover (H, W) / crop_fraction and keeps the centre H x W, as torchvision's
classification transforms do (Resize(256) + CenterCrop(224) is crop_fraction 0.875);
`letterbox` scales it to fit inside H x W with its aspect ratio and pads the rest with the
model's mean, which is zero once normalized. Every fit also says where the model's input lies
in the image (`SourceGeometry`, in the full-size image's pixels), which is what lets a map be
drawn back over the photo: only the region the model saw carries attribution, and padding maps
outside the photo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.spec import ModelDescription, SourceGeometry


def _resize(x: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """`# (1, C, h, w)` uint8 (channels-last) or float -> `# (1, C, rows, columns)`, antialiased bilinear."""
    if tuple(x.shape[-2:]) == (rows, columns):
        return x
    if x.dtype == torch.uint8:
        # The uint8 kernel takes a channels-last tensor as it is: 4x less memory and ~5x faster than
        # float, at most one grey level apart.
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.to(torch.float32)
    return F.interpolate(x, size=(rows, columns), mode="bilinear", antialias=True, align_corners=False)


def fit(x: torch.Tensor, scale: float, model: ModelDescription, source: tuple[int, int]) -> tuple[
        torch.Tensor, SourceGeometry]:
    """Decoded samples `# (1, C, r, c)` (integers up to `scale`) -> pixel space `# (1, C, H, W)` in [0, 1].

    source: the full image's (width, height), of which the r x c samples are a reduction.
    """
    rows, columns = int(x.shape[-2]), int(x.shape[-1])
    height, width = model.height, model.width
    # Box (x0, y0, x1, y1) of the model's input, in the decoded samples' pixels.
    if model.resize == "center_crop":
        s = max(height / (model.crop_fraction * rows), width / (model.crop_fraction * columns))
        crop_rows = min(rows, max(1, round(height / s)))
        crop_columns = min(columns, max(1, round(width / s)))
        top, left = (rows - crop_rows) // 2, (columns - crop_columns) // 2
        x = _resize(x[..., top:top + crop_rows, left:left + crop_columns], height, width)
        box = (left, top, left + crop_columns, top + crop_rows)
        out = _to_unit(x, scale)
    elif model.resize == "letterbox":
        s = min(height / rows, width / columns)
        fit_rows, fit_columns = min(height, max(1, round(rows * s))), min(width, max(1, round(columns * s)))
        top, left = (height - fit_rows) // 2, (width - fit_columns) // 2
        out = torch.tensor(model.mean, dtype=torch.float32).view(1, -1, 1, 1).repeat(1, 1, height, width)
        out[..., top:top + fit_rows, left:left + fit_columns] = _to_unit(_resize(x, fit_rows, fit_columns), scale)
        per_column, per_row = columns / fit_columns, rows / fit_rows
        box = (-left * per_column, -top * per_row, (width - left) * per_column, (height - top) * per_row)
    else:
        out = _to_unit(_resize(x, height, width), scale)
        box = (0, 0, columns, rows)
    source_width, source_height = source if source[0] and source[1] else (columns, rows)
    sx, sy = source_width / columns, source_height / rows
    return out.contiguous(), SourceGeometry(
        width=source_width, height=source_height, resize=model.resize,
        x0=box[0] * sx, y0=box[1] * sy, x1=box[2] * sx, y1=box[3] * sy)


def _to_unit(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Bilinear weights are non-negative: the result stays within the samples' range, [0, 1] once scaled.
    # Divided, not multiplied by 1/scale: bit-identical to a raw uint8 tensor sent as PIXELS.
    return x.to(torch.float32).div_(scale)
