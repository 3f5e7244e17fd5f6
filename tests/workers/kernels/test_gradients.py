"""Gradient kernels: agreement with Captum, folding, determinism, quality on the demo model, typed errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from captum.attr import IntegratedGradients, Saliency
from captum.attr._utils.approximation_methods import approximation_parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from workers.batching import FoldBudget, FoldWatch
from workers.errors import InvalidArgument
from workers.kernels.baselines import make_baseline
from workers.kernels.gradients import (METHODS, NOISE_METHODS, RULES, GradientLimits, GradientRequest,
                                       _gauss_legendre, completeness_errors, explain_gradients, integration_points,
                                       request_cost, smoothgrad_noise, validate_gradient_request)

# Captum asks for inputs that require grad and warns when they do not; ours never do.
pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
CAPTUM_RULE = {rule: ("gausslegendre" if rule == "gauss_legendre" else rule) for rule in RULES}


def seeded(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


class SmoothNet(nn.Module):
    """A tiny smooth classifier on (3, 8, 8): fast, and its gradients vary with the input."""

    def __init__(self, classes: int = 5):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(),
                                      nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(),
                                      nn.Linear(96, classes))
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.body(x)


SMOOTH = SmoothNet().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def resnet():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
    return model.eval().requires_grad_(False)


@pytest.fixture(params=["demo", "resnet18"])
def arch(request):
    """(model, inputs (2, 3, H, W), targets (2,)) for each architecture compared with Captum."""
    if request.param == "demo":
        data = request.getfixturevalue("demo_heldout")
        return request.getfixturevalue("demo_model"), request.getfixturevalue("demo_heldout_inputs")[:2], \
            data.labels[:2]
    return request.getfixturevalue("resnet"), seeded((2, 3, 32, 32), 1), torch.tensor([3, 8])


def close(ours, ref, rtol=1e-4):
    return torch.allclose(ours, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-12)


def run_one(model, req, **kwargs):
    return explain_gradients(model, [req], **kwargs)[0]


# ------------------------------------------------------------------ Captum agreement --

@pytest.mark.parametrize("absolute", [False, True])
def test_vanilla_matches_captum_saliency(arch, absolute):
    model, x, t = arch
    ours = run_one(model, GradientRequest(x, t, "vanilla", absolute=absolute))
    ref = Saliency(model).attribute(x.clone(), target=t, abs=absolute)
    assert ours.attributions.dtype == torch.float32 and ours.rows == 2
    assert close(ours.attributions, ref)


def captum_noise_reference(model, req):
    """Captum Saliency over the kernel's own noisy copies, reduced like NoiseTunnel."""
    n, s = req.inputs.shape[0], req.samples
    noisy = (req.inputs.unsqueeze(1) + smoothgrad_noise(req)).flatten(0, 1)  # (N*S, C, H, W)
    grads = Saliency(model).attribute(noisy, target=req.targets.repeat_interleave(s), abs=False)
    grads = grads.view(n, s, *req.inputs.shape[1:])  # (N, S, C, H, W)
    mean, mean_sq = grads.mean(1), (grads * grads).mean(1)
    return {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean * mean}[req.method]


@pytest.mark.parametrize("method", NOISE_METHODS)
def test_noise_family_matches_captum_on_the_same_noise(arch, method):
    model, x, t = arch
    req = GradientRequest(x, t, method, samples=6, noise_fraction=0.2, seed=11)
    ours = run_one(model, req)
    assert ours.rows == 12 and ours.completeness_error is None
    assert close(ours.attributions, captum_noise_reference(model, req), rtol=2e-4)


@pytest.mark.parametrize("rule", RULES)
def test_integrated_gradients_matches_captum(arch, rule):
    model, x, t = arch
    baselines = make_baseline("blurred", x, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0, blur_sigma=2.0)
    ours = run_one(model, GradientRequest(x, t, "integrated_gradients", steps=7, rule=rule, baselines=baselines))
    ref, delta = IntegratedGradients(model).attribute(x, baselines=baselines, target=t, n_steps=7,
                                                      method=CAPTUM_RULE[rule], return_convergence_delta=True)
    assert ours.rows == 14
    assert close(ours.attributions, ref)
    with torch.no_grad():
        change = (model(x) - model(baselines)).gather(1, t.unsqueeze(1)).squeeze(1)
    assert torch.allclose(ours.completeness_error, delta.abs() / change.abs(), rtol=1e-3, atol=1e-5)
    assert torch.allclose(ours.completeness_error_absolute, delta.abs().float(), rtol=1e-3, atol=1e-6)


def test_completeness_error_stays_relative_when_the_change_is_tiny():
    """Where f(x) - f(b) nears zero the relative error is still relative (to the 1e-6 guard), not silently the
    absolute one; the absolute error comes beside it, so a client can tell a tiny delta from a poor integration."""
    attributions = torch.tensor([[3e-7, 0.0], [0.5, 0.25], [0.0, 0.0]])
    delta = torch.tensor([0.0, 1.0, 2e-7])
    relative, absolute = completeness_errors(attributions, delta)
    torch.testing.assert_close(absolute, torch.tensor([3e-7, 0.25, 2e-7]))
    torch.testing.assert_close(relative, torch.tensor([0.3, 0.25, 0.2]))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("steps", [2, 3, 16, 50])
def test_integration_points_are_captums(rule, steps):
    step_sizes, alphas = approximation_parameters(CAPTUM_RULE[rule])
    ours_alphas, ours_weights = integration_points(rule, steps)
    assert ours_alphas.dtype == ours_weights.dtype == torch.float32
    assert torch.allclose(ours_alphas, torch.tensor(alphas(steps)), rtol=0, atol=2e-7)
    assert torch.allclose(ours_weights, torch.tensor(step_sizes(steps), dtype=torch.float32), rtol=0, atol=2e-7)
    if rule != "gauss_legendre":  # same float32 linspace: bit-identical
        assert torch.equal(ours_alphas, torch.tensor(alphas(steps), dtype=torch.float32))


def test_gauss_legendre_is_exact_for_polynomials():
    nodes, weights = _gauss_legendre(5)
    for degree in range(10):  # n nodes integrate degree <= 2n - 1 exactly
        assert abs(float((weights * nodes**degree).sum()) - (1 + (-1) ** degree) / (degree + 1)) < 1e-12


# ----------------------------------------------------------------------- folding --

def mixed_requests(x, t):
    blurred = make_baseline("blurred", x, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0, blur_sigma=3.0)
    return [
        GradientRequest(x, t, "vanilla"),
        GradientRequest(x[:1], t[:1], "smoothgrad", samples=5, seed=1),
        GradientRequest(x, t.flip(0), "integrated_gradients", steps=4, rule="riemann_middle"),
        GradientRequest(x[1:], t[1:], "vargrad", samples=3, noise_fraction=0.3, seed=2),
        GradientRequest(x, t, "integrated_gradients", steps=9, baselines=blurred),
        GradientRequest(x[1:], t[:1], "vanilla", absolute=True),
        GradientRequest(x, t, "smoothgrad_sq", samples=2, seed=1),
    ]


def assert_same_results(folded, alone):
    for a, b in zip(folded, alone):
        assert a.rows == b.rows
        assert close(a.attributions, b.attributions, rtol=1e-5)
        if b.completeness_error is not None:
            # A ratio of a small difference: rounding in sum(a) is amplified by 1 / |f(x) - f(b)|,
            # hundreds of times on the tiny models here; 1e-4 is still 0.01% of completeness.
            assert torch.allclose(a.completeness_error, b.completeness_error, rtol=1e-3, atol=1e-4)


def test_folded_equals_alone(resnet):
    requests = mixed_requests(seeded((2, 3, 32, 32), 2), torch.tensor([4, 9]))
    folded = explain_gradients(resnet, requests)
    assert [r.rows for r in folded] == [request_cost(r) for r in requests] == [2, 5, 8, 3, 18, 1, 4]
    assert_same_results(folded, [run_one(resnet, r) for r in requests])


def test_tiny_chunks_equal_one_chunk(resnet):
    requests = mixed_requests(seeded((2, 3, 32, 32), 3), torch.tensor([0, 5]))
    whole = explain_gradients(resnet, requests, budget=FoldBudget(max_rows=10_000))
    assert_same_results(explain_gradients(resnet, requests, budget=FoldBudget(max_rows=3)), whole)


def test_one_row_per_chunk_when_the_budget_is_below_a_row():
    requests = mixed_requests(seeded((2, 3, 8, 8), 3), torch.tensor([0, 4]))
    whole = explain_gradients(SMOOTH, requests, budget=FoldBudget(max_rows=10_000))
    assert_same_results(explain_gradients(SMOOTH, requests, budget=FoldBudget(max_bytes=1)), whole)


def test_requests_of_different_shapes_fold_in_their_own_groups(resnet):
    small, large = seeded((1, 3, 32, 32), 4), seeded((2, 3, 48, 48), 5)
    requests = [GradientRequest(small, torch.tensor([1]), "smoothgrad", samples=3),
                GradientRequest(large, torch.tensor([2, 3]), "integrated_gradients", steps=3)]
    results = explain_gradients(resnet, requests)
    assert [r.attributions.shape for r in results] == [small.shape, large.shape]
    assert_same_results(results, [run_one(resnet, r) for r in requests])


class RowCounter(nn.Module):
    """Wraps a model and records the rows of every forward it runs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x):
        self.rows.append(int(x.shape[0]))
        return self.model(x)


def test_a_request_that_dies_mid_fold_leaves_its_remaining_rows_uncomputed():
    x, t = seeded((2, 3, 8, 8), 11), torch.tensor([1, 3])
    doomed = GradientRequest(x, t, "smoothgrad", samples=40, seed=1)            # 80 rows
    kept = GradientRequest(x[:1], t[:1], "integrated_gradients", steps=16)      # 16 rows
    counter = RowCounter(SMOOTH)
    # Dead from the first question on, that is after the first chunk of 16 rows.
    watch = FoldWatch(alive=lambda i: i != 0)
    results = explain_gradients(counter, [doomed, kept], budget=FoldBudget(max_rows=16), num_classes=5,
                                watch=watch)
    assert results[0] is None and watch.dropped == {0}
    assert watch.rows_skipped == 80 - 16
    # One chunk of the doomed request, one of the survivor, and its two IG endpoints' forward.
    assert counter.rows[:2] == [16, 16] and sum(counter.rows[:2]) == 32
    assert_same_results([results[1]], [run_one(SMOOTH, kept)])


def test_rows_of_a_dead_request_leave_chunks_shared_with_live_ones():
    x, t = seeded((1, 3, 8, 8), 12), torch.tensor([2])
    requests = [GradientRequest(x, t, "smoothgrad", samples=10, seed=s) for s in range(4)]   # 40 rows
    watch = FoldWatch(alive=lambda i: i not in (1, 2))
    counter = RowCounter(SMOOTH)
    results = explain_gradients(counter, requests, budget=FoldBudget(max_rows=15), num_classes=5, watch=watch)
    # 40 rows at 15 a chunk: balanced chunks of 13. Chunk 1 holds request 0 and 3 rows of request 1; then 1 and
    # 2 are found dead (7 + 10 rows skipped), and request 3's 10 rows are what is left: one chunk of 10.
    assert [r is None for r in results] == [False, True, True, False]
    assert watch.rows_skipped == 17 and counter.rows == [13, 10]
    assert_same_results([results[0], results[3]], [run_one(SMOOTH, requests[0]), run_one(SMOOTH, requests[3])])


def test_a_watched_fold_with_every_request_alive_equals_the_plain_one(resnet):
    requests = mixed_requests(seeded((2, 3, 32, 32), 3), torch.tensor([0, 5]))
    whole = explain_gradients(resnet, requests, budget=FoldBudget(max_rows=3))
    watch = FoldWatch(alive=lambda i: True)
    watched = explain_gradients(resnet, requests, budget=FoldBudget(max_rows=3), watch=watch)
    assert watch.rows_skipped == 0 and not watch.dropped
    assert_same_results(watched, whole)


request_strategy = st.builds(
    dict, method=st.sampled_from(METHODS), items=st.integers(1, 2), samples=st.integers(1, 3),
    steps=st.integers(2, 4), rule=st.sampled_from(RULES), seed=st.integers(0, 2**64 - 1),
    fraction=st.floats(0.0, 1.0), target=st.integers(0, 4), absolute=st.booleans(), baseline=st.booleans())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(request_strategy, min_size=1, max_size=4), chunk=st.integers(1, 8))
def test_random_mixes_fold_like_alone(specs, chunk):
    check_random_mix(specs, chunk)


def test_noiseless_vargrad_is_zero_folded_or_alone():
    # Found by the property above: with the one-pass E[g^2] - E[g]^2, identical samples
    # split across chunks left ~1e-12 of rounding where the variance is exactly zero.
    base = dict(items=1, samples=1, steps=2, rule="riemann_left", seed=0, fraction=0.0, target=0,
                absolute=False, baseline=False)
    specs = [dict(base, method="vanilla")] * 3 + [dict(base, method="vargrad", samples=3)]
    check_random_mix(specs, chunk=2)


def check_random_mix(specs, chunk):
    requests = []
    for i, spec in enumerate(specs):
        x = seeded((spec["items"], 3, 8, 8), i)
        requests.append(GradientRequest(
            x, torch.full((spec["items"],), spec["target"]), spec["method"], samples=spec["samples"],
            noise_fraction=spec["fraction"], steps=spec["steps"], rule=spec["rule"], seed=spec["seed"],
            absolute=spec["absolute"], baselines=seeded(x.shape, 99, 0.1) if spec["baseline"] else None,
            references=seeded((3, 3, 8, 8), 98), noise_stdev=spec["fraction"], max_sigma=0.5 + 3 * spec["fraction"],
            fraction=max(spec["fraction"], 0.05)))
    folded = explain_gradients(SMOOTH, requests, budget=FoldBudget(max_rows=chunk))
    assert_same_results(folded, [run_one(SMOOTH, r) for r in requests])


# ------------------------------------------------------------ determinism, hygiene --

@pytest.mark.parametrize("method", NOISE_METHODS)
def test_noise_is_seeded(method):
    x, t = seeded((2, 3, 8, 8), 6), torch.tensor([0, 1])
    req = GradientRequest(x, t, method, samples=4, seed=5)
    first, again = run_one(SMOOTH, req).attributions, run_one(SMOOTH, req).attributions
    assert torch.equal(first, again)
    assert not torch.allclose(first, run_one(SMOOTH, dataclasses.replace(req, seed=6)).attributions)
    assert torch.equal(smoothgrad_noise(req), smoothgrad_noise(req))


def test_noise_std_is_a_fraction_of_each_items_range():
    x = torch.cat([seeded((1, 3, 8, 8), 7), 10 * seeded((1, 3, 8, 8), 8)])
    noise = smoothgrad_noise(GradientRequest(x, torch.tensor([0, 0]), "smoothgrad", samples=64,
                                             noise_fraction=0.1, seed=0))
    assert noise.shape == (2, 64, 3, 8, 8)
    expected = 0.1 * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    assert torch.allclose(noise.std(dim=(1, 2, 3, 4)), expected, rtol=0.05)


def test_zero_baseline_is_the_default():
    x, t = seeded((2, 3, 8, 8), 9), torch.tensor([2, 3])
    implicit = run_one(SMOOTH, GradientRequest(x, t, "integrated_gradients", steps=5))
    explicit = run_one(SMOOTH, GradientRequest(x, t, "integrated_gradients", steps=5, baselines=torch.zeros_like(x)))
    assert torch.equal(implicit.attributions, explicit.attributions)
    assert torch.allclose(implicit.completeness_error, explicit.completeness_error)


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_parameters_inputs_and_mode_are_untouched():
    model = SmoothNet().train()  # parameters requiring grad, train mode: both must survive as they are
    x = seeded((2, 3, 8, 8), 10)
    explain_gradients(model, mixed_requests(x, torch.tensor([1, 2])))
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not x.requires_grad and x.grad is None
    assert hooks_left(model) == 0


def test_callers_inside_inference_mode_or_with_grad_inputs_get_plain_results():
    x, t = seeded((2, 3, 8, 8), 14), torch.tensor([1, 3])
    expected = explain_gradients(SMOOTH, mixed_requests(x, t))
    with torch.inference_mode():
        frozen = x.clone()
        inside = explain_gradients(SMOOTH, mixed_requests(frozen, t))
    assert_same_results(inside, expected)
    leaf = x.clone().requires_grad_(True)
    for result in explain_gradients(SMOOTH, mixed_requests(leaf, t)):
        assert not result.attributions.requires_grad
    assert leaf.grad is None


def test_nothing_runs_and_no_hook_stays_when_one_request_is_bad():
    model = SmoothNet().eval()
    x = seeded((1, 3, 8, 8), 11)
    good = GradientRequest(x, torch.tensor([0]), "smoothgrad", samples=2)
    with pytest.raises(InvalidArgument):
        explain_gradients(model, [good, dataclasses.replace(good, samples=0)], num_classes=5)
    assert model.forwards == 0 and hooks_left(model) == 0


def test_num_classes_is_probed_when_not_given():
    x = seeded((1, 3, 8, 8), 12)
    with pytest.raises(InvalidArgument, match="target"):
        explain_gradients(SMOOTH, [GradientRequest(x, torch.tensor([5]), "vanilla")])
    assert run_one(SMOOTH, GradientRequest(x, torch.tensor([4]), "vanilla")).attributions.shape == x.shape


# ----------------------------------------------------------------- typed errors --

X, T = seeded((2, 3, 8, 8), 13), torch.tensor([0, 1])
BAD = {
    "method": GradientRequest(X, T, "saliency"),
    "inputs-rank": GradientRequest(X[0], T, "vanilla"),
    "inputs-int": GradientRequest(X.long(), T, "vanilla"),
    "inputs-nan": GradientRequest(torch.where(X > 1, float("nan"), X), T, "vanilla"),
    "inputs-inf": GradientRequest(torch.where(X > 1, float("inf"), X), T, "smoothgrad"),
    "inputs-items": GradientRequest(seeded((5, 3, 8, 8), 0), torch.zeros(5, dtype=torch.long), "vanilla"),
    "target-high": GradientRequest(X, torch.tensor([0, 5]), "vanilla"),
    "target-negative": GradientRequest(X, torch.tensor([-1, 0]), "vanilla"),
    "target-shape": GradientRequest(X, torch.tensor([0]), "vanilla"),
    "target-float": GradientRequest(X, T.float(), "vanilla"),
    "seed": GradientRequest(X, T, "smoothgrad", seed=-1),
    "samples-zero": GradientRequest(X, T, "smoothgrad", samples=0),
    "samples-cap": GradientRequest(X, T, "vargrad", samples=17),
    "noise-negative": GradientRequest(X, T, "smoothgrad", samples=2, noise_fraction=-0.1),
    "noise-large": GradientRequest(X, T, "smoothgrad_sq", samples=2, noise_fraction=1.5),
    "steps-zero": GradientRequest(X, T, "integrated_gradients", steps=0),
    "steps-cap": GradientRequest(X, T, "integrated_gradients", steps=33),
    "trapezoid-one-step": GradientRequest(X, T, "integrated_gradients", steps=1, rule="riemann_trapezoid"),
    "rule": GradientRequest(X, T, "integrated_gradients", rule="simpson"),
    "baseline-shape": GradientRequest(X, T, "integrated_gradients", baselines=X[:1]),
    "baseline-nan": GradientRequest(X, T, "integrated_gradients", baselines=torch.full_like(X, float("nan"))),
}
FIELDS = {"inputs": "inputs", "target": "target", "samples": "noise.samples", "noise": "noise.noise_fraction",
          "steps": "integrated_gradients.steps", "trapezoid": "integrated_gradients.steps",
          "rule": "integrated_gradients.rule", "baseline": "integrated_gradients.baseline",
          "method": "method", "seed": "seed"}
LIMITS = GradientLimits(max_samples=16, max_steps=32, max_items=4)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_raise_invalid_argument(case):
    with pytest.raises(InvalidArgument) as info:
        validate_gradient_request(BAD[case], num_classes=5, limits=LIMITS)
    assert info.value.violations[0].field == FIELDS[case.split("-")[0]]
    with pytest.raises(InvalidArgument):
        explain_gradients(SMOOTH, [BAD[case]], limits=LIMITS, num_classes=5)


def test_limits_are_inclusive():
    for req in (GradientRequest(X, T, "smoothgrad", samples=16, noise_fraction=1.0),
                GradientRequest(X, T, "integrated_gradients", steps=32), GradientRequest(X, T, "vanilla"),
                GradientRequest(X, T, "integrated_gradients", steps=1, rule="riemann_left")):
        validate_gradient_request(req, num_classes=5, limits=LIMITS)


# ------------------------------------------------------------- the demo model --

@pytest.mark.slow
def test_integrated_gradients_is_complete_on_the_demo_model(demo_model, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs, demo_heldout.labels
    result = run_one(demo_model, GradientRequest(x, t, "integrated_gradients", steps=32),
                     limits=GradientLimits(max_items=len(t)))
    assert float(result.completeness_error.max()) <= 0.01


def pointing_game(attributions, boxes):
    saliency = attributions.abs().amax(dim=1)  # (N, H, W)
    flat = saliency.flatten(1).argmax(dim=1)
    rows, cols = flat // saliency.shape[-1], flat % saliency.shape[-1]
    hits = (rows >= boxes[:, 0]) & (rows < boxes[:, 2]) & (cols >= boxes[:, 1]) & (cols < boxes[:, 3])
    return float(hits.float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("method, params", [("smoothgrad", {"samples": 16}),
                                            ("integrated_gradients", {"steps": 16})])
def test_pointing_game_on_the_demo_model(demo_model, demo_heldout_inputs, demo_heldout, method, params):
    x, t = demo_heldout_inputs, demo_heldout.labels
    result = run_one(demo_model, GradientRequest(x, t, method, **params), limits=GradientLimits(max_items=len(t)))
    assert pointing_game(result.attributions, demo_heldout.boxes) >= 0.95
