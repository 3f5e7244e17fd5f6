"""Deletion / insertion curves: exact small cases on a linear model, the batching, and the demo's known answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.batching import FoldBudget
from workers.errors import InvalidArgument
from workers.evaluation.perturbation import CurveConfig, make_baseline, perturbation_curves, step_counts


class PixelSum(nn.Module):
    """Two classes; the logit of class 1 is 4 * (sum of the pixels of the top-left 2x2 block) of channel 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = 4.0 * x[:, 0, :2, :2].sum(dim=(1, 2))  # (N,)
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def _items(n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.ones(n, 1, 8, 8)
    truth = torch.zeros(n, 8, 8)
    truth[:, :2, :2] = 1.0  # the one map that is right
    return x, truth, torch.ones(n, dtype=torch.long)


def test_right_map_deletes_the_evidence_first() -> None:
    x, truth, targets = _items()
    result = perturbation_curves(PixelSum(), x, {"truth": truth, "wrong": 1.0 - truth}, targets,
                                 CurveConfig(steps=16, seed=1))
    right, wrong = result.methods["truth"], result.methods["wrong"]
    # 64 px in 16 steps of 4: the 2x2 block goes in step 1, leaving logits (0, 0).
    assert right.curves.probs[:, 1] == pytest.approx(0.5)
    assert right.curves.probs[:, 0] == pytest.approx(torch.sigmoid(torch.tensor(16.0)).item())
    assert wrong.curves.probs[:, 15] == pytest.approx(right.curves.probs[:, 0])  # the block goes last
    assert right.gain.aggregate.ci_low > 0 > wrong.gain.aggregate.ci_high
    assert (right.ratio.values > 1).all()
    assert result.rows == 5 * 3 * 17
    np.testing.assert_allclose(result.random.fractions, np.arange(17) / 16)


def test_insertion_starts_from_the_baseline_and_ends_at_the_input() -> None:
    x, truth, targets = _items()
    result = perturbation_curves(PixelSum(), x, {"truth": truth}, targets, CurveConfig(mode="insertion", steps=8))
    probs = result.methods["truth"].curves.probs
    assert probs[:, 0] == pytest.approx(0.5)  # zero baseline: no evidence
    assert probs[:, -1] == pytest.approx(result.random.probs[:, -1])  # the whole input
    assert result.methods["truth"].gain.aggregate.mean > 0


def test_the_fold_does_not_change_the_curves() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    maps = {"a": torch.randn(4, 8, 8, generator=gen), "b": torch.randn(4, 8, 8, generator=gen)}
    targets = torch.tensor([1, 0, 1, 1])
    config = CurveConfig(steps=5, patch=3, baseline="blur", blur_sigma=1.0)
    whole = perturbation_curves(PixelSum(), x, maps, targets, config, budget=FoldBudget(max_rows=1000))
    chunked = perturbation_curves(PixelSum(), x, maps, targets, config, budget=FoldBudget(max_rows=7))
    for name in maps:
        np.testing.assert_allclose(whole.methods[name].curves.probs, chunked.methods[name].curves.probs, rtol=1e-6)
    np.testing.assert_allclose(whole.random.probs, chunked.random.probs, rtol=1e-6)


def test_patches_cover_ragged_edges() -> None:
    x, truth, targets = _items(2)
    result = perturbation_curves(PixelSum(), x, {"truth": truth}, targets, CurveConfig(steps=9, patch=3))
    # 8 px in 3 px patches: a 3 x 3 grid of units; the top-left unit holds the evidence.
    np.testing.assert_allclose(result.random.fractions, step_counts(9, 9) / 9)
    assert result.methods["truth"].curves.probs[:, 1] == pytest.approx(0.5)


def test_baselines() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert make_baseline("zero", x).abs().sum() == 0
    mean = make_baseline("mean", x)
    assert torch.allclose(mean[:, :, 0, 0], x.mean(dim=(2, 3)))
    assert make_baseline("blur", x, 1.0).shape == x.shape


@pytest.mark.parametrize("field, kwargs", [("mode", {"mode": "sideways"}), ("baseline", {"baseline": "grey"}),
                                           ("steps", {"steps": 0}), ("patch", {"patch": 0})])
def test_bad_configs_are_typed_errors(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidArgument, match=field):
        CurveConfig(**kwargs)


def test_bad_shapes_are_typed_errors() -> None:
    x, truth, targets = _items()
    with pytest.raises(InvalidArgument, match="maps.truth"):
        perturbation_curves(PixelSum(), x, {"truth": truth[:, :4]}, targets)
    with pytest.raises(InvalidArgument, match="targets"):
        perturbation_curves(PixelSum(), x, {"truth": truth}, targets[:2])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("baseline", ["zero", "blur", "mean"])
def test_demo_methods_beat_random(mode: str, baseline: str, demo_model, heldout_slice, served_methods,
                                  one_intra_op_thread) -> None:
    """Known answer: the label lives in the watermark, so Grad-CAM's and IG's orders beat a random one."""
    x, labels, _ = heldout_slice
    maps = {name: served_methods[name](demo_model, x, labels) for name in ("grad_cam", "integrated_gradients")}
    result = perturbation_curves(demo_model, x, maps, labels, CurveConfig(mode=mode, baseline=baseline, steps=16))
    for name, curves in result.methods.items():
        assert curves.gain.aggregate.ci_low > 0.1, (name, curves.gain.aggregate)
        assert curves.ratio.aggregate.mean > 1.2, (name, curves.ratio.aggregate)
