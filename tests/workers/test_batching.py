"""Memory budget for folded rows: measured row cost, chunk sizes, chunk slices."""
from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch import nn

from workers import batching
from workers.batching import (FoldBudget, auto_budget_bytes, estimate_row_bytes, iter_chunks,
                              probe_model, rows_per_chunk)
from workers.errors import InvalidArgument

ROW = (3, 8, 8)
# Leaf outputs of TinyNet on one (3, 8, 8) float32 row, by hand:
# conv 4*8*8*4 + relu 4*8*8*4 + flatten 256*4 + linear 10*4 bytes.
FORWARD_BYTES = 1024 + 1024 + 1024 + 40


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.flatten = nn.Flatten()
        self.head = nn.Linear(256, 10)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.head(self.flatten(self.features(x)))


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("must not run")


@pytest.fixture
def tiny():
    return TinyNet().eval().requires_grad_(False)


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_row_bytes_sum_leaf_outputs(tiny):
    assert estimate_row_bytes(tiny, ROW, torch.float32, "cpu", backward=False) == FORWARD_BYTES
    backward = estimate_row_bytes(tiny, ROW, torch.float32, "cpu", backward=True)
    assert backward == int(FORWARD_BYTES * batching.BACKWARD_FACTOR) > FORWARD_BYTES
    double = TinyNet().double()
    assert estimate_row_bytes(double, ROW, torch.float64, "cpu", backward=False) == 2 * FORWARD_BYTES


def test_probe_is_cached_per_shape_and_leaves_no_hooks(tiny):
    for _ in range(3):
        estimate_row_bytes(tiny, ROW, torch.float32, "cpu")
    assert tiny.forwards == 1
    assert probe_model(tiny, ROW, torch.float32, "cpu").output_shape == (10,)
    with pytest.raises(RuntimeError):  # another shape is probed anew (and does not fit the head)
        estimate_row_bytes(tiny, (3, 4, 4), torch.float32, "cpu")
    assert tiny.forwards == 2
    assert hooks_left(tiny) == 0


def test_a_torchscript_model_is_probed_by_what_autograd_saves():
    """A ScriptModule refuses forward hooks: its row costs the tensors its forward saves for the backward."""
    import warnings

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; TorchScript files still exist
        scripted = torch.jit.script(net)
    probe = probe_model(scripted, (3, 8, 8), torch.float32, "cpu")
    # At least the conv's input and output and the linear's input, each saved for the backward.
    assert probe.output_shape == (2,) and probe.activation_bytes >= (3 + 4 + 4) * 8 * 8 * 4
    assert probe.activation_bytes < 20 * (3 + 4 + 4) * 8 * 8 * 4


def test_probe_leaves_no_hooks_when_the_forward_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Exploding())
    with pytest.raises(RuntimeError):
        probe_model(model, ROW, torch.float32, "cpu")
    assert hooks_left(model) == 0


def test_probe_cache_is_weak_on_the_model():
    gc.collect()
    model = TinyNet()
    probe_model(model, ROW, torch.float32, "cpu")
    assert model in batching._PROBES
    size = len(batching._PROBES)
    del model
    gc.collect()
    assert len(batching._PROBES) == size - 1


def test_probe_ignores_other_threads_forwards(tiny):
    # A batch running concurrently on the same model must not be counted.
    started, release = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def forward(self, x):
            if threading.current_thread() is not threading.main_thread():
                started.set()
                release.wait(5)
            return x

    model = nn.Sequential(Slow(), nn.Flatten())
    worker = threading.Thread(target=lambda: model(torch.zeros(64, *ROW)))
    worker.start()
    started.wait(5)
    try:
        probe = probe_model(model, ROW, torch.float32, "cpu")
    finally:
        release.set()
        worker.join()
    assert probe.activation_bytes == 2 * 3 * 8 * 8 * 4  # Slow's and Flatten's outputs, one row


def test_explicit_bytes_give_rows(tiny):
    per_row = estimate_row_bytes(tiny, ROW, torch.float32, "cpu")
    assert rows_per_chunk(tiny, ROW, FoldBudget(max_bytes=per_row * 5 + 1), device="cpu") == 5
    assert rows_per_chunk(tiny, ROW, FoldBudget(max_bytes=1), device="cpu") == 1  # never below one row
    capped = FoldBudget(max_bytes=per_row * 50, max_rows=7)
    assert rows_per_chunk(tiny, ROW, capped, device="cpu") == 7
    forward_only = rows_per_chunk(tiny, ROW, FoldBudget(max_bytes=per_row * 5), device="cpu", backward=False)
    assert forward_only > 5


def test_explicit_rows_need_no_measuring():
    assert rows_per_chunk(Exploding(), ROW, FoldBudget(max_rows=7), device="cpu") == 7


def test_auto_budget_is_sane(tiny):
    budget = auto_budget_bytes("cpu")
    assert 0 < budget <= batching.CPU_BUDGET_CAP_BYTES
    assert budget <= batching._host_ram_bytes()
    rows = rows_per_chunk(tiny, ROW, FoldBudget(), device="cpu")
    assert rows == budget // estimate_row_bytes(tiny, ROW, torch.float32, "cpu")
    assert rows >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_budget_on_cuda_uses_free_memory():
    free, _ = torch.cuda.mem_get_info()
    assert 0 < auto_budget_bytes("cuda") <= free + torch.cuda.memory_reserved()


@pytest.mark.parametrize("kwargs", [
    {"max_bytes": 0}, {"max_bytes": -1}, {"max_rows": 0}, {"max_rows": -3},
    {"max_rows": 1.5}, {"max_bytes": True}, {"max_bytes": "1GB"},
])
def test_invalid_budget_raises(kwargs):
    with pytest.raises(InvalidArgument) as info:
        FoldBudget(**kwargs)
    assert info.value.violations[0].field == f"budget.{next(iter(kwargs))}"


def test_iter_chunks_cover_the_range():
    assert list(iter_chunks(10, 3)) == [slice(0, 2), slice(2, 5), slice(5, 7), slice(7, 10)]
    assert list(iter_chunks(128, 70)) == [slice(0, 64), slice(64, 128)]
    assert list(iter_chunks(130, 64)) == [slice(0, 43), slice(43, 86), slice(86, 130)]
    for total in range(1, 40):
        for size in range(1, 12):
            lengths = [s.stop - s.start for s in iter_chunks(total, size)]
            assert sum(lengths) == total and max(lengths) <= size and len(lengths) == -(-total // size)
            assert max(lengths) - min(lengths) <= 1
    assert list(iter_chunks(4, 10)) == [slice(0, 4)]
    assert list(iter_chunks(0, 3)) == []
    with pytest.raises(InvalidArgument):
        list(iter_chunks(5, 0))
