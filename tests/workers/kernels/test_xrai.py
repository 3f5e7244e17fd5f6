"""XRAI: agreement with PAIR's `saliency` package (0.2.1) on two architectures, the segmentation
against its Felzenszwalb segments, the black/white IG average, folding, progress, cancellation and
typed errors.

Agreement set-up: `saliency.core.XRAI.GetMaskWithDetails` is given our averaged IG attributions
`(H, W, C)` as `base_attribution` (it reduces channels by max, as we do) and our segments as
`segments`, with its defaults otherwise (algorithm "full", min_pixel_diff 50, area threshold 1):
its `attribution_mask` must equal our map. Our segments are checked apart against its own
`_get_segments_felzenszwalb` on the same image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency.core import xrai as pair_xrai

from tests.workers.kernels.test_cam import resnet18_model, resnet_batch
from workers.batching import FoldBudget
from workers.demo import DEMO_MEAN, DEMO_STD
from workers.errors import Cancelled, InvalidArgument
from workers.kernels.segments import dilated_label_masks, segment_masks
from workers.kernels.xrai import ig_attributions, xrai, xrai_regions

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py

SCALES = (100.0, 500.0)  # two of the defaults: the tests' segmentations stay quick
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def stats(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def pixels_hwc(x: torch.Tensor, mean, std) -> np.ndarray:
    m, s = stats(mean, std)
    return (x * s + m).permute(0, 2, 3, 1).double().numpy()                # (N, H, W, C)


def pair_map(image: np.ndarray, attribution: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """PAIR's XRAI map from given attributions `(C, H, W)` and segments `(S, H, W)`."""
    out = pair_xrai.XRAI().GetMaskWithDetails(
        image, None, segments=list(masks.numpy()),
        base_attribution=attribution.permute(1, 2, 0).double().numpy())
    return out.attribution_mask


# ---------------------------------------------------------------- segments

def test_segments_are_pairs_felzenszwalb_segments(demo_heldout):
    image = demo_heldout.images[0].permute(1, 2, 0).double().numpy()        # (64, 64, 3)
    ours = segment_masks(image)                                             # the six default scales
    theirs = np.stack([m for m in pair_xrai._get_segments_felzenszwalb(image) if m.any()])
    assert ours.shape == theirs.shape and np.array_equal(ours.numpy(), theirs)


def test_dilation_is_a_disk_dilation_of_each_label():
    from skimage.morphology import dilation, disk
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (9, 11))).repeat_interleave(3, 0)
    ours = dilated_label_masks(labels, 2)
    for k, label in enumerate(labels.unique()):
        assert np.array_equal(ours[k].numpy(), dilation((labels == label).numpy(), footprint=disk(2)))


# ---------------------------------------------------------------- agreement

@pytest.mark.parametrize("arch", ["demo", "resnet18"])
def test_xrai_matches_pair_saliency_given_the_same_attributions_and_segments(arch, demo_model,
                                                                           demo_heldout_inputs, demo_heldout):
    if arch == "demo":
        model, x, t, spec = demo_model, demo_heldout_inputs[:2], demo_heldout.labels[:2], dict(mean=DEMO_MEAN,
                                                                                               std=DEMO_STD)
    else:
        model, spec = resnet18_model(), IMAGENET
        x, t = resnet_batch(n=2, size=64)
    ours = xrai(model, x, t, steps=8, scales=SCALES, **spec)                # (2, 64, 64)
    attributions = ig_attributions(model, x, t, *stats(spec["mean"], spec["std"]), 8, FoldBudget(), None)
    images = pixels_hwc(x, spec["mean"], spec["std"])
    for i in range(2):
        masks = segment_masks(images[i], SCALES)
        theirs = pair_map(images[i], attributions[i], masks)
        np.testing.assert_allclose(ours[i].numpy(), theirs, rtol=1e-5, atol=1e-9)
        assert len(np.unique(theirs)) > 3                                   # several regions were ranked


def test_region_selection_matches_pair_on_overlapping_random_regions():
    gen = torch.Generator().manual_seed(3)
    attribution = torch.randn(3, 40, 40, generator=gen)
    labels = [torch.randint(0, k, (8, 8), generator=gen).repeat_interleave(5, 0).repeat_interleave(5, 1)
              for k in (3, 6, 12)]
    masks = torch.cat([dilated_label_masks(lab, 2) for lab in labels])
    ours = xrai_regions(attribution.amax(dim=0), masks)
    np.testing.assert_allclose(ours.numpy(), pair_map(np.zeros((40, 40, 3)), attribution, masks), rtol=1e-12)


def test_attributions_average_black_and_white_integrated_gradients(demo_model, demo_heldout_inputs):
    """Completeness per baseline, so the average sums to f(x) - (f(black) + f(white)) / 2."""
    x, t = demo_heldout_inputs[:2], torch.tensor([1, 2])
    mean, std = stats(DEMO_MEAN, DEMO_STD)
    attributions = ig_attributions(demo_model, x, t, mean, std, 64, FoldBudget(), None)
    with torch.no_grad():
        f = lambda v: demo_model(v).gather(1, t[:, None])[:, 0]  # noqa: E731
        expected = f(x) - (f(((0 - mean) / std).expand_as(x)) + f(((1 - mean) / std).expand_as(x))) / 2
    torch.testing.assert_close(attributions.flatten(1).sum(1), expected, rtol=0.02, atol=0.02)


def test_folded_equals_one_by_one(demo_model, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[2:5], demo_heldout.labels[2:5]
    folded = xrai(demo_model, x, t, mean=DEMO_MEAN, std=DEMO_STD, steps=6, scales=SCALES)
    alone = torch.cat([xrai(demo_model, x[i:i + 1], t[i:i + 1], mean=DEMO_MEAN, std=DEMO_STD, steps=6,
                            scales=SCALES) for i in range(3)])
    torch.testing.assert_close(folded, alone, rtol=1e-4, atol=1e-6)


def test_the_first_region_covers_the_demo_watermark(demo_model, demo_heldout_inputs, demo_heldout):
    """The label lives only in the planted patch: the highest-gain region overlaps it for most items."""
    x, t, boxes = demo_heldout_inputs[:6], demo_heldout.labels[:6], demo_heldout.boxes[:6]
    maps = xrai(demo_model, x, t, mean=DEMO_MEAN, std=DEMO_STD, steps=8, scales=SCALES)
    hits = 0
    for m, (top, left, bottom, right) in zip(maps, boxes.tolist()):
        first = m == m.max()
        hits += bool(first[top:bottom, left:right].float().mean() > 0.5)
    assert hits >= 5


# ---------------------------------------------------------------- progress, cancellation, errors

def test_progress_per_item_group_and_cancellation(demo_model, demo_heldout_inputs):
    x, t = demo_heldout_inputs[:3], torch.tensor([0, 1, 2])
    seen: list[float] = []
    # 8 rows per backward chunk, 2 x 4 IG rows per item: one item per group.
    xrai(demo_model, x, t, mean=DEMO_MEAN, std=DEMO_STD, steps=4, scales=(500.0,),
         budget=FoldBudget(max_rows=8), progress=seen.append)
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 1
    with pytest.raises(Cancelled, match="xrai cancelled"):
        xrai(demo_model, x, t, mean=DEMO_MEAN, std=DEMO_STD, steps=4, scales=(500.0,),
             budget=FoldBudget(max_rows=8), cancelled=cancelled)


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "xrai.steps"), (dict(scales=()), "xrai.segmentation_scales"),
    (dict(scales=(100.0, -1.0)), "xrai.segmentation_scales"),
    (dict(scales=(float("nan"),)), "xrai.segmentation_scales"),
    (dict(scales=(100.0,) * 17), "xrai.segmentation_scales"),
])
def test_bad_parameters_are_typed_errors(demo_model, demo_heldout_inputs, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        xrai(demo_model, demo_heldout_inputs[:1], torch.tensor([0]), mean=DEMO_MEAN, std=DEMO_STD, **kwargs)
    assert info.value.violations[0].field == field


def test_bad_targets_and_segments_are_typed_errors(demo_model, demo_heldout_inputs):
    with pytest.raises(InvalidArgument, match="target"):
        xrai(demo_model, demo_heldout_inputs[:1], torch.tensor([7]), mean=DEMO_MEAN, std=DEMO_STD, steps=2)
    with pytest.raises(InvalidArgument, match="segments"):
        xrai_regions(torch.zeros(8, 8), torch.zeros(2, 8, 9, dtype=torch.bool))


def test_rows_of_one_item_share_its_segments(demo_model, demo_heldout_inputs, monkeypatch):
    """Top-k repeats an item's row per target: it is segmented once, and each target gets its own map."""
    from workers.kernels import xrai as module
    calls = []
    real = module.segment_masks
    monkeypatch.setattr(module, "segment_masks", lambda image, scales: calls.append(1) or real(image, scales))
    x = demo_heldout_inputs[:2].repeat_interleave(2, dim=0)                 # item 0, item 0, item 1, item 1
    maps = xrai(demo_model, x, torch.tensor([0, 1, 2, 3]), mean=DEMO_MEAN, std=DEMO_STD, steps=4, scales=SCALES)
    assert len(calls) == 2 and not torch.equal(maps[0], maps[1])
