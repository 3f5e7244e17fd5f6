"""HiResCAM, XGrad-CAM and EigenCAM beyond the shared agreement tests of test_cam.py:
EigenCAM's sign rule and its forward-only pass, folding with the gradient variants,
agreement on a second architecture (DenseNet-121's default layer, and the token and
channels-last layouts: test_architectures.py runs every variant of `CAM_VARIANTS`).

Tolerances: maps are compared after the per-image min-max normalization pytorch-grad-cam
applies (`normalize`), at atol 2e-3 (its cv2 resize against our bilinear upsampling with
the same half-pixel centres); signed EigenCAM projections at the layer's resolution, before
any ReLU or resize, at rtol 1e-4 of the largest value (numpy's float32 SVD against ours in
float64).
"""
from __future__ import annotations

import pytest
import torch
from pytorch_grad_cam import EigenCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

from tests.workers.kernels.test_cam import normalize, resnet18_model, resnet_batch
from workers.batching import FoldBudget
from workers.demo import DEMO_CAM_LAYER
from workers.kernels.cam import CamRequest, eigen_projection, explain_cam, upsample_map
from workers.kernels.hooks import LayerTaps

NEW_VARIANTS = ("hires_cam", "xgrad_cam", "eigen_cam")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


@pytest.fixture(scope="module")
def resnet():
    model = resnet18_model()
    taps = LayerTaps(model, ("layer3", "layer4"), model_name="resnet18")
    yield model, taps
    taps.close()


def _layer_output(model, taps, layer, x) -> torch.Tensor:
    with torch.no_grad(), taps[layer].capture() as cap:
        model(x)
    return cap.activation


# ---------------------------------------------------------------- EigenCAM's sign

@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_eigen_projection_is_pytorch_grad_cams_sign_corrected_projection(resnet, layer):
    model, taps = resnet
    act = _layer_output(model, taps, layer, resnet_batch(n=4)[0])
    ref = torch.from_numpy(get_2d_projection_with_sign_correction(act.numpy()))
    ours = eigen_projection(act)
    torch.testing.assert_close(ours, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_eigen_sign_rule_puts_the_strongest_response_positive():
    gen = torch.Generator().manual_seed(4)
    act = torch.randn(16, 8, 5, 5, generator=gen)
    proj = eigen_projection(act)
    assert bool((proj.flatten(1).amax(1) >= proj.flatten(1).amin(1).abs()).all())
    # Whatever sign the decomposition returns, the rule decides: -A projects to -(projection of A),
    # which the rule turns back (no tie here: every |min| differs from its max).
    torch.testing.assert_close(eigen_projection(-act), proj, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_eigen_cam_matches_plain_pytorch_grad_cam_up_to_the_sign(resnet, layer):
    """pytorch-grad-cam's EigenCAM keeps LAPACK's sign: each of its maps is ours, or the map of the
    opposite sign; which one is LAPACK's choice, so both are accepted, image by image."""
    model, taps = resnet
    x, t = resnet_batch(n=4)
    res = explain_cam(model, taps, [CamRequest(x, t, layer, ("eigen_cam",))])[0]
    with EigenCAM(model, [getattr(model, layer)]) as cam:
        peer = torch.from_numpy(cam(x.clone(), [ClassifierOutputTarget(int(i)) for i in t]))
    proj = eigen_projection(_layer_output(model, taps, layer, x))
    torch.testing.assert_close(res.native["eigen_cam"], torch.relu(proj))
    flipped = normalize(upsample_map(torch.relu(-proj), tuple(x.shape[-2:])))
    ours = normalize(res.maps["eigen_cam"])
    for i in range(x.shape[0]):
        close = [float((cand[i] - peer[i]).abs().max()) for cand in (ours, flipped)]
        assert min(close) <= 2e-3, (i, close)


def test_eigen_cam_is_class_agnostic(resnet):
    model, taps = resnet
    x, _ = resnet_batch(n=2)
    a = explain_cam(model, taps, [CamRequest(x, torch.tensor([0, 1]), "layer4", ("eigen_cam",))])[0]
    b = explain_cam(model, taps, [CamRequest(x, torch.tensor([5, 9]), "layer4", ("eigen_cam",))])[0]
    torch.testing.assert_close(a.maps["eigen_cam"], b.maps["eigen_cam"])
    assert a.targets.tolist() == [0, 1] and b.targets.tolist() == [5, 9]


# ---------------------------------------------------------------- EigenCAM runs no backward

def test_eigen_cam_alone_runs_no_backward_and_folds_with_the_gradient_variants(
        demo_model, demo_taps, demo_heldout_inputs, demo_heldout, monkeypatch):
    x, t = demo_heldout_inputs[:6], demo_heldout.labels[:6]
    mixed = explain_cam(demo_model, demo_taps, [CamRequest(x, t, DEMO_CAM_LAYER, NEW_VARIANTS)])[0]
    grads, grad_modes = [], []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    handle = demo_model.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    try:
        alone = explain_cam(demo_model, demo_taps, [CamRequest(x[:2], t[:2], DEMO_CAM_LAYER, ("eigen_cam",)),
                                                    CamRequest(x[2:], None, DEMO_CAM_LAYER, ("eigen_cam",))],
                            FoldBudget(max_rows=4))
    finally:
        handle.remove()
    assert grads == [] and grad_modes == [False, False]      # 6 rows in chunks of 4: two forwards, no graph
    torch.testing.assert_close(torch.cat([r.maps["eigen_cam"] for r in alone]), mixed.maps["eigen_cam"])
    with torch.inference_mode():
        predicted = demo_model(x[2:]).argmax(dim=1)
    assert alone[1].targets.tolist() == predicted.tolist()  # the predicted class still comes from the pass


@pytest.mark.parametrize("budget", [FoldBudget(), FoldBudget(max_rows=3)])
def test_new_variants_folded_equal_one_by_one(demo_model, demo_taps, demo_heldout_inputs, demo_heldout, budget):
    x, t = demo_heldout_inputs[:8], demo_heldout.labels[:8]
    reqs = [CamRequest(x[0:2], t[0:2], "block4", ("hires_cam",)),
            CamRequest(x[2:5], None, "block4", ("eigen_cam", "grad_cam")),
            CamRequest(x[5:6], t[5:6], "block3", ("xgrad_cam", "eigen_cam")),
            CamRequest(x[6:8], t[6:8], "block4", NEW_VARIANTS)]
    folded = explain_cam(demo_model, demo_taps, reqs, budget)
    for req, got in zip(reqs, folded):
        (alone,) = explain_cam(demo_model, demo_taps, [req])
        assert set(got.maps) == set(req.variants)
        for v in req.variants:
            torch.testing.assert_close(got.maps[v], alone.maps[v])
            torch.testing.assert_close(got.native[v], alone.native[v])


# ---------------------------------------------------------------- definitions

def test_hires_and_xgrad_cam_definitions(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    """The formulas written out on the layer's activation and gradient, taken here by plain autograd."""
    x, t = demo_heldout_inputs[:3], demo_heldout.labels[:3]
    res = explain_cam(demo_model, demo_taps, [CamRequest(x, t, "block3", NEW_VARIANTS)])[0]
    feats = {}
    handle = demo_model.block3.register_forward_hook(lambda m, a, out: feats.setdefault("a", out))
    try:
        with torch.enable_grad():
            leaf = x.clone().requires_grad_(True)
            logits = demo_model(leaf)
            (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), feats["a"])
    finally:
        handle.remove()
    act = feats["a"].detach()
    hires = torch.relu((grad * act).sum(dim=1))
    weights = (grad * act).sum(dim=(2, 3), keepdim=True) / (act.sum(dim=(2, 3), keepdim=True) + 1e-7)
    xgrad = torch.relu((weights * act).sum(dim=1))
    torch.testing.assert_close(res.native["hires_cam"], hires, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.native["xgrad_cam"], xgrad, rtol=1e-4, atol=1e-6)
