"""The items a client's kept file may stand for, for `audit verify --inputs`: each way the server could
have read it (PNG/JPEG decoded and normalized; .npy as NCHW or NHWC, in PIXELS or MODEL space)."""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from service import codec
from workers.errors import AttributionError
from workers.spec import ModelDescription

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def client_items(path: pathlib.Path, model: ModelDescription) -> list[torch.Tensor]:
    """Model-space items `# (C, H, W)` a kept file may stand for: as sent in MODEL or PIXELS space."""
    suffix = path.suffix.lower()
    try:
        if suffix in _IMAGE_SUFFIXES:
            pixels = codec.decode_image(path.read_bytes(), model, 1 << 30, str(path))  # (1, C, H, W)
            return [codec.normalize(pixels, model)[0]]
        if suffix != ".npy":
            return []
        raw = torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError, AttributionError):
        return []
    batch = raw.unsqueeze(0) if raw.dim() == 3 else raw
    if batch.dim() != 4:
        return []
    views = [batch, batch.permute(0, 3, 1, 2)]  # NCHW, or NHWC as a client may keep it
    items = []
    for x in views:
        if tuple(x.shape[1:]) != (model.channels, model.height, model.width):
            continue
        pixel = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        spaces = [codec.normalize(pixel, model)] + ([] if x.dtype == torch.uint8 else [x.to(torch.float32)])
        items.extend(t.contiguous() for space in spaces for t in space)
    return items
