"""RISE and XRAI rows of the CAM and perturbation bench (loadtests/bench_cam.py), each against the floor
of the rows it runs, timed interleaved after a warm-up (`kernel_bench.measure`):

    rise   ours: rise() over N items x `--cam-rise-masks` masks; floor: plain inference forwards over
           the same N*M rows in the same chunks (target ratio <= 1.10: rendering the masks and summing
           them must stay small beside the forwards).
    xrai   ours: xrai() with `--cam-xrai-steps` IG steps per baseline; floor: one forward +
           backward-to-input over the same 2*steps*N IG rows in the same chunks. No target: the
           Felzenszwalb segmentation (CPU, per item) comes on top; `ig_seconds` is our IG alone
           (its ratio to the floor is the fold's overhead) and `regions_seconds` the rest.

There is no packaged peer for either (PAIR's XRAI agrees with ours given the same attributions and
segments, tests/workers/kernels/test_xrai.py), so the peer columns are empty.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from loadtests.kernel_bench import measure, paired_ratio
from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.kernels.rise import rise
from workers.kernels.xrai import ig_attributions, xrai

TARGET_RISE = 1.10
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _row(method: str, times: dict[str, list[float]], target: float | None, **extra) -> dict:
    row = {"method": method, "seconds": statistics.median(times["ours"]),
           "floor_seconds": statistics.median(times["floor"]),
           "ratio_to_floor": paired_ratio(times["ours"], times["floor"]), "target_ratio_to_floor": target,
           "peer_seconds": None, "ratio_to_peer": None, "peer": "-", **extra}
    row["meets_target"] = None if target is None else row["ratio_to_floor"] <= target
    return row


def _forward_floor(model: nn.Module, x: torch.Tensor, total_rows: int) -> tuple[Callable[[], object], int]:
    """Inference forwards over `total_rows` rows in the chunks RISE uses (the forward-only cap)."""
    rows = rows_per_chunk(model, tuple(x.shape[1:]), FoldBudget(), device=x.device, dtype=x.dtype, backward=False)
    block = x[:1].expand(min(rows, total_rows), *x.shape[1:]).contiguous()

    def run() -> None:
        with torch.inference_mode():
            for chunk in iter_chunks(total_rows, rows):
                model(block[:chunk.stop - chunk.start])
    return run, rows


def _backward_floor(model: nn.Module, x: torch.Tensor, t: torch.Tensor, total_rows: int
                    ) -> tuple[Callable[[], object], int]:
    """Forward + backward-to-input over `total_rows` rows in the chunks the IG fold uses."""
    rows = rows_per_chunk(model, tuple(x.shape[1:]), FoldBudget(), device=x.device, dtype=x.dtype)
    block = x[:1].expand(min(rows, total_rows), *x.shape[1:]).contiguous()
    target = t[:1].expand(rows)

    def run() -> None:
        for chunk in iter_chunks(total_rows, rows):
            n = chunk.stop - chunk.start
            leaf = block[:n].detach().requires_grad_(True)
            torch.autograd.grad(model(leaf).gather(1, target[:n, None]).sum(), leaf)
    return run, rows


def bench_rise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, masks: int, repeats: int) -> dict:
    total = x.shape[0] * masks
    floor, chunk = _forward_floor(model, x, total)
    ours = lambda: rise(model, x, t, masks=masks, grid=7)  # noqa: E731
    times = measure({"ours": ours, "floor": floor}, repeats, x.device)
    return _row("rise", times, TARGET_RISE, rows=total, chunk_rows=chunk)


def bench_xrai(model: nn.Module, x: torch.Tensor, t: torch.Tensor, steps: int, repeats: int) -> dict:
    total = x.shape[0] * 2 * steps
    floor, chunk = _backward_floor(model, x, t, total)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, -1, 1, 1)
    ours = lambda: xrai(model, x, t, mean=IMAGENET_MEAN, std=IMAGENET_STD, steps=steps)  # noqa: E731
    ig = lambda: ig_attributions(model, x, t, mean, std, steps, FoldBudget(), None)  # noqa: E731
    times = measure({"ours": ours, "floor": floor, "ig": ig}, repeats, x.device)
    ig_s = statistics.median(times["ig"])
    return _row("xrai", times, None, rows=total, chunk_rows=chunk, ig_seconds=ig_s,
                ig_ratio_to_floor=paired_ratio(times["ig"], times["floor"]),
                regions_seconds=statistics.median(times["ours"]) - ig_s)
