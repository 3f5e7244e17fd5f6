"""Localisation against ground truth: does the map put its weight where the evidence is?

Ground truth per item is a box `(top, left, bottom, right)` (bottom/right exclusive, the demo's
`WatermarkBatch.boxes` layout) or a boolean mask `# (H, W)`, in the map's pixel coordinates.

    pointing game (Zhang et al. 2016/2018, "Top-down Neural Attention by Excitation Backprop"):
        a hit when the map's maximum lies in the ground truth (within `tolerance` px of it, the
        paper's 15 px; 0 here by default). Where several pixels share the maximum, a hit when any
        of them does (as Quantus's PointingGame).
    top-k IoU: the intersection over union of the map's top `fraction` pixels with the ground
        truth; `fraction=None` takes as many pixels as the ground truth has (so a perfect map
        scores 1).
    energy in box (Wang et al. 2020, "Score-CAM", the energy-based pointing game): the share of
        the map's positive mass inside the ground truth, sum(max(m, 0) * g) / sum(max(m, 0)).
Each is per item, in [0, 1]; chance level is about the ground truth's share of the image, which
`localisation` reports alongside (`area`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.errors import InvalidArgument
from workers.evaluation.aggregate import MetricResult, metric


@dataclass
class LocalisationResult:
    """One method's localisation scores over N items."""

    pointing_game: MetricResult
    iou: MetricResult
    energy_in_box: MetricResult
    area: MetricResult  # the ground truth's share of each image: the chance level of the three


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes `# (N, 4)` (top, left, bottom, right; exclusive) -> boolean masks `# (N, H, W)`."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise InvalidArgument.field("boxes", "must be shaped (N, 4) as (top, left, bottom, right)")
    height, width = size
    rows = torch.arange(height, device=boxes.device).view(1, -1, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, -1)
    b = boxes.long()
    return ((rows >= b[:, 0, None, None]) & (rows < b[:, 2, None, None])
            & (cols >= b[:, 1, None, None]) & (cols < b[:, 3, None, None]))


def ground_truth(maps: Tensor, boxes: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
    """The boolean ground truth `# (N, H, W)` of `maps` `# (N, H, W)` from exactly one of boxes / masks."""
    if maps.dim() != 3:
        raise InvalidArgument.field("maps", f"must be shaped (N, H, W), got {tuple(maps.shape)}")
    if (boxes is None) == (masks is None):
        raise InvalidArgument.field("ground_truth", "give exactly one of boxes or masks")
    truth = boxes_to_masks(boxes, tuple(maps.shape[1:])) if boxes is not None else masks.bool()
    if tuple(truth.shape) != tuple(maps.shape):
        raise InvalidArgument.field("ground_truth",
                                    f"must cover the maps {tuple(maps.shape)}, got {tuple(truth.shape)}")
    return truth.to(maps.device)


def pointing_game(maps: Tensor, truth: Tensor, tolerance: int = 0) -> Tensor:
    """Hits `# (N,)` float (1.0 / 0.0): a maximum of `maps[i]` inside `truth[i]` grown by `tolerance` px."""
    if tolerance > 0:  # grow the ground truth by a (2t+1)^2 square: max-pool of the mask
        side = 2 * tolerance + 1
        truth = F.max_pool2d(truth.float().unsqueeze(1), side, stride=1, padding=tolerance)[:, 0] > 0
    flat = maps.flatten(1)
    peaks = flat == flat.amax(dim=1, keepdim=True)  # (N, P)
    return (peaks & truth.flatten(1)).any(dim=1).float()


def topk_iou(maps: Tensor, truth: Tensor, fraction: float | None = None) -> Tensor:
    """IoU `# (N,)` of the top pixels of each map with its ground truth (ties broken by position)."""
    flat, gt = maps.flatten(1).float(), truth.flatten(1)
    pixels = flat.shape[1]
    if fraction is None:
        keep = gt.sum(dim=1)  # (N,)
    else:
        if not 0.0 < fraction <= 1.0:
            raise InvalidArgument.field("fraction", f"must be in (0, 1], got {fraction}")
        keep = torch.full((flat.shape[0],), max(1, round(fraction * pixels)), device=flat.device)
    rank = flat.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # (N, P) 0 = largest
    top = rank < keep[:, None]
    inter = (top & gt).sum(dim=1).float()
    union = (top | gt).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def energy_in_box(maps: Tensor, truth: Tensor) -> Tensor:
    """Share `# (N,)` of each map's positive mass inside its ground truth; NaN for a map with none."""
    positive = maps.flatten(1).float().clamp_min(0)
    total = positive.sum(dim=1)
    inside = (positive * truth.flatten(1)).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


def localisation(maps: Tensor, *, boxes: Tensor | None = None, masks: Tensor | None = None,
                 tolerance: int = 0, fraction: float | None = None, seed: int = 0) -> LocalisationResult:
    """Pointing game, top-k IoU and energy in box of `maps` `# (N, H, W)` against boxes `# (N, 4)` or
    masks `# (N, H, W)`, per item and aggregated (bootstrap seeded with `seed`)."""
    truth = ground_truth(maps, boxes, masks)
    area = truth.flatten(1).float().mean(dim=1)
    return LocalisationResult(
        pointing_game=metric("pointing_game", pointing_game(maps, truth, tolerance), seed=seed),
        iou=metric("topk_iou", topk_iou(maps, truth, fraction), seed=seed),
        energy_in_box=metric("energy_in_box", energy_in_box(maps, truth), seed=seed),
        area=metric("ground_truth_area", area, seed=seed))
