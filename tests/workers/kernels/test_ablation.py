"""Ablation-CAM and Faster Score-CAM (Score-CAM with top_k_channels): agreement with
pytorch-grad-cam, the definitions written out one channel at a time, the channels kept,
layouts, chunking, progress, cancellation, concurrency and typed errors.

Definition differences with pytorch-grad-cam's AblationCAM: it zeroes the channel where
the layer's smallest value is 0 and otherwise sets it to (minimum - 1e7); we always zero
it (the paper's definition). The agreement tests use post-ReLU layers (the demo model's
block4, ResNet-18's layer4), where both zero. It min-max normalizes each map and resizes
it with cv2; compared after the same normalization (`normalize`), atol 2e-3. Its
`ratio_channels_to_ablate` picks channels by an EigenCAM mask, not by energy: channel
subsets are checked against the written-out definition instead.
"""
from __future__ import annotations

import contextlib
import io
import threading

import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import AblationCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from tests.workers.kernels.test_architectures import TinyChannelsLast, TinyViT, _frozen
from tests.workers.kernels.test_cam import normalize, resnet18_model, resnet_batch
from tests.workers.kernels.test_hooks import tiny_model
from workers.batching import FoldBudget
from workers.demo import DEMO_CAM_LAYER
from workers.errors import Cancelled, InvalidArgument, LayerNotFound
from workers.kernels.cam import upsample_map
from workers.kernels.hooks import LayerTaps, hook_count
from workers.kernels.perturbation import ablation_cam, score_cam, top_channels

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


@pytest.fixture()
def tiny():
    model = tiny_model()
    taps = LayerTaps(model, ["conv2", "unused"], model_name="tiny")
    yield model, taps, torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)), \
        torch.tensor([0, 1, 2])
    taps.close()


def peer_ablation_cam(model, layer_module, x, t) -> torch.Tensor:
    with AblationCAM(model, [layer_module]) as cam, contextlib.redirect_stderr(io.StringIO()):
        cam.batch_size = 64
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(i)) for i in t]))


def _layer_output(model, module, x) -> torch.Tensor:
    feats = {}
    handle = module.register_forward_hook(lambda m, a, out: feats.setdefault("a", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return feats["a"]


def ablation_by_hand(model, module, x, t, channels: list[list[int]], axis: int = 1) -> torch.Tensor:
    """The definition, one image and one zeroed channel per forward, with a plain forward hook."""
    maps = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        act = _layer_output(model, module, xi)
        with torch.no_grad():
            base = float(model(xi)[0, t[i]])
        nchw = act.movedim(axis, 1)
        weights = torch.zeros(nchw.shape[1])
        for c in channels[i]:
            def zero(m, a, out, c=c):
                out = out.clone()
                out.select(axis, c).zero_()
                return out
            handle = module.register_forward_hook(zero)
            try:
                with torch.no_grad():
                    y = float(model(xi)[0, t[i]])
            finally:
                handle.remove()
            weights[c] = (base - y) / base
        native = torch.relu((weights[:, None, None] * nchw[0]).sum(dim=0))
        maps.append(upsample_map(native[None], tuple(x.shape[-2:]))[0])
    return torch.stack(maps)


# ---------------------------------------------------------------- agreement

def test_matches_pytorch_grad_cam_on_the_demo_model(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:4], demo_heldout.labels[:4]
    ours = ablation_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER)
    module = dict(demo_model.named_modules())[DEMO_CAM_LAYER]
    torch.testing.assert_close(normalize(ours), peer_ablation_cam(demo_model, module, x, t), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_matches_pytorch_grad_cam_on_resnet18():
    model = resnet18_model()
    x, t = resnet_batch(n=2)
    with LayerTaps(model, ["layer4"]) as taps:
        ours = ablation_cam(model, taps, x, t, "layer4", budget=FoldBudget(max_rows=128))
    torch.testing.assert_close(normalize(ours), peer_ablation_cam(model, model.layer4, x, t), atol=2e-3, rtol=0)


def test_pointing_game_on_demo_images(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    from tests.workers.kernels.test_cam import pointing_game
    x, t = demo_heldout_inputs[:40], demo_heldout.labels[:40]
    score = pointing_game(ablation_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER), demo_heldout.boxes[:40])
    assert score >= 0.95, score


# ---------------------------------------------------------------- channels kept

def test_top_k_channels_ablates_the_strongest_channels(demo_model, demo_taps, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:3], demo_heldout.labels[:3]
    module = dict(demo_model.named_modules())[DEMO_CAM_LAYER]
    act = _layer_output(demo_model, module, x)
    energy = act.pow(2).sum(dim=(2, 3))
    kept = [sorted(energy[i].argsort(descending=True)[:5].tolist()) for i in range(3)]
    assert [sorted(r) for r in top_channels(act, 5).tolist()] == kept
    calls = []
    few = ablation_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER, top_k_channels=5,
                       budget=FoldBudget(max_rows=5), progress=calls.append)
    assert len(calls) == 3                                     # 3 images x 5 channels in chunks of 5
    torch.testing.assert_close(few, ablation_by_hand(demo_model, module, x, t, kept), rtol=1e-4, atol=1e-5)
    everything = ablation_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER)
    torch.testing.assert_close(ablation_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER,
                                            top_k_channels=act.shape[1] + 3), everything)


def score_cam_by_hand(model, module, x, t, channels: list[list[int]]) -> torch.Tensor:
    """Score-CAM over the given channels only, one masked input per forward."""
    maps = []
    for i in range(x.shape[0]):
        act = _layer_output(model, module, x[i:i + 1])[0]                  # (K, h, w)
        scores = []
        for c in channels[i]:
            mask = F.interpolate(act[c][None, None], size=tuple(x.shape[-2:]), mode="bilinear",
                                 align_corners=True)
            mask = (mask - mask.min()) / (mask.max() - mask.min() + 1e-8)
            with torch.no_grad():
                scores.append(float(model(x[i:i + 1] * mask)[0, t[i]]))
        weights = torch.softmax(torch.tensor(scores), dim=0)
        native = torch.relu((weights[:, None, None] * act[channels[i]]).sum(dim=0))
        maps.append(upsample_map(native[None], tuple(x.shape[-2:]))[0])
    return torch.stack(maps)


def test_faster_score_cam_masks_with_the_k_highest_energy_channels(demo_model, demo_taps, demo_heldout_inputs,
                                                                 demo_heldout):
    """Score-CAM with top_k_channels = k (Faster Score-CAM): k masked forwards per image, the masks made
    from the k channels of highest Σ A², the softmax over those k scores."""
    x, t = demo_heldout_inputs[:3], demo_heldout.labels[:3]
    module = dict(demo_model.named_modules())[DEMO_CAM_LAYER]
    act = _layer_output(demo_model, module, x)
    energy = act.pow(2).sum(dim=(2, 3))
    kept = [energy[i].argsort(descending=True)[:6].tolist() for i in range(3)]
    weakest = [energy[i].argsort()[:6].tolist() for i in range(3)]
    fast = score_cam(demo_model, demo_taps, x, t, DEMO_CAM_LAYER, top_k_channels=6)
    torch.testing.assert_close(fast, score_cam_by_hand(demo_model, module, x, t, kept), rtol=1e-4, atol=1e-5)
    wrong = score_cam_by_hand(demo_model, module, x, t, weakest)
    assert float((fast - wrong).abs().max()) > 1e-3  # the test tells the kept channels apart


# ---------------------------------------------------------------- layouts

def test_channels_last_and_token_layers():
    model = _frozen(TinyChannelsLast())
    x, t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 3, 4])
    with LayerTaps(model, ["conv", "nhwc"], layouts={"conv": "nchw", "nhwc": "nhwc"}) as taps:
        first = ablation_cam(model, taps, x, t, "conv")
        last = ablation_cam(model, taps, x, t, "nhwc", budget=FoldBudget(max_rows=5))
    torch.testing.assert_close(last, first)
    torch.testing.assert_close(first, ablation_by_hand(model, model.conv, x, t, [list(range(8))] * 3),
                               rtol=1e-4, atol=1e-5)
    vit = _frozen(TinyViT())
    with LayerTaps(vit, ["block"], layouts={"block": "tokens"}) as taps:
        ours = ablation_cam(vit, taps, x, t, "block", top_k_channels=4)
        act = _layer_output(vit, vit.block, x)
        kept = top_channels(taps["block"].to_nchw(act, (32, 32)), 4).tolist()
    # By hand: channel c zeroed on every token (the class token too), along the last axis.
    ref = []
    for i in range(3):
        grid = act[i:i + 1, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        with torch.no_grad():
            base = float(vit(x[i:i + 1])[0, t[i]])
        weights = torch.zeros(grid.shape[1])
        for c in kept[i]:
            handle = vit.block.register_forward_hook(lambda m, a, out, c=c: out.index_fill(2, torch.tensor([c]), 0))
            try:
                with torch.no_grad():
                    weights[c] = (base - float(vit(x[i:i + 1])[0, t[i]])) / base
            finally:
                handle.remove()
        ref.append(upsample_map(torch.relu((weights[:, None, None] * grid[0]).sum(0))[None], (32, 32))[0])
    torch.testing.assert_close(ours, torch.stack(ref), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- chunking, progress, cancel, threads

def test_chunking_does_not_change_the_result_and_progress_ends_at_one(tiny):
    model, taps, x, t = tiny
    seen = []
    chunked = ablation_cam(model, taps, x, t, "conv2", budget=FoldBudget(max_rows=5), progress=seen.append)
    torch.testing.assert_close(chunked, ablation_cam(model, taps, x, t, "conv2"))
    assert len(seen) == -(-3 * 6 // 5)                         # N * K ablated rows in chunks of 5
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(seen, seen[1:])) and seen[-1] == 1.0
    assert not chunked.is_inference() and chunked.dtype == torch.float32


def test_cancel_between_chunks(tiny):
    model, taps, x, t = tiny
    seen, before = [], hook_count(model)
    with pytest.raises(Cancelled, match="ablation_cam cancelled"):
        ablation_cam(model, taps, x, t, "conv2", budget=FoldBudget(max_rows=5), progress=seen.append,
                     cancelled=lambda: len(seen) >= 2)
    assert len(seen) == 2 and hook_count(model) == before


def test_concurrent_threads_do_not_cross_talk(tiny):
    model, taps, x, t = tiny
    args = {"a": (x[:2], torch.tensor([0, 1])), "b": (x[1:], torch.tensor([2, 2]))}
    expected = {k: ablation_cam(model, taps, *a, "conv2") for k, a in args.items()}
    failures = []

    def worker(key):
        for _ in range(15):
            if not torch.allclose(ablation_cam(model, taps, *args[key], "conv2", budget=FoldBudget(max_rows=4)),
                                  expected[key]):
                failures.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in args]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert failures == []


# ---------------------------------------------------------------- typed errors

@pytest.mark.parametrize("kw, field", [
    (dict(top_k_channels=-1), "score_cam.top_k_channels"),
    (dict(top_k_channels=1.5), "score_cam.top_k_channels"),
    (dict(targets=torch.tensor([0, 1, 3])), "target"),
    (dict(targets=torch.tensor([0, 1])), "target"),
    (dict(inputs=torch.full((3, 3, 16, 16), float("nan"))), "inputs"),
    (dict(layer="unused"), "layer"),
])
def test_errors(tiny, kw, field):
    model, taps, x, t = tiny
    args = {"inputs": x, "targets": t, "layer": "conv2", **kw}
    with pytest.raises(InvalidArgument) as err:
        ablation_cam(model, taps, args.pop("inputs"), args.pop("targets"), args.pop("layer"), **args)
    assert err.value.violations[0].field == field


def test_unknown_layer(tiny):
    model, taps, x, t = tiny
    with pytest.raises(LayerNotFound):
        ablation_cam(model, taps, x, t, "conv9")
