"""Class discrimination: does the map change with the class it explains?

Definition (the class-sensitivity question of Selvaraju et al. 2017, "Grad-CAM", section 5, made a
number): for each item, the maps of its top-k predicted classes (k = 3 by default) and the mean
Spearman rank correlation over the k(k-1)/2 pairs. Low (near 0 or negative) = the method points at
different evidence for different classes; near 1 = it shows the same picture whatever it is asked
(e.g. an edge map, or a gradient dominated by the input). Not a faithfulness proof either way: a
model can honestly use the same pixels for two classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.errors import InvalidArgument
from workers.evaluation.aggregate import MetricResult, metric
from workers.evaluation.randomization import Attribute
from workers.evaluation.similarity import mean_pairwise_spearman


@dataclass
class DiscriminationResult:
    """Mean pairwise rank correlation per item of the maps of its top-k classes, and those classes `# (N, k)`."""

    k: int
    classes: Tensor
    correlation: MetricResult


def class_discrimination(model: nn.Module, inputs: Tensor, attribute: Attribute, *, k: int = 3,
                         seed: int = 0) -> DiscriminationResult:
    """Explain each item `# (N, C, H, W)` for its top-k classes in one folded call, then compare the maps."""
    with torch.inference_mode():
        logits = model(inputs)
    if not 2 <= k <= logits.shape[1]:
        raise InvalidArgument.field("k", f"must be in 2..{logits.shape[1]} (the model's classes), got {k}")
    n = inputs.shape[0]
    classes = logits.topk(k, dim=1).indices  # (N, k)
    rows = inputs.repeat_interleave(k, dim=0)  # (N*k, C, H, W): item-major, class-minor
    maps = attribute(model, rows, classes.reshape(-1)).detach().float().cpu()  # (N*k, H, W)
    stacked = maps.view(n, k, *maps.shape[1:])  # (N, k, H, W)
    return DiscriminationResult(k, classes.cpu(), metric("class_discrimination", mean_pairwise_spearman(stacked),
                                                         seed=seed))
