"""Stability under augmentations, class discrimination and the IG completeness distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.workers.evaluation.conftest import edge_detector
from workers.errors import InvalidArgument
from workers.evaluation.completeness import completeness_distribution
from workers.evaluation.discrimination import class_discrimination
from workers.evaluation.stability import Augmentation, augment, brightness, shift, stability


class Linear4(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _grey(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A map that is the input itself: equivariant to shifts, rank-invariant to brightness."""
    return inputs.mean(dim=1)


def test_an_input_map_is_stable_under_shift_and_brightness() -> None:
    torch.manual_seed(0)
    model = Linear4().eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    targets = torch.zeros(3, dtype=torch.long)
    results = stability(model, x, targets, _grey, {"shift": shift(1, -2), "brightness": brightness(0.5),
                                                   "noise": Augmentation("noise", amount=0.5)})
    assert results["shift"].spearman.values == pytest.approx([1.0] * 3)
    assert results["brightness"].spearman.values == pytest.approx([1.0] * 3)
    assert results["noise"].spearman.aggregate.mean < 0.9
    assert set(results["shift"].prediction_kept.values) <= {0.0, 1.0}


def test_augmentations() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    moved = augment(x, shift(1, 0))
    assert torch.equal(moved[0, 0, 1:], x[0, 0, :3]) and torch.equal(moved[0, 0, 0], x[0, 0, 0])
    assert torch.equal(augment(x, Augmentation("noise", 0.1), seed=3), augment(x, Augmentation("noise", 0.1), seed=3))
    with pytest.raises(InvalidArgument):
        Augmentation("rotate")
    with pytest.raises(InvalidArgument):
        stability(Linear4(), torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), _grey, ["rotate"])


def test_a_class_blind_map_does_not_discriminate() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    result = class_discrimination(Linear4().eval(), x, edge_detector, k=3)
    assert result.classes.shape == (5, 3)
    assert result.correlation.values == pytest.approx([1.0] * 5)
    with pytest.raises(InvalidArgument):
        class_discrimination(Linear4().eval(), x, edge_detector, k=5)


def test_completeness_distribution() -> None:
    result = completeness_distribution(torch.tensor([0.0, 0.01, 0.02, 0.5, float("nan")]))
    assert result.quantiles["max"] == 0.5
    assert result.quantiles["p50"] == pytest.approx(0.015)
    assert result.within_tolerance.aggregate.mean == pytest.approx(3 / 4)
    assert result.error.aggregate.missing == 1


@pytest.mark.slow
def test_demo_checks(demo_model, heldout_slice, served_methods, one_intra_op_thread) -> None:
    """Grad-CAM on the demo: stable under small changes, more class-specific than edges; IG complete at 16 steps."""
    from workers.kernels.gradients import GradientRequest, explain_gradients

    x, labels, _ = heldout_slice
    results = stability(demo_model, x, labels, served_methods["grad_cam"], ["noise", "shift", "brightness"])
    for name, result in results.items():
        assert result.spearman.aggregate.mean > 0.7, name
        assert result.prediction_kept.aggregate.mean > 0.9, name
    cam = class_discrimination(demo_model, x, served_methods["grad_cam"])
    edges = class_discrimination(demo_model, x, edge_detector)
    assert cam.correlation.aggregate.ci_high < edges.correlation.aggregate.ci_low
    ig = explain_gradients(demo_model, [GradientRequest(x, labels, "integrated_gradients", steps=16)])[0]
    completeness = completeness_distribution(ig.completeness_error)
    assert completeness.quantiles["p50"] < 0.05
    assert np.isfinite(completeness.error.values).all()
