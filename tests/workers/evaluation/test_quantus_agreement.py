"""Agreement with Quantus (a test-only dependency) where it implements the same metric, on the same inputs.

Tolerances: the pointing game is a 0/1 decision per item, so the hits must be equal; a deletion
curve is the same softmax probabilities of the same perturbed inputs, so the curves must agree to
float32 round-off (1e-5).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from workers.evaluation.localisation import boxes_to_masks, localisation
from workers.evaluation.perturbation import CurveConfig, perturbation_curves

quantus = pytest.importorskip("quantus")

ITEMS = 16
CURVE_TOLERANCE = 1e-5


def _distinct(maps: torch.Tensor) -> torch.Tensor:
    """Maps with no ties (a 1e-6 seeded jitter): Quantus's argsort is not stable, so ties could order differently."""
    return maps + 1e-6 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vanilla_maps(demo_model, demo_heldout, demo_heldout_inputs, served_methods):
    x, labels = demo_heldout_inputs[:ITEMS], demo_heldout.labels[:ITEMS]
    return _distinct(served_methods["vanilla"](demo_model, x, labels))


@pytest.mark.slow
def test_pointing_game_agrees(demo_model, demo_heldout, demo_heldout_inputs, vanilla_maps,
                              one_intra_op_thread) -> None:
    x, labels, boxes = demo_heldout_inputs[:ITEMS], demo_heldout.labels[:ITEMS], demo_heldout.boxes[:ITEMS]
    masks = boxes_to_masks(boxes, (64, 64)).unsqueeze(1).float().numpy()  # (N, 1, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.PointingGame(disable_warnings=True, display_progressbar=False)(
            model=demo_model, x_batch=x.numpy(), y_batch=labels.numpy(), a_batch=vanilla_maps.unsqueeze(1).numpy(),
            s_batch=masks, device="cpu")
    ours = localisation(vanilla_maps, boxes=boxes).pointing_game.values
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float64))


@pytest.mark.slow
def test_deletion_curve_agrees_with_pixel_flipping(demo_model, demo_heldout, demo_heldout_inputs, vanilla_maps,
                                                   one_intra_op_thread) -> None:
    """Quantus's PixelFlipping (Bach et al. 2015) is deletion with a constant baseline. Its features are the
    map broadcast over the 3 channels, so 128 features a step is 128/3 px: every third of its 96 steps is
    one of our 32 steps of 128 px."""
    x, labels = demo_heldout_inputs[:ITEMS], demo_heldout.labels[:ITEMS]
    ours = perturbation_curves(demo_model, x, {"vanilla": vanilla_maps}, labels, CurveConfig(steps=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.PixelFlipping(features_in_step=128, normalise=False, abs=False, perturb_baseline=0.0,
                                       disable_warnings=True, display_progressbar=False)
        theirs = np.asarray(metric(model=demo_model, x_batch=x.numpy(), y_batch=labels.numpy(),
                                   a_batch=vanilla_maps.unsqueeze(1).numpy(), softmax=True, device="cpu",
                                   batch_size=ITEMS))  # (N, 96)
    np.testing.assert_allclose(ours.methods["vanilla"].curves.probs[:, 1:], theirs[:, 2::3], atol=CURVE_TOLERANCE)
