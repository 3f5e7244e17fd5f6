"""Expected Gradients / GradientSHAP, Blur IG and Guided IG: agreement with Captum and PAIR's `saliency`
on two architectures (the demo model and a random-weight ResNet-18 at 64x64), folded == alone, seeding,
completeness, typed errors.

Tolerances: every map is compared element-wise with atol = rtol * max|reference| and rtol as stated per
test (1e-4 where the reference does the same arithmetic in float32, looser where it differs: PAIR blurs
with scipy in float64 and walks Guided IG in float64 from float32 gradients of a batch of one).
"""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import GradientShap

from workers.batching import FoldBudget
from workers.errors import InvalidArgument
from workers.kernels.gradients import GradientLimits, GradientRequest, explain_gradients, request_cost
from workers.kernels.path_rows import (ExpectedGradientsDraws, expected_gradients_draws, expected_gradients_reduce,
                                       expected_gradients_rows, zero_padded_blur)
from workers.kernels.row_gradients import row_gradients

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def seeded(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def resnet():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
    return model.eval().requires_grad_(False)


@pytest.fixture(params=["demo", "resnet18"])
def arch(request, one_intra_op_thread):
    """(model, inputs (2, 3, 64, 64), targets (2,), references (5, 3, 64, 64)) per architecture."""
    if request.param == "demo":
        data = request.getfixturevalue("demo_heldout")
        x = request.getfixturevalue("demo_heldout_inputs")
        return request.getfixturevalue("demo_model"), x[:2].clone(), data.labels[:2].clone(), x[10:15].clone()
    return request.getfixturevalue("resnet"), seeded((2, 3, 64, 64), 1), torch.tensor([3, 8]), \
        seeded((5, 3, 64, 64), 2)


def close(ours, ref, rtol=1e-4):
    return torch.allclose(ours, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-12)


def run_one(model, req, **kwargs):
    return explain_gradients(model, [req], **kwargs)[0]


# ------------------------------------------------------------ Expected Gradients vs Captum --

def captum_gradient_shap(model, x, t, refs, samples, stdev, seed):
    """Captum's GradientShap, and its random draws replayed from the same seeds in Captum's order:
    baseline indices (np.random.choice), input noise (torch.normal), path points (np.random.uniform)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    attr = GradientShap(model).attribute(x, baselines=refs, n_samples=samples, stdevs=stdev, target=t)
    np.random.seed(seed)
    torch.manual_seed(seed)
    n = x.shape[0]
    index = torch.tensor(np.random.choice(refs.shape[0], samples * n)).view(n, samples)
    noise = torch.normal(0, torch.tensor(stdev).repeat((n * samples, *x.shape[1:])))
    alphas = torch.tensor(np.random.uniform(0.0, 1.0, n * samples), dtype=x.dtype).view(n, samples)
    return attr, ExpectedGradientsDraws(index, alphas, noise.view(n, samples, *x.shape[1:]))


@pytest.mark.parametrize("stdev", [0.0, 0.3], ids=["expected_gradients", "gradient_shap"])
def test_expected_gradients_match_captum_gradient_shap_on_the_same_draws(arch, stdev):
    model, x, t, refs = arch
    samples = 8
    reference, draws = captum_gradient_shap(model, x, t, refs, samples, stdev, seed=3)
    rows = torch.empty((x.shape[0] * samples, *x.shape[1:]))
    expected_gradients_rows(x, refs, draws, rows)
    grads = row_gradients(model, rows, t.repeat_interleave(samples), FoldBudget(), [(0, 0, rows.shape[0])])
    ours = expected_gradients_reduce(x, refs, draws, grads)
    assert close(ours, reference, rtol=1e-4)


def test_expected_gradients_kernel_is_its_seeded_draws(arch):
    """explain_gradients computes exactly the rows and reduction of `expected_gradients_draws(seed)`."""
    model, x, t, refs = arch
    req = GradientRequest(x, t, "expected_gradients", samples=6, references=refs, noise_stdev=0.1, seed=11)
    draws = expected_gradients_draws(x, refs, 6, 0.1, 11)
    rows = torch.empty((x.shape[0] * 6, *x.shape[1:]))
    expected_gradients_rows(x, refs, draws, rows)
    grads = row_gradients(model, rows, t.repeat_interleave(6), FoldBudget(), [(0, 0, rows.shape[0])])
    assert close(run_one(model, req).attributions, expected_gradients_reduce(x, refs, draws, grads), rtol=1e-5)


def test_expected_gradients_draws_are_seeded_and_cover_the_reference_set():
    x, refs = seeded((3, 3, 8, 8), 0), seeded((7, 3, 8, 8), 1)
    a, b = expected_gradients_draws(x, refs, 400, 0.2, 5), expected_gradients_draws(x, refs, 400, 0.2, 5)
    assert torch.equal(a.index, b.index) and torch.equal(a.alphas, b.alphas) and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.index, expected_gradients_draws(x, refs, 400, 0.2, 6).index)
    assert set(a.index.flatten().tolist()) == set(range(7))
    assert float(a.alphas.min()) >= 0 and float(a.alphas.max()) < 1 and abs(float(a.alphas.mean()) - 0.5) < 0.03
    spread = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
    assert torch.allclose(a.noise.std(dim=(1, 2, 3, 4)), 0.2 * spread, rtol=0.05)
    assert expected_gradients_draws(x, refs, 4, 0.0, 5).noise is None


def test_expected_gradients_from_one_baseline_converge_to_integrated_gradients():
    """With a reference set of one baseline, EG is IG with Monte Carlo path points: many samples agree."""
    from tests.workers.kernels.test_gradients import SMOOTH

    x, t = seeded((1, 3, 8, 8), 4), torch.tensor([2])
    refs = torch.zeros((1, 3, 8, 8))
    eg = run_one(SMOOTH, GradientRequest(x, t, "expected_gradients", samples=256, references=refs, seed=1),
                 limits=GradientLimits(max_samples=256))
    ig = run_one(SMOOTH, GradientRequest(x, t, "integrated_gradients", steps=64))
    assert close(eg.attributions, ig.attributions, rtol=0.1)


# ------------------------------------------------------------------------- Blur IG vs PAIR --

def pair_call(model, target):
    """PAIR's call_model_function over a torch model: (B, H, W, C) arrays in, input gradients out."""
    from saliency.core.base import INPUT_OUTPUT_GRADIENTS

    def call(batch, call_model_args=None, expected_keys=None):
        x = torch.tensor(np.asarray(batch), dtype=torch.float32).permute(0, 3, 1, 2).contiguous()
        with torch.enable_grad():
            leaf = x.requires_grad_(True)
            (grad,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
        return {INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).double().numpy()}

    return call


def hwc(x):
    return x.permute(1, 2, 0).double().numpy()


def test_blur_matches_scipy_gaussian_filter():
    from scipy import ndimage

    x = seeded((1, 3, 20, 24), 0)
    for sigma in (0.0, 0.01, 0.4, 1.7, 6.0):
        ours = zero_padded_blur(x.double(), sigma)[0].permute(1, 2, 0).numpy()
        ref = hwc(x[0]) if sigma == 0 else ndimage.gaussian_filter(hwc(x[0]), sigma=[sigma, sigma, 0], mode="constant")
        assert np.allclose(ours, ref, rtol=1e-10, atol=1e-12), sigma


def test_blur_ig_matches_pair_saliency(arch):
    from saliency.core import BlurIG

    model, x, t, _ = arch
    steps, max_sigma = 12, 6.0
    ours = run_one(model, GradientRequest(x, t, "blur_ig", steps=steps, max_sigma=max_sigma))
    for i in range(x.shape[0]):
        ref = BlurIG().GetMask(hwc(x[i]), pair_call(model, int(t[i])), max_sigma=max_sigma, steps=steps,
                               batch_size=steps)
        assert close(ours.attributions[i], torch.from_numpy(ref).permute(2, 0, 1).float(), rtol=2e-4)
    assert ours.completeness_error is not None and ours.completeness_error_absolute.shape == (x.shape[0],)


# ----------------------------------------------------------------------- Guided IG vs PAIR --

def numpy_with_quantile_method():
    """PAIR 0.2.1 calls np.quantile(..., interpolation=...), the keyword NumPy 2.4 renamed `method`:
    numpy itself, with that one keyword passed under its new name."""
    def quantile(a, q, interpolation="linear", **kwargs):
        return np.quantile(a, q, method=interpolation, **kwargs)

    shim = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    shim.quantile = quantile
    return shim


def test_guided_ig_matches_pair_saliency(arch, monkeypatch):
    from saliency.core import GuidedIG, guided_ig as pair_guided

    monkeypatch.setattr(pair_guided, "np", numpy_with_quantile_method())
    model, x, t, refs = arch
    steps, fraction = 10, 0.25
    baselines = refs[:2] * 0.5
    ours = run_one(model, GradientRequest(x, t, "guided_ig", steps=steps, fraction=fraction, baselines=baselines))
    for i in range(x.shape[0]):
        ref = GuidedIG().GetMask(hwc(x[i]), pair_call(model, int(t[i])), x_baseline=hwc(baselines[i]),
                                 x_steps=steps, fraction=fraction, max_dist=0.02)
        assert close(ours.attributions[i], torch.from_numpy(ref).permute(2, 0, 1).float(), rtol=1e-3)


def test_guided_ig_adds_up_to_the_score_change():
    from tests.workers.kernels.test_gradients import SMOOTH

    x, t = seeded((2, 3, 8, 8), 5), torch.tensor([1, 4])
    res = run_one(SMOOTH, GradientRequest(x, t, "guided_ig", steps=128, fraction=0.1))
    logits = SMOOTH(x).gather(1, t.unsqueeze(1)).squeeze(1) - SMOOTH(torch.zeros_like(x))[:, t].diagonal()
    gap = (res.attributions.flatten(1).sum(dim=1) - logits).abs()
    assert torch.allclose(gap, res.completeness_error_absolute, atol=1e-6)
    assert bool((gap <= 0.05 * logits.abs() + 2e-4).all()), (gap, logits)


# ------------------------------------------------------------------- folding, cost, errors --

def path_requests(x, t, refs):
    return [GradientRequest(x[:1], t[:1], "expected_gradients", samples=5, references=refs, noise_stdev=0.2, seed=1),
            GradientRequest(x, t, "blur_ig", steps=4, max_sigma=3.0),
            GradientRequest(x[1:], t[1:], "guided_ig", steps=5, fraction=0.3),
            GradientRequest(x, t, "guided_ig", steps=3, fraction=0.5, baselines=refs[:2]),
            GradientRequest(x[1:], t[1:], "smoothgrad", samples=3, seed=2)]


@pytest.mark.parametrize("chunk", [2, 64])
def test_folded_equals_one_by_one(arch, chunk):
    model, x, t, refs = arch
    requests = path_requests(x, t, refs)
    folded = explain_gradients(model, requests, budget=FoldBudget(max_rows=chunk))
    for req, res in zip(requests, folded):
        alone = run_one(model, req, budget=FoldBudget(max_rows=chunk))
        assert close(res.attributions, alone.attributions, rtol=1e-5), req.method
        assert res.rows == request_cost(req)
        if alone.completeness_error is not None:
            assert torch.allclose(res.completeness_error_absolute, alone.completeness_error_absolute, atol=1e-4)


def test_costs_count_samples_and_steps():
    x, t = seeded((3, 3, 8, 8), 0), torch.zeros(3, dtype=torch.long)
    assert request_cost(GradientRequest(x, t, "expected_gradients", samples=7)) == 21
    assert request_cost(GradientRequest(x, t, "blur_ig", steps=9)) == 27
    assert request_cost(GradientRequest(x, t, "guided_ig", steps=4)) == 12


@pytest.mark.parametrize("change, field", [
    (dict(method="expected_gradients", references=None), "expected_gradients.reference"),
    (dict(method="expected_gradients", references=torch.zeros(2, 3, 4, 4)), "expected_gradients.reference.tensor"),
    (dict(method="expected_gradients", references=torch.zeros(2, 3, 8, 8), noise_stdev=1.5),
     "expected_gradients.noise_stdev"),
    (dict(method="expected_gradients", references=torch.zeros(2, 3, 8, 8), samples=0), "expected_gradients.samples"),
    (dict(method="blur_ig", max_sigma=0.0), "blur_ig.max_sigma"),
    (dict(method="blur_ig", max_sigma=65.0), "blur_ig.max_sigma"),
    (dict(method="blur_ig", steps=600), "blur_ig.steps"),
    (dict(method="guided_ig", steps=1), "guided_ig.steps"),
    (dict(method="guided_ig", fraction=0.0), "guided_ig.fraction"),
    (dict(method="guided_ig", baselines=torch.zeros(1, 3, 4, 4)), "guided_ig.baseline"),
])
def test_bad_parameters_name_their_field(change, field):
    from tests.workers.kernels.test_gradients import SMOOTH

    req = dataclasses.replace(GradientRequest(seeded((1, 3, 8, 8), 0), torch.tensor([0]), "vanilla"), **change)
    with pytest.raises(InvalidArgument) as info:
        explain_gradients(SMOOTH, [req])
    assert info.value.violations[0].field == field
