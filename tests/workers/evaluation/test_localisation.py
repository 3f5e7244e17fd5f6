"""Pointing game, top-k IoU and energy in box: exact small cases, and the demo watermark's known answer."""
from __future__ import annotations

import pytest
import torch

from workers.errors import InvalidArgument
from workers.evaluation.localisation import (boxes_to_masks, energy_in_box, ground_truth, localisation,
                                             pointing_game, topk_iou)


def test_boxes_to_masks_are_exclusive() -> None:
    masks = boxes_to_masks(torch.tensor([[1, 2, 3, 5]]), (6, 6))
    assert masks.sum() == 2 * 3
    assert masks[0, 1, 2] and masks[0, 2, 4] and not masks[0, 3, 2] and not masks[0, 1, 5]


def test_pointing_game_hits_misses_ties_and_tolerance() -> None:
    maps = torch.zeros(3, 8, 8)
    maps[0, 2, 2] = 1.0  # inside
    maps[1, 7, 7] = 1.0  # outside
    maps[2, 2, 3] = maps[2, 7, 0] = 1.0  # a tie, one peak inside
    truth = ground_truth(maps, boxes=torch.tensor([[1, 1, 4, 4]] * 3))
    assert pointing_game(maps, truth).tolist() == [1.0, 0.0, 1.0]
    near = torch.zeros(1, 8, 8)
    near[0, 4, 4] = 1.0  # one px diagonal from the box (rows and columns 1..3)
    assert pointing_game(near, truth[:1]).item() == 0.0
    assert pointing_game(near, truth[:1], tolerance=1).item() == 1.0


def test_topk_iou_and_energy() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, :2, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    maps[0, 3, 3] = -5.0  # negative: no energy
    truth = ground_truth(maps, boxes=torch.tensor([[0, 0, 2, 2]]))
    assert topk_iou(maps, truth).item() == 1.0  # as many top pixels as the box has
    assert topk_iou(maps, truth, fraction=2 / 16).item() == pytest.approx(2 / 4)
    assert energy_in_box(maps, truth).item() == 1.0
    maps[0, 3, 0] = 10.0
    assert energy_in_box(maps, truth).item() == pytest.approx(10 / 20)
    assert energy_in_box(torch.zeros(1, 4, 4), truth).isnan().item()


def test_ground_truth_needs_exactly_one_source() -> None:
    maps = torch.zeros(1, 4, 4)
    with pytest.raises(InvalidArgument):
        ground_truth(maps)
    with pytest.raises(InvalidArgument):
        ground_truth(maps, boxes=torch.zeros(1, 4), masks=torch.zeros(1, 4, 4))
    with pytest.raises(InvalidArgument):
        ground_truth(maps, masks=torch.zeros(1, 3, 3))
    result = localisation(maps + torch.eye(4), masks=torch.eye(4).bool().unsqueeze(0))
    assert result.pointing_game.values.tolist() == [1.0]
    assert result.area.values.tolist() == [4 / 16]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grad_cam", "integrated_gradients"])
def test_demo_methods_point_at_the_watermark(method: str, demo_model, demo_heldout, demo_heldout_inputs,
                                             served_methods, one_intra_op_thread) -> None:
    """Known answer: the demo's boxes are its 12 px watermark patches (3.5% of a 64 px image), where the label is."""
    maps = served_methods[method](demo_model, demo_heldout_inputs, demo_heldout.labels)
    result = localisation(maps, boxes=demo_heldout.boxes)
    assert result.pointing_game.aggregate.mean >= 0.95
    assert result.pointing_game.aggregate.n == len(demo_heldout)
    chance = result.area.aggregate.mean
    assert chance == pytest.approx(144 / 4096)
    assert result.energy_in_box.aggregate.ci_low > 10 * chance
    assert result.iou.aggregate.ci_low > 10 * chance
