"""One tie-breaking rule: gradient targets, CAM targets and predicted_classes name the same class (issue 18).

The model outputs exact ties among classes far apart in index, where `torch.topk`
ranks the highest index first: before the rule, the gradient methods (argmax of the
probabilities), the CAM pass (argmax of its logits) and `predicted_classes[0]`
(topk) could name different classes for one item.
"""
from __future__ import annotations

import torch
from torch import nn

from workers.kernels.cam import CamRequest, explain_cam
from workers.kernels.hooks import LayerTaps
from workers.kernels.ranking import class_probabilities, predicted_classes, top_classes
from workers.spec import TargetSpec
from workers.stages import build_items, resolve_targets

CLASSES = 1000
TIED = (5, 700, 999)  # equal logits, the highest of all


class Tied(nn.Module):
    """A conv (the CAM layer) whose output moves the logits by exactly zero: every input ties TIED."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        bias = torch.zeros(CLASSES)
        bias[list(TIED)] = 2.0
        bias[3] = 1.0
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).mean(dim=(1, 2, 3))                      # (N,)
        return self.bias + 0.0 * features[:, None]                       # (N, CLASSES)


def _model() -> Tied:
    model = Tied().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_ties_rank_lowest_index_first_where_topk_does_not():
    probs = class_probabilities(_model()(torch.zeros(2, 3, 8, 8)))
    assert torch.topk(probs, 3).indices[0].tolist() != list(TIED)  # the order the rule replaces
    values, indices = top_classes(probs, 4)
    assert indices.tolist() == [[*TIED, 3]] * 2 and values[:, 0].tolist() == values[:, 2].tolist()
    assert predicted_classes(probs).tolist() == [TIED[0]] * 2


def test_gradient_cam_and_predicted_classes_name_the_same_class():
    model = _model()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    probs = class_probabilities(model(x))
    gradient_targets, _ = resolve_targets(TargetSpec(), probs, CLASSES, 3, x.device)
    top3, k = resolve_targets(TargetSpec(kind="top_k", k=3), probs, CLASSES, 3, x.device)
    with LayerTaps(model, ["conv"]) as taps:
        cam = explain_cam(model, taps, [CamRequest(x, None, "conv")])[0]
    items = build_items(class_probabilities(cam.logits), cam.targets, 1, {"grad_cam": cam.maps["grad_cam"]})
    assert gradient_targets.tolist() == cam.targets.tolist() == [TIED[0]] * 3
    assert [item.predicted_classes[0] for item in items] == [TIED[0]] * 3
    assert [item.attributions[0].target for item in items] == [TIED[0]] * 3
    assert k == 3 and top3.view(3, 3).tolist() == [list(TIED)] * 3
    assert [item.predicted_classes[:4] for item in items] == [[*TIED, 3]] * 3
