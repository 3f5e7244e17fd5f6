"""Score-CAM and occlusion: agreement with the peers, localization, chunking, progress,
cancellation and every typed error.

Definition differences with the peers:
- Score-CAM, pytorch-grad-cam: same masks (UpsamplingBilinear2d, i.e. corners
  aligned, then min-max with 1e-8), same weights (softmax over channels of the
  target logit of each masked input). It min-max normalizes the map and resizes
  it with cv2; we return it un-normalized, upsampled with half-pixel centres:
  compared after the same normalization. It also scores the masked inputs image
  by image in batches of 16 with a `.cpu().item()` per score; we fold all images'
  masked copies into budget-sized chunks on the device. The paper (Wang et al.)
  scores the *post-softmax* class probability minus a baseline's; pytorch-grad-cam
  and we use the logit, the softmax then running over channels.
- Occlusion, Captum `Occlusion(sliding_window_shapes=(C, p, p), strides=(C, s, s),
  baselines=v)`: same patch positions (last patch cut off at the border), same
  mean-of-drops; Captum returns `(N, C, H, W)` with C identical planes, we return
  one `(N, H, W)` plane; our default stride is half a patch, Captum's is 1.
"""
from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from pytorch_grad_cam import ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from tests.workers.kernels.test_cam import (normalize, pointing_game, resnet18_model, resnet_batch)
from tests.workers.kernels.test_hooks import tiny_model
from workers.batching import FoldBudget
from workers.demo import DEMO_CAM_LAYER
from workers.errors import Cancelled, InvalidArgument, LayerNotFound
from workers.kernels.hooks import LayerTaps, hook_count
from workers.kernels.perturbation import occlusion, score_cam

# Occlusion on the demo model: a patch smaller than the 12 px watermark with overlap,
# so a pixel in the watermark is covered by several patches that each hide part of it.
DEMO_PATCH, DEMO_STRIDE = 8, 4


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


@pytest.fixture(scope="module")
def resnet():
    model = resnet18_model()
    taps = LayerTaps(model, ["layer3", "layer4"], model_name="resnet18")
    yield model, taps
    taps.close()


@pytest.fixture()
def tiny():
    model = tiny_model()
    taps = LayerTaps(model, ["conv2", "unused"], model_name="tiny")
    yield model, taps, torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)), \
        torch.tensor([0, 1, 2])
    taps.close()


def peer_score_cam(model, layer_module, x, t) -> torch.Tensor:
    with ScoreCAM(model, [layer_module]) as cam:
        cam.batch_size = 64
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(i)) for i in t]))


# ---------------------------------------------------------------- agreement

@pytest.mark.slow
def test_score_cam_matches_pytorch_grad_cam(demo_model, demo_taps, demo_heldout_inputs, demo_heldout,
                                            resnet):
    x, t = demo_heldout_inputs[:3], demo_heldout.labels[:3]
    ours = score_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER)
    module = dict(demo_model.named_modules())[DEMO_CAM_LAYER]
    torch.testing.assert_close(normalize(ours), peer_score_cam(demo_model, module, x, t),
                               atol=2e-3, rtol=0)
    model, taps = resnet
    x, t = resnet_batch(n=2)
    ours = score_cam(model, taps, x, t, "layer3", budget=FoldBudget(max_rows=64))
    torch.testing.assert_close(normalize(ours), peer_score_cam(model, model.layer3, x, t),
                               atol=2e-3, rtol=0)


def _captum_occlusion(model, x, t, p, s, value):
    attr = Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], p, p),
                                      strides=(x.shape[1], s, s), baselines=value, target=t,
                                      perturbations_per_eval=64)
    assert torch.equal(attr[:, :1].expand_as(attr), attr)  # C identical planes
    return attr[:, 0]


@pytest.mark.parametrize("patch, stride, value", [(8, 8, 0.0), (12, 8, 0.5), (5, 3, -1.0)])
def test_occlusion_matches_captum(resnet, patch, stride, value):
    model, _ = resnet
    x, t = resnet_batch(n=2, size=32)  # 12/8 and 5/3 leave a cut-off last patch at 32 px
    ours = occlusion(model, x, t, patch_size=patch, stride=stride, baseline_value=value,
                     budget=FoldBudget(max_rows=50))
    torch.testing.assert_close(ours, _captum_occlusion(model, x, t, patch, stride, value),
                               rtol=1e-4, atol=1e-5)


def test_occlusion_matches_captum_on_the_demo_model(demo_model, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:2], demo_heldout.labels[:2]
    ours = occlusion(demo_model, x, t, patch_size=12, stride=8)
    torch.testing.assert_close(ours, _captum_occlusion(demo_model, x, t, 12, 8, 0.0),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- localization

@pytest.mark.slow
def test_pointing_game_on_the_demo_heldout_set(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    x, t, boxes = demo_heldout_inputs, demo_heldout.labels, demo_heldout.boxes
    # 200 images x 225 patches: cache-sized chunks run ~3x faster on a CPU than the
    # automatic budget's (which fills GiBs); the result does not depend on the chunking.
    budget = FoldBudget(max_rows=256)
    scores = {
        "score_cam": pointing_game(score_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER,
                                             budget=budget), boxes),
        "occlusion": pointing_game(occlusion(demo_model, x, t, patch_size=DEMO_PATCH,
                                             stride=DEMO_STRIDE, budget=budget), boxes),
    }
    print("pointing game", scores)
    assert all(s >= 0.95 for s in scores.values()), scores


def test_top_k_channels(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:8], demo_heldout.labels[:8]
    full = score_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER)
    with torch.no_grad(), demo_taps[DEMO_CAM_LAYER].capture() as cap:
        demo_model(x[:1])
    channels = cap.activation.shape[1]
    # k >= K keeps every channel: the same computation.
    torch.testing.assert_close(score_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER,
                                         top_k_channels=channels + 5), full)
    calls = []
    few = score_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER, top_k_channels=4,
                    budget=FoldBudget(max_rows=8), progress=calls.append)
    assert len(calls) == 8 * 4 // 8  # k*N masked forwards instead of K*N
    assert few.shape == full.shape and bool((few >= 0).all())


# ---------------------------------------------------------------- chunking, progress, cancel

def test_chunking_does_not_change_the_result(tiny):
    model, taps, x, t = tiny
    torch.testing.assert_close(score_cam(model, taps, x, t, "conv2", budget=FoldBudget(max_rows=5)),
                               score_cam(model, taps, x, t, "conv2"))
    torch.testing.assert_close(occlusion(model, x, t, patch_size=4, budget=FoldBudget(max_rows=7)),
                               occlusion(model, x, t, patch_size=4))


@pytest.mark.parametrize("method", ["score_cam", "occlusion"])
def test_progress_is_monotonic_and_ends_at_one(tiny, method):
    model, taps, x, t = tiny
    seen = []
    budget = FoldBudget(max_rows=5)
    if method == "score_cam":
        score_cam(model, taps, x, t, "conv2", budget=budget, progress=seen.append)
        total = 3 * 6  # N * K masked inputs
    else:
        occlusion(model, x, t, patch_size=4, stride=4, budget=budget, progress=seen.append)
        total = 3 * 16  # N * 4x4 patches
    assert len(seen) == -(-total // 5)
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(seen, seen[1:])) and seen[-1] == 1.0


@pytest.mark.parametrize("method", ["score_cam", "occlusion"])
def test_cancel_between_chunks(tiny, method):
    model, taps, x, t = tiny
    seen, before = [], hook_count(model)

    def run(cancelled):
        kw = dict(budget=FoldBudget(max_rows=5), progress=seen.append, cancelled=cancelled)
        if method == "score_cam":
            return score_cam(model, taps, x, t, "conv2", **kw)
        return occlusion(model, x, t, patch_size=4, stride=4, **kw)

    with pytest.raises(Cancelled) as err:
        run(lambda: len(seen) >= 2)
    assert len(seen) == 2 and seen[-1] < 1.0 and "cancelled" in err.value.message
    assert hook_count(model) == before
    seen.clear()
    assert run(lambda: False).shape == (3, 16, 16) and seen[-1] == 1.0


def test_outputs_are_ordinary_tensors(tiny):
    model, taps, x, t = tiny
    for out in (score_cam(model, taps, x, t, "conv2"), occlusion(model, x, t, patch_size=4)):
        assert not out.is_inference() and out.dtype == torch.float32 and out.shape == (3, 16, 16)
        out /= out.abs().max() + 1e-9  # callers may normalize in place


def test_score_cam_concurrent_threads_do_not_cross_talk(tiny):
    import threading
    model, taps, x, t = tiny
    args = {"a": (x[:2], torch.tensor([0, 1])), "b": (x[1:], torch.tensor([2, 2]))}
    expected = {k: score_cam(model, taps, *a, "conv2") for k, a in args.items()}
    failures = []

    def worker(key):
        for _ in range(20):
            if not torch.allclose(score_cam(model, taps, *args[key], "conv2"), expected[key]):
                failures.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in args]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert failures == []


# ---------------------------------------------------------------- typed errors

@pytest.mark.parametrize("kw, field", [
    (dict(patch_size=0), "occlusion.patch_size"),
    (dict(patch_size=17), "occlusion.patch_size"),
    (dict(patch_size=4.0), "occlusion.patch_size"),
    (dict(patch_size=True), "occlusion.patch_size"),
    (dict(patch_size=4, stride=0), "occlusion.stride"),
    (dict(patch_size=4, stride=5), "occlusion.stride"),
    (dict(baseline_value=float("nan")), "occlusion.baseline_value"),
    (dict(baseline_value="0"), "occlusion.baseline_value"),
    (dict(targets=torch.tensor([0, 1, 3])), "target"),
    (dict(targets=torch.tensor([0, 1])), "target"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "target"),
    (dict(inputs=torch.full((3, 3, 16, 16), float("inf"))), "inputs"),
])
def test_occlusion_errors(tiny, kw, field):
    model, _, x, t = tiny
    args = {"inputs": x, "targets": t, **kw}
    with pytest.raises(InvalidArgument) as err:
        occlusion(model, args.pop("inputs"), args.pop("targets"), **args)
    assert err.value.violations[0].field == field


@pytest.mark.parametrize("kw, field", [
    (dict(top_k_channels=-1), "score_cam.top_k_channels"),
    (dict(top_k_channels=2.5), "score_cam.top_k_channels"),
    (dict(targets=torch.tensor([0, 1, 3])), "target"),
    (dict(targets=torch.tensor([[0], [1], [2]])), "target"),
    (dict(inputs=torch.full((3, 3, 16, 16), float("nan"))), "inputs"),
    (dict(layer="unused"), "layer"),
])
def test_score_cam_errors(tiny, kw, field):
    model, taps, x, t = tiny
    args = {"inputs": x, "targets": t, "layer": "conv2", **kw}
    with pytest.raises(InvalidArgument) as err:
        score_cam(model, taps, args.pop("inputs"), args.pop("targets"), args.pop("layer"), **args)
    assert err.value.violations[0].field == field


@pytest.mark.parametrize("method", ["score_cam", "occlusion"])
def test_a_bad_target_in_a_later_chunk_is_caught_before_any_masked_forward(tiny, method):
    model, taps, x, t = tiny
    seen = []
    kw = dict(budget=FoldBudget(max_rows=1), progress=seen.append)
    with pytest.raises(InvalidArgument) as err:
        if method == "score_cam":
            score_cam(model, taps, x, torch.tensor([0, 1, 3]), "conv2", **kw)
        else:
            occlusion(model, x, torch.tensor([0, 1, 3]), patch_size=4, **kw)
    assert err.value.violations[0].field == "target" and seen == []


def test_score_cam_unknown_layer(tiny):
    model, taps, x, t = tiny
    with pytest.raises(LayerNotFound):
        score_cam(model, taps, x, t, "conv9")
