"""RISE: the masks against the paper's construction, the saliency against a direct loop over the
masks, folding and chunking, the demo model's known answer, progress, cancellation, typed errors.

There is no packaged RISE to agree with; the reference here is the paper's formula written
out one mask at a time, S = 1 / (M p) * sum_i P_t(x * M_i) * M_i, over the kernel's own masks,
and the masks themselves are checked against an independent construction (scikit-image's
bilinear resize of each grid, then the shifted crop).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.transform import resize

from tests.workers.kernels.test_cam import pointing_game, resnet18_model, resnet_batch
from workers.batching import FoldBudget
from workers.errors import Cancelled, InvalidArgument
from workers.kernels.rise import rise, rise_masks

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


def loop_reference(model, x, t, masks: int, grid: int, p: float, seed: int) -> torch.Tensor:
    """The paper's sum, one image and one mask per forward `# (N, H, W)`."""
    plan = rise_masks(masks, grid, p, tuple(x.shape[-2:]), seed)
    out = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.float64)
    with torch.no_grad():
        for n in range(x.shape[0]):
            for i in range(masks):
                m = plan.render(slice(i, i + 1))[0]                          # (H, W)
                score = torch.softmax(model((x[n] * m)[None]), dim=1)[0, t[n]]
                out[n] += float(score) * m.double()
    return (out / (masks * p)).float()


# ---------------------------------------------------------------- masks

def test_masks_are_the_papers_upsampled_shifted_grids():
    size, grid, p = (40, 52), 5, 0.4
    plan = rise_masks(64, grid, p, size, seed=3)
    ch, cw = math.ceil(size[0] / grid), math.ceil(size[1] / grid)
    assert plan.cell == (ch, cw)
    assert set(plan.grids.unique().tolist()) <= {0.0, 1.0}
    assert int(plan.shifts[:, 0].max()) < ch and int(plan.shifts[:, 1].max()) < cw and int(plan.shifts.min()) >= 0
    pixels = plan.render(slice(0, 64))                                      # (64, H, W)
    assert pixels.shape == (64, *size) and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0 + 1e-6
    for i in range(0, 64, 9):
        # Bilinear with half-pixel centres and clamped edges is skimage's order=1 with mode="edge".
        up = resize(plan.grids[i].double().numpy(), ((grid + 1) * ch, (grid + 1) * cw), order=1, mode="edge",
                    anti_aliasing=False)
        dy, dx = plan.shifts[i].tolist()
        np.testing.assert_allclose(pixels[i].numpy(), up[dy:dy + size[0], dx:dx + size[1]], atol=1e-6)


def test_masks_keep_cells_with_probability_p_and_follow_the_seed():
    plan = rise_masks(4000, 7, 0.3, (32, 32), seed=11)
    assert abs(float(plan.grids.mean()) - 0.3) < 0.01
    assert abs(float(plan.render(slice(0, 4000)).mean()) - 0.3) < 0.01     # E[M] = p, what S divides by
    again = rise_masks(4000, 7, 0.3, (32, 32), seed=11)
    assert torch.equal(plan.grids, again.grids) and torch.equal(plan.shifts, again.shifts)
    assert not torch.equal(plan.grids, rise_masks(4000, 7, 0.3, (32, 32), seed=12).grids)


# ---------------------------------------------------------------- agreement

def test_rise_matches_the_loop_over_masks_on_the_demo_model(demo_model, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:2], demo_heldout.labels[:2]
    ours = rise(demo_model, x, t, masks=40, grid=6, keep_probability=0.5, seed=4,
                budget=FoldBudget(max_rows=16))
    torch.testing.assert_close(ours, loop_reference(demo_model, x, t, 40, 6, 0.5, 4), rtol=1e-4, atol=1e-6)


def test_rise_matches_the_loop_over_masks_on_resnet18():
    model = resnet18_model()
    x, t = resnet_batch(n=2, size=64)
    ours = rise(model, x, t, masks=24, grid=4, keep_probability=0.3, seed=9, budget=FoldBudget(max_rows=10))
    torch.testing.assert_close(ours, loop_reference(model, x, t, 24, 4, 0.3, 9), rtol=1e-4, atol=1e-6)


def test_several_targets_share_the_forwards_and_match_one_target_at_a_time(demo_model, demo_heldout_inputs):
    x = demo_heldout_inputs[:3]
    targets = torch.tensor([[0, 2], [1, 3], [2, 0]])
    both = rise(demo_model, x, targets, masks=30, grid=5, seed=1)            # (3, 2, H, W)
    assert both.shape == (3, 2, 64, 64)
    for k in range(2):
        torch.testing.assert_close(both[:, k], rise(demo_model, x, targets[:, k], masks=30, grid=5, seed=1),
                                   rtol=1e-5, atol=1e-7)


def test_folded_equals_one_by_one_and_chunking_does_not_matter(demo_model, demo_heldout_inputs, demo_heldout):
    x, t = demo_heldout_inputs[:3], demo_heldout.labels[:3]
    folded = rise(demo_model, x, t, masks=50, grid=7, seed=2, budget=FoldBudget(max_rows=37))
    alone = torch.cat([rise(demo_model, x[i:i + 1], t[i:i + 1], masks=50, grid=7, seed=2,
                            budget=FoldBudget(max_rows=37)) for i in range(3)])
    torch.testing.assert_close(folded, alone, rtol=1e-4, atol=1e-6)
    one_chunk = rise(demo_model, x, t, masks=50, grid=7, seed=2, budget=FoldBudget(max_rows=150))
    torch.testing.assert_close(folded, one_chunk, rtol=1e-4, atol=1e-6)


def test_rise_points_at_the_demo_watermark(demo_model, demo_heldout_inputs, demo_heldout):
    """The demo's label lives only in the planted patch: RISE's maximum falls on it for most items."""
    x, t, boxes = demo_heldout_inputs[:10], demo_heldout.labels[:10], demo_heldout.boxes[:10]
    maps = rise(demo_model, x, t, masks=300, grid=8, seed=0)
    assert pointing_game(maps, boxes) >= 0.75
    other_items = maps.roll(1, dims=0)                                       # each item given another's map
    assert pointing_game(other_items, boxes) < 0.5                           # not any map would do


# ---------------------------------------------------------------- progress, cancellation, errors

def test_progress_rises_to_one_and_cancel_stops_between_chunks(demo_model, demo_heldout_inputs):
    x, t = demo_heldout_inputs[:2], torch.tensor([0, 1])
    seen: list[float] = []
    rise(demo_model, x, t, masks=20, grid=4, budget=FoldBudget(max_rows=8), progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 5      # 40 rows in chunks of 8
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 2
    with pytest.raises(Cancelled, match="rise cancelled after 16 of 40"):
        rise(demo_model, x, t, masks=20, grid=4, budget=FoldBudget(max_rows=8), cancelled=cancelled)


@pytest.mark.parametrize("kwargs, field", [
    (dict(masks=0), "rise.masks"), (dict(masks=16385), "rise.masks"), (dict(grid=1), "rise.grid"),
    (dict(grid=65), "rise.grid"), (dict(keep_probability=0.0), "rise.keep_probability"),
    (dict(keep_probability=1.0), "rise.keep_probability"), (dict(seed=-1), "seed"),
])
def test_bad_parameters_are_typed_errors(demo_model, demo_heldout_inputs, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        rise(demo_model, demo_heldout_inputs[:1], torch.tensor([0]), **kwargs)
    assert info.value.violations[0].field == field


def test_bad_targets_are_typed_errors(demo_model, demo_heldout_inputs):
    x = demo_heldout_inputs[:2]
    with pytest.raises(InvalidArgument, match=r"\[0, 4\)"):
        rise(demo_model, x, torch.tensor([0, 9]), masks=4, grid=2)
    with pytest.raises(InvalidArgument, match="target"):
        rise(demo_model, x, torch.tensor([[0, 1]]), masks=4, grid=2)
