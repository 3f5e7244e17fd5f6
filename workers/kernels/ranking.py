"""Class ranking: one tie-breaking rule for every place that picks a class.

Classes are ranked by softmax probability, best first; classes with equal
probabilities rank by class index, lowest first. `torch.topk` leaves the order of
ties unspecified (it differs between devices and sizes), and an argmax of the
logits can pick a class whose probability ties with a lower-indexed one after
rounding, so the gradient methods (targets from the prediction forward), the CAM
pass (targets from its own logits) and `predicted_classes` could each name a
different class for one item. Every one of them ranks with these functions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def class_probabilities(logits: Tensor) -> Tensor:
    """Softmax probabilities `(N, classes)` float32 from logits `(N, classes)`: what the ranking compares."""
    return torch.softmax(logits.float(), dim=1)


def top_classes(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best classes per row, `(values, indices)` each `(N, k)`: highest probability first, ties by
    lowest class index (a stable sort keeps the index order among equal values)."""
    values, indices = torch.sort(probs, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def predicted_classes(probs: Tensor) -> Tensor:
    """The top class per row `(N,)` int64, by the same rule as `top_classes`."""
    return top_classes(probs, 1)[1][:, 0]
