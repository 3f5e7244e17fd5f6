"""Model-randomization sanity check: an edge detector fails it, the served methods pass it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.workers.evaluation.conftest import edge_detector
from workers.errors import InvalidArgument
from workers.evaluation.randomization import SPEARMAN_THRESHOLD, parametrized_layers, randomization_check, reinitialize
from workers.kernels.hooks import LayerTaps, hook_count


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()


def _input_times_gradient(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = inputs.clone().requires_grad_(True)
    with torch.enable_grad():
        score = model(x).gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
    return (grad * inputs).sum(dim=1)


def test_layers_and_reinitialize_are_deterministic() -> None:
    model = _tiny()
    assert parametrized_layers(model) == ["0", "3"]
    a, b = _tiny(), _tiny()
    reinitialize(a[3], seed=5)
    reinitialize(b[3], seed=5)
    assert torch.equal(a[3].weight, b[3].weight) and not torch.equal(a[3].weight, _tiny()[3].weight)


def test_check_leaves_the_model_alone_and_reports_every_step() -> None:
    model = _tiny()
    taps = LayerTaps(model, ["0"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 0])
    methods = {"ixg": _input_times_gradient, "edge": edge_detector}
    for mode in ("cascading", "independent"):
        results = randomization_check(model, x, targets, methods, mode=mode)
        assert [step.layers for step in results["ixg"].steps] == (
            [("3",), ("3", "0")] if mode == "cascading" else [("3",), ("0",)])
        assert not results["edge"].passed
        assert all(step.flagged for step in results["edge"].steps)
        assert results["edge"].curve.tolist() == pytest.approx([1.0, 1.0])
        assert len(results["ixg"].randomized_maps) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hook_count(model) == hooks
    taps.close()


def test_bad_arguments_are_typed_errors() -> None:
    model, x, targets = _tiny(), torch.zeros(1, 1, 6, 6), torch.zeros(1, dtype=torch.long)
    with pytest.raises(InvalidArgument, match="mode"):
        randomization_check(model, x, targets, {"e": edge_detector}, mode="sideways")
    with pytest.raises(InvalidArgument, match="layers"):
        randomization_check(model, x, targets, {"e": edge_detector}, layers=["nope"])
    with pytest.raises(InvalidArgument, match="methods"):
        randomization_check(model, x, targets, {})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_edge_detector_fails_and_served_methods_pass(mode: str, demo_model, heldout_slice, served_methods,
                                                     one_intra_op_thread) -> None:
    """Known answer: maps that ignore the model survive randomization (rho = 1); the served ones do not."""
    x, labels, _ = heldout_slice
    x, labels = x[:24], labels[:24]
    results = randomization_check(demo_model, x, labels, {**served_methods, "edge": edge_detector}, mode=mode)
    assert not results["edge"].passed
    assert min(results["edge"].curve) > 0.99
    for name in served_methods:
        assert results[name].passed, (name, results[name].curve)
    # The trained model's maps are what the cascade is compared with; the last step randomizes every layer.
    if mode == "cascading":
        assert results["vanilla"].steps[-1].layers == tuple(reversed(parametrized_layers(demo_model)))
        assert results["vanilla"].curve[-1] < SPEARMAN_THRESHOLD / 2


def test_data_randomization_compares_with_the_callers_model() -> None:
    from workers.evaluation.randomization import data_randomization_check

    model, other = _tiny(), _tiny()
    reinitialize(other[0], seed=1)
    reinitialize(other[3], seed=2)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 0])
    results = data_randomization_check(model, other, x, targets, {"edge": edge_detector, "ixg": _input_times_gradient})
    assert results["edge"].mode == "data" and not results["edge"].passed
    assert results["edge"].steps[0].layers == ("<labels shuffled>",)
    same = data_randomization_check(model, model, x, targets, {"ixg": _input_times_gradient})
    assert same["ixg"].curve.tolist() == pytest.approx([1.0])


def test_the_report_figure_of_a_deep_net_keeps_eight_steps_at_most_64_pixels_a_side():
    """A net with dozens of parametrized layers: the figure shows the first, the last and evenly spaced
    steps between, area-averaged to 64 px, so an evaluation's result stays small."""
    from workers.evaluation.aggregate import metric
    from workers.evaluation.randomization import RandomizationResult, Step
    from workers.evaluation.ranking import FIGURE_SIDE, FIGURE_STEPS, randomization_figure

    layers = [f"layer{i}" for i in range(41)]
    steps = [Step(tuple(layers[:i + 1]), metric("spearman", [1.0 - i / 41] * 3), metric("ssim", [0.5] * 3), False)
             for i in range(41)]
    maps = [torch.full((3, 224, 160), float(i)) + torch.rand(3, 224, 160) for i in range(41)]
    result = RandomizationResult("grad_cam", "cascading", steps, True, 0.5, torch.rand(3, 224, 160), maps)
    figure = randomization_figure(result, "cascading", items=2)
    assert len(figure.steps) == FIGURE_STEPS + 1 == len(figure.spearman)  # "trained" first
    assert figure.steps[1] == "layer0" and figure.steps[-1] == "layer40"
    assert figure.spearman[-1] == pytest.approx(1.0 - 40 / 41)
    assert figure.maps.shape == (FIGURE_STEPS + 1, 2, FIGURE_SIDE, round(160 * FIGURE_SIDE / 224))
    assert figure.maps.min() >= 0.0 and figure.maps.max() <= 1.0
    few = RandomizationResult("grad_cam", "independent", steps[:3], True, 0.5, torch.rand(3, 32, 32),
                              [torch.rand(3, 32, 32) for _ in range(3)])
    small = randomization_figure(few, "independent", items=3)
    assert len(small.steps) == 4 and small.maps.shape == (4, 3, 32, 32)  # small enough: everything kept
