"""Channel reduction and per-map normalization, batched on the device.

Runs once per request over all of its maps, before the one copy to the host,
so the bytes that leave the device are already the size the client asked for.
"""
from __future__ import annotations

import torch

_EPS = 1e-12


def reduce_channels(maps: torch.Tensor, reduction: str) -> torch.Tensor:
    """(M, C, H, W) -> (M, H, W) for abs_max / sum; unchanged for none.

    Maps that are already single-plane (M, H, W) (CAM family) pass through.
    """
    if maps.dim() == 3 or reduction == "none":
        return maps
    if reduction == "abs_max":
        return maps.abs().amax(dim=1)
    if reduction == "sum":
        return maps.sum(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def normalize(maps: torch.Tensor, normalization: str) -> torch.Tensor:
    """Per map (dim 0): `max_abs` -> [-1, 1], `min_max` -> [0, 1], `none` unchanged."""
    if normalization == "none":
        return maps
    flat = maps.reshape(maps.shape[0], -1)  # (M, P)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    if normalization == "max_abs":
        scale = flat.abs().amax(dim=1).clamp_min(_EPS)
        return maps / scale.view(shape)
    if normalization == "min_max":
        low = flat.amin(dim=1).view(shape)
        span = (flat.amax(dim=1).view(shape) - low).clamp_min(_EPS)
        return (maps - low) / span
    raise ValueError(f"unknown normalization {normalization!r}")


def finish_maps(maps: torch.Tensor, reduction: str, normalization: str) -> torch.Tensor:
    """Reduce, normalize, and copy to the host as float32 in one step."""
    out = normalize(reduce_channels(maps.float(), reduction), normalization)
    return out.to("cpu", non_blocking=False).contiguous()
