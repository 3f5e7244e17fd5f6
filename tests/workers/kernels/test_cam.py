"""Grad-CAM, Grad-CAM++, Layer-CAM, HiResCAM, XGrad-CAM and EigenCAM: agreement with the
peers, localization, folding, concurrency and every typed error.

Definition differences with the peers, and how the comparisons absorb them:
- pytorch-grad-cam min-max normalizes each map at the layer's resolution and then
  resizes it with cv2 (bilinear, half-pixel centres); we return the un-normalized
  ReLU'd map upsampled with `F.interpolate(bilinear, align_corners=False)`. Both
  sides are compared after the same per-image min-max normalization.
- pytorch-grad-cam's Grad-CAM++ drops the exp(Y) factor of the paper's weights, as
  we do (a per-image scale, invisible after normalization).
- pytorch-grad-cam needs an input that requires grad (it backpropagates to the
  input through `loss.backward()`); we stop the backward at the layer. Same
  gradients at the layer, so the same maps.
- EigenCAM: the sign of a principal component is arbitrary; pytorch-grad-cam's EigenCAM
  keeps LAPACK's, we apply its own sign correction
  (`get_2d_projection_with_sign_correction`). The peer here is pytorch-grad-cam's
  EigenCAM with that projection (`SignCorrectedEigenCAM`); test_cam_variants.py shows
  the plain EigenCAM agrees with ours up to that sign, image by image.
- Captum's LayerGradCam (relu_attributions=True) + `LayerAttribution.interpolate(
  ..., "bilinear")` is the same definition as ours: compared without normalization.
"""
from __future__ import annotations

import functools
import threading

import pytest
import torch
import torchvision
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
from torch import nn

from tests.workers.kernels.test_hooks import tiny_model
from workers.batching import FoldBudget
from workers.demo import DEMO_CAM_LAYER
from workers.errors import InvalidArgument, LayerNotFound
from workers.kernels.cam import (_GRADCAM_PP_EPS, CAM_VARIANTS, CamRequest, _grad_cam_plus_plus, explain_cam,
                                 validate_cam_request)
from workers.kernels.hooks import LayerTaps, hook_count



class SignCorrectedEigenCAM(EigenCAM):
    """pytorch-grad-cam's EigenCAM with its own sign-corrected projection: our sign rule."""

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
        return get_2d_projection_with_sign_correction(activations)


PEERS = {"grad_cam": GradCAM, "grad_cam_plus_plus": GradCAMPlusPlus, "layer_cam": LayerCAM,
         "hires_cam": HiResCAM, "xgrad_cam": XGradCAM, "eigen_cam": SignCorrectedEigenCAM}
RESNET_LAYERS = ("layer3", "layer4")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


# ---------------------------------------------------------------- shared helpers

def normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max, as pytorch-grad-cam's `scale_cam_image`."""
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / (maps.amax(dim=(1, 2), keepdim=True) + 1e-7)


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor) -> float:
    """Fraction of images whose map argmax lies in its (top, left, bottom, right) box."""
    idx = maps.flatten(1).argmax(dim=1)
    row, col = idx // maps.shape[-1], idx % maps.shape[-1]
    inside = (row >= boxes[:, 0]) & (row < boxes[:, 2]) & (col >= boxes[:, 1]) & (col < boxes[:, 3])
    return inside.float().mean().item()


@functools.lru_cache(maxsize=1)
def resnet18_model() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resnet_batch(n: int = 3, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.fixture(scope="module")
def resnet():
    model = resnet18_model()
    taps = LayerTaps(model, RESNET_LAYERS, model_name="resnet18")
    yield model, taps
    taps.close()


def peer_cam(variant: str, model: nn.Module, layer: nn.Module, x: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    with PEERS[variant](model, [layer]) as cam:
        out = cam(x.clone().requires_grad_(True), [ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(out)


def all_variants(model, taps, x, t, layer) -> dict[str, torch.Tensor]:
    return explain_cam(model, taps, [CamRequest(x, t, layer, CAM_VARIANTS)])[0].maps


# ---------------------------------------------------------------- agreement

@pytest.mark.parametrize("variant", CAM_VARIANTS)
def test_matches_pytorch_grad_cam_on_the_demo_model(demo_model, demo_taps, demo_heldout_inputs,
                                                   demo_heldout, variant):
    x, t = demo_heldout_inputs[:6], demo_heldout.labels[:6]
    ours = all_variants(demo_model, demo_taps, x, t, DEMO_CAM_LAYER)[variant]
    module = dict(demo_model.named_modules())[DEMO_CAM_LAYER]
    torch.testing.assert_close(normalize(ours), peer_cam(variant, demo_model, module, x, t),
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("layer", RESNET_LAYERS)
@pytest.mark.parametrize("variant", CAM_VARIANTS)
def test_matches_pytorch_grad_cam_on_resnet18(resnet, variant, layer):
    model, taps = resnet
    x, t = resnet_batch()
    ours = all_variants(model, taps, x, t, layer)[variant]
    peer = peer_cam(variant, model, getattr(model, layer), x, t)
    torch.testing.assert_close(normalize(ours), peer, atol=2e-3, rtol=0)


def _grad_cam_plus_plus_float64(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ eq. 19 with exp-score, term by term in float64: the reference."""
    a, g = act.double(), grad.double()
    alpha = g**2 / (2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3 + _GRADCAM_PP_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return ((torch.relu(g) * alpha).sum(dim=(2, 3), keepdim=True) * a).sum(dim=1)


def test_grad_cam_plus_plus_matches_float64_where_its_denominator_nears_zero():
    """Activation sums S = -20 with gradients around 0.1 put 2 + S*g near zero for many locations: in float32
    that cancellation moved the map by 1% of its range; evaluated in float64, the map is the formula's."""
    gen = torch.Generator().manual_seed(0)
    act = torch.randn(2, 16, 7, 7, generator=gen) * 100
    act = act - act.mean(dim=(2, 3), keepdim=True) - 20.0 / 49                 # each channel sums to -20
    grad = torch.rand(2, 16, 7, 7, generator=gen) * 0.1 + 0.05
    ref = _grad_cam_plus_plus_float64(act, grad)
    ours = _grad_cam_plus_plus(act, grad)
    assert ours.dtype == torch.float32
    assert float((ours.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def _captum_grad_cam(model, layer_module, x, t):
    attr = LayerGradCam(model, layer_module).attribute(x, target=t, relu_attributions=True)
    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), "bilinear")[:, 0]


def test_grad_cam_matches_captum_unnormalized(demo_model, demo_taps, demo_heldout_inputs,
                                              demo_heldout, resnet):
    x, t = demo_heldout_inputs[:6], demo_heldout.labels[:6]
    module = dict(demo_model.named_modules())[DEMO_CAM_LAYER]
    ours = explain_cam(demo_model, demo_taps, [CamRequest(x, t, DEMO_CAM_LAYER)])[0].maps["grad_cam"]
    torch.testing.assert_close(ours, _captum_grad_cam(demo_model, module, x, t), rtol=1e-4, atol=1e-6)
    model, taps = resnet
    x, t = resnet_batch()
    ours = explain_cam(model, taps, [CamRequest(x, t, "layer3")])[0].maps["grad_cam"]
    torch.testing.assert_close(ours, _captum_grad_cam(model, model.layer3, x, t), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- localization

def test_pointing_game_on_the_demo_heldout_set(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    maps = all_variants(demo_model, demo_taps, demo_heldout_inputs, demo_heldout.labels, DEMO_CAM_LAYER)
    scores = {v: pointing_game(m, demo_heldout.boxes) for v, m in maps.items()}
    print("pointing game", scores)
    assert all(s >= 0.95 for s in scores.values()), scores


# ---------------------------------------------------------------- result shape

def test_result_shapes_dtype_and_rows(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:3], demo_heldout.labels[:3]
    (res,) = explain_cam(demo_model, demo_taps, [CamRequest(x, t, DEMO_CAM_LAYER, ("layer_cam",))])
    assert res.rows == 3 and set(res.maps) == set(res.native) == {"layer_cam"}
    assert res.maps["layer_cam"].shape == (3, 64, 64) and res.maps["layer_cam"].dtype == torch.float32
    assert res.native["layer_cam"].shape[0] == 3 and res.native["layer_cam"].dim() == 3
    assert bool((res.maps["layer_cam"] >= 0).all())


def test_works_when_the_caller_disabled_grad(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    req = CamRequest(demo_heldout_inputs[:2], demo_heldout.labels[:2], DEMO_CAM_LAYER, CAM_VARIANTS)
    expected = explain_cam(demo_model, demo_taps, [req])[0].maps
    with torch.no_grad():
        under_no_grad = explain_cam(demo_model, demo_taps, [req])[0].maps
    with torch.inference_mode():
        under_inference = explain_cam(demo_model, demo_taps, [req])[0].maps
    for v in CAM_VARIANTS:
        torch.testing.assert_close(under_no_grad[v], expected[v])
        torch.testing.assert_close(under_inference[v], expected[v])


# ---------------------------------------------------------------- folding

def _mixed_requests(x: torch.Tensor, t: torch.Tensor) -> list[CamRequest]:
    small = torch.nn.functional.interpolate(x[:2], size=(32, 32), mode="bilinear")
    return [
        CamRequest(x[0:3], t[0:3], "block4", ("grad_cam",)),
        CamRequest(x[3:5], t[3:5], "block4", ("layer_cam", "grad_cam_plus_plus")),
        CamRequest(x[5:6], t[5:6], "block3", ("grad_cam",)),
        CamRequest(x[6:9], t[6:9], "block4", CAM_VARIANTS),
        CamRequest(small, t[:2], "block4", ("grad_cam",)),  # other image size: own group
    ]


@pytest.mark.parametrize("budget", [FoldBudget(), FoldBudget(max_rows=4)])
def test_folded_equals_alone(demo_model, demo_taps, demo_heldout_inputs, demo_heldout, budget):
    reqs = _mixed_requests(demo_heldout_inputs, demo_heldout.labels)
    folded = explain_cam(demo_model, demo_taps, reqs, budget)
    for req, got in zip(reqs, folded):
        (alone,) = explain_cam(demo_model, demo_taps, [req])
        assert got.rows == req.inputs.shape[0] and set(got.maps) == set(req.variants)
        for v in req.variants:
            torch.testing.assert_close(got.maps[v], alone.maps[v])
            torch.testing.assert_close(got.native[v], alone.native[v])


def test_the_pass_returns_the_logits_and_explains_the_predicted_class(demo_model, demo_taps,
                                                                      demo_heldout_inputs):
    x = demo_heldout_inputs[:6]
    with torch.inference_mode():
        logits = demo_model(x).float()
    predicted = logits.argmax(dim=1)
    given = torch.tensor([3, 0, 1, 2, 3, 0])
    # Mixed in one fold and split across chunks: rows left to the model and rows with a class.
    reqs = [CamRequest(x[:2], None, DEMO_CAM_LAYER, CAM_VARIANTS), CamRequest(x[2:5], given[2:5], DEMO_CAM_LAYER),
            CamRequest(x[5:], None, DEMO_CAM_LAYER, ("grad_cam",))]
    results = explain_cam(demo_model, demo_taps, reqs, FoldBudget(max_rows=4))
    assert [r.targets.tolist() for r in results] == [predicted[:2].tolist(), [1, 2, 3], predicted[5:].tolist()]
    torch.testing.assert_close(torch.cat([r.logits for r in results]), logits, rtol=1e-5, atol=1e-5)
    explicit = explain_cam(demo_model, demo_taps, [CamRequest(x[:2], predicted[:2], DEMO_CAM_LAYER, CAM_VARIANTS)])
    for v in CAM_VARIANTS:
        torch.testing.assert_close(results[0].maps[v], explicit[0].maps[v])


def test_one_forward_and_one_backward_per_chunk(demo_model, demo_taps, demo_heldout_inputs,
                                                demo_heldout, monkeypatch):
    grads = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    forwards = []
    handle = demo_model.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    try:
        explain_cam(demo_model, demo_taps, _mixed_requests(demo_heldout_inputs, demo_heldout.labels),
                    FoldBudget(max_rows=4))
    finally:
        handle.remove()
    # block4 at 64 px: 8 rows in chunks of 4; block3: 1 row; block4 at 32 px: 2 rows.
    assert sorted(forwards) == [1, 2, 4, 4]
    assert len(grads) == 4


def test_backward_stops_at_the_layer():
    calls = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            calls.append(1)
            return grad

    class SpyFirst(nn.Module):
        def forward(self, x):
            return Spy.apply(x)

    model = tiny_model()
    model.conv1 = nn.Sequential(SpyFirst(), model.conv1)
    with LayerTaps(model, ["conv2"]) as taps:
        x = torch.randn(2, 3, 16, 16).requires_grad_(True)  # even an input that wants grad
        explain_cam(model, taps, [CamRequest(x, torch.tensor([0, 1]), "conv2", CAM_VARIANTS)])
    assert calls == []


# ---------------------------------------------------------------- concurrency

def test_two_threads_on_one_tapped_model_see_only_their_own_activations(
        demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    x = demo_heldout_inputs[:2]
    jobs = {  # same images, different targets and layers: cross-talk would show
        "a": CamRequest(x, torch.tensor([0, 1]), "block4", CAM_VARIANTS),
        "b": CamRequest(x, torch.tensor([2, 3]), "block3", CAM_VARIANTS),
    }
    expected = {k: explain_cam(demo_model, demo_taps, [r])[0].maps for k, r in jobs.items()}
    before, failures, start = hook_count(demo_model), [], threading.Barrier(2)

    def worker(key: str) -> None:
        start.wait()
        for _ in range(30):
            got = explain_cam(demo_model, demo_taps, [jobs[key]])[0].maps
            failures.extend((key, v) for v in CAM_VARIANTS if not torch.allclose(got[v], expected[key][v]))

    threads = [threading.Thread(target=worker, args=(k,)) for k in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert failures == [] and hook_count(demo_model) == before


# ---------------------------------------------------------------- typed errors

def _field(err) -> str:
    return err.value.violations[0].field


@pytest.mark.parametrize("change, field", [
    (dict(variants=("nope",)), "cam.variants"),
    (dict(variants=()), "cam.variants"),
    (dict(variants=("grad_cam", "grad_cam")), "cam.variants"),
    (dict(targets=torch.tensor([0.0, 1.0])), "target"),
    (dict(targets=torch.tensor([0, 1, 2])), "target"),
    (dict(targets=torch.tensor([0, 3])), "target"),
    (dict(targets=torch.tensor([-1, 0])), "target"),
    (dict(inputs=torch.full((2, 3, 16, 16), float("nan"))), "inputs"),
    (dict(inputs=torch.zeros(3, 16, 16)), "inputs"),
    (dict(inputs=torch.zeros(2, 3, 16, 16, dtype=torch.int64)), "inputs"),
    (dict(inputs=torch.zeros(0, 3, 16, 16), targets=torch.zeros(0, dtype=torch.int64)), "inputs"),
    (dict(layer="unused"), "layer"),  # a module the forward never runs
])
def test_invalid_requests_raise_typed_errors(change, field):
    model = tiny_model()
    with LayerTaps(model, ["conv2", "unused"], model_name="tiny") as taps:
        fields = dict(inputs=torch.randn(2, 3, 16, 16), targets=torch.tensor([0, 1]), layer="conv2")
        req = CamRequest(**{**fields, **change})
        with pytest.raises(InvalidArgument) as err:
            explain_cam(model, taps, [req])
        assert _field(err) == field
        if field != "layer":  # a layer's use is only known by running the forward
            with pytest.raises(InvalidArgument) as err:
                validate_cam_request(req, taps, num_classes=3)
            assert _field(err) == field


def test_unknown_layer_raises_layer_not_found():
    model = tiny_model()
    with LayerTaps(model, ["conv2"], model_name="tiny") as taps:
        req = CamRequest(torch.randn(1, 3, 16, 16), torch.tensor([0]), "conv9")
        with pytest.raises(LayerNotFound):
            validate_cam_request(req, taps, num_classes=3)
        with pytest.raises(LayerNotFound):
            explain_cam(model, taps, [req])


def test_layer_that_does_not_reach_the_output_is_a_typed_error():
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.side = nn.Conv2d(3, 2, 1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            self.side(x)  # computed, then thrown away
            return self.head(x.mean(dim=(2, 3)))

    model = SideBranch().eval()
    with LayerTaps(model, ["side"]) as taps:
        with pytest.raises(InvalidArgument) as err:
            explain_cam(model, taps, [CamRequest(torch.randn(1, 3, 8, 8), torch.tensor([1]), "side")])
    assert _field(err) == "layer"


def test_validate_accepts_a_good_request(demo_taps, demo_heldout_inputs, demo_heldout):
    req = CamRequest(demo_heldout_inputs[:2], demo_heldout.labels[:2], DEMO_CAM_LAYER, CAM_VARIANTS)
    validate_cam_request(req, demo_taps, num_classes=4)
