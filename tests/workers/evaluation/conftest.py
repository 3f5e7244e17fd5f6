"""Fixtures of the evaluation tests: the demo model's held-out slice, its maps, and the unfaithful reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.demo import DEMO_CAM_LAYER
from workers.evaluation import cam_attribute, gradient_attribute

# Items of the held-out set the costlier checks run on (all 200 for localisation).
SLICE = 48


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch thread: on a shared 2-core host OpenMP's spinning workers slow every op; results do not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def edge_detector(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """The deliberately unfaithful reference: Sobel edge magnitude of the grey input `# (N, H, W)`.

    It ignores the model and the target entirely, yet on the demo images it looks plausible (the
    high-contrast watermark has the strongest edges). Defined here only; never served.
    """
    grey = inputs.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=inputs.dtype).view(1, 1, 3, 3)
    gx = F.conv2d(grey, sobel, padding=1)
    gy = F.conv2d(grey, sobel.transpose(2, 3), padding=1)
    return (gx**2 + gy**2).sqrt()[:, 0]


@pytest.fixture(scope="module")
def served_methods() -> dict:
    """The served methods as `Attribute` callables (through the service's kernels)."""
    return {
        "grad_cam": cam_attribute(DEMO_CAM_LAYER),
        "integrated_gradients": gradient_attribute("integrated_gradients", steps=16),
        "vanilla": gradient_attribute("vanilla"),
    }


@pytest.fixture(scope="module")
def heldout_slice(demo_heldout, demo_heldout_inputs):
    """The first SLICE held-out items: inputs (model space), labels, boxes."""
    return demo_heldout_inputs[:SLICE], demo_heldout.labels[:SLICE], demo_heldout.boxes[:SLICE]
