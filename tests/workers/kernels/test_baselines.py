"""Integrated Gradients baselines: values, determinism, blur, custom tensors, typed errors."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from workers.errors import InvalidArgument
from workers.kernels.baselines import BASELINE_KINDS, gaussian_blur, make_baseline

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    return normalize(torch.rand(2, 3, 16, 20, generator=gen))


def make(kind, inputs, **kwargs):
    return make_baseline(kind, inputs, mean=MEAN, std=STD, seed=kwargs.pop("seed", 0), **kwargs)


@pytest.mark.parametrize("kind", [k for k in BASELINE_KINDS if k != "custom"])
def test_every_kind_is_shaped_like_the_inputs(kind, inputs):
    baseline = make(kind, inputs)
    assert baseline.shape == inputs.shape and baseline.dtype == inputs.dtype
    assert torch.isfinite(baseline).all()


def test_zero_black_and_mean(inputs):
    assert torch.equal(make("zero", inputs), torch.zeros_like(inputs))
    black = make("black", inputs)
    assert torch.allclose(black, normalize(torch.zeros(2, 3, 16, 20)))
    assert torch.allclose(make("dataset_mean", inputs), torch.zeros_like(inputs))


def test_dataset_mean_is_the_mean_pixel_even_when_not_zero(inputs):
    # A spec whose normalization mean differs from the pixel mean asked for.
    baseline = make_baseline("dataset_mean", inputs, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=0)
    assert torch.equal(baseline, torch.zeros_like(inputs))


def test_uniform_noise_is_seeded_pixel_noise(inputs):
    first, again = make("uniform_noise", inputs, seed=7), make("uniform_noise", inputs, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, make("uniform_noise", inputs, seed=8))
    pixels = first * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert 0.4 < pixels.mean() < 0.6


def test_blur_matches_torchvision_reflect_blur(inputs):
    for sigma in (1.0, 2.5):
        size = 2 * int(torch.tensor(3 * sigma).ceil()) + 1
        expected = TF.gaussian_blur(inputs, kernel_size=[size, size], sigma=[sigma, sigma])
        assert torch.allclose(make("blurred", inputs, blur_sigma=sigma), expected, atol=1e-5)


def test_blur_commutes_with_normalization_and_keeps_constants(inputs):
    pixels = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(gaussian_blur(normalize(pixels), 2.0), normalize(gaussian_blur(pixels, 2.0)), atol=1e-5)
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 64.0), flat)  # kernel wider than the image: truncated


def test_blur_smooths(inputs):
    blurred = make("blurred", inputs, blur_sigma=5.0)
    assert blurred.diff(dim=-1).abs().mean() < 0.2 * inputs.diff(dim=-1).abs().mean()


@pytest.mark.parametrize("shape", [(3, 16, 20), (1, 3, 16, 20)])
def test_custom_single_item_broadcasts(inputs, shape):
    custom = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    baseline = make("custom", inputs, custom=custom)
    assert baseline.shape == inputs.shape
    assert torch.equal(baseline[0], custom.view(3, 16, 20)) and torch.equal(baseline[1], baseline[0])


def test_custom_per_item(inputs):
    custom = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(make("custom", inputs, custom=custom), custom)


def test_float64_inputs_stay_float64(inputs):
    assert make("black", inputs.double()).dtype == torch.float64
    assert make("blurred", inputs.double()).dtype == torch.float64


@pytest.mark.parametrize("kind, kwargs, field", [
    ("sepia", {}, "integrated_gradients.baseline.kind"),
    ("blurred", {"blur_sigma": 0.0}, "integrated_gradients.baseline.blur_sigma"),
    ("blurred", {"blur_sigma": -1.0}, "integrated_gradients.baseline.blur_sigma"),
    ("blurred", {"blur_sigma": 65.0}, "integrated_gradients.baseline.blur_sigma"),
    ("blurred", {"blur_sigma": float("nan")}, "integrated_gradients.baseline.blur_sigma"),
    ("custom", {}, "integrated_gradients.baseline.tensor"),
    ("custom", {"custom": torch.zeros(3, 16, 16)}, "integrated_gradients.baseline.tensor"),
    ("custom", {"custom": torch.zeros(1, 16, 20)}, "integrated_gradients.baseline.tensor"),
    ("custom", {"custom": torch.zeros(3, 3, 16, 20)}, "integrated_gradients.baseline.tensor"),
    ("custom", {"custom": torch.full((3, 16, 20), float("inf"))}, "integrated_gradients.baseline.tensor"),
    ("uniform_noise", {"seed": -1}, "seed"),
])
def test_bad_parameters_raise_invalid_argument(inputs, kind, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        make(kind, inputs, **kwargs)
    assert info.value.violations[0].field == field


def test_bad_spec_and_inputs_raise_invalid_argument(inputs):
    with pytest.raises(InvalidArgument):
        make_baseline("black", inputs, mean=(0.5,), std=(0.5,), seed=0)
    with pytest.raises(InvalidArgument):
        make_baseline("black", inputs, mean=MEAN, std=(0.2, 0.0, 0.2), seed=0)
    with pytest.raises(InvalidArgument):
        make("zero", inputs[0])
