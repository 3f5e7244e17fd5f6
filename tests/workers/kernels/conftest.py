"""Fixtures shared by the kernel tests."""
from __future__ import annotations

import pytest
import torch

from workers.demo import DEMO_CAM_LAYERS
from workers.kernels.hooks import LayerTaps


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch thread: on a shared 2-core host, OpenMP's spinning workers make every
    op 10-20x slower when other processes hold the cores; results do not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_taps(demo_model):
    """Taps on the demo model's CAM layers, closed after the module."""
    taps = LayerTaps(demo_model, DEMO_CAM_LAYERS, model_name="demo")
    yield taps
    taps.close()
