"""Chunk size from a measured cost curve: how many rows one forward+backward should carry on this device.

The memory budget (workers/batching.py) says how many rows a chunk *may* carry; it does not say how many
pay. Time per row falls as chunks grow (fewer, larger kernels) until the device is busy, then stays flat
or rises again (caches overflow, the allocator churns); past that point a larger fold costs more per row
than a smaller one. The curve is measured once per model, row shape, dtype and device: forward plus
backward-to-input at doubling chunk sizes up to the memory cap, each size timed twice (the faster one
counts), stopping once two sizes in a row are clearly slower per row than the best (by more than
`TOLERANCE`) or the probe's time budget is spent. The chunk size is then the largest probed size within
`TOLERANCE` of the best time per row: on a flat curve that is the memory cap, as before measuring; where
the curve rises (a GPU past its caches, an allocator that churns), the chunk stops before it rises.

Why the largest and not the smallest of the near-best sizes: on the 2-core CPU the isolated probe saw
ResNet-18's time per row flat within a few percent from 16 to 70 rows, yet a real fold of 256 rows ran
9 % slower in chunks of 16 than in chunks of 70 (docs/benchmarks.md): what a chunk costs besides its
forward and backward (the fold's bookkeeping, the allocator) is not in the probe, and it favours fewer,
larger chunks. `TOLERANCE` is wide enough that the probe's noise on a shared machine does not cut a chunk.

Replicas probe at start, before they serve (`warm`), so a probe never competes with a batch.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

TOLERANCE = 0.10          # sizes within 10 % of the best time per row count as the best
FIRST_SIZE = 4
PROBE_BUDGET_S = 5.0      # at most this long per curve (the last size started is finished)

# model -> {(row shape, dtype, device, backward): ChunkCurve}; weak on the model, like batching's probes.
_CURVES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ChunkCurve:
    """What was measured: seconds per row at each probed size, and the size chosen."""

    per_row_s: dict[int, float]
    rows: int
    cap: int


# timing(model, rows) -> seconds for one forward+backward of `rows` rows
Timing = Callable[[nn.Module, int], float]


def measure_curve(model: nn.Module, cap: int, timing: Timing, budget_s: float = PROBE_BUDGET_S,
                  clock: Callable[[], float] = time.perf_counter) -> ChunkCurve:
    """Probes doubling sizes from FIRST_SIZE up to `cap` (and `cap` itself) with `timing`."""
    cap = max(1, int(cap))
    sizes, size = [], min(FIRST_SIZE, cap)
    while size < cap:
        sizes.append(size)
        size *= 2
    sizes.append(cap)
    started = clock()
    per_row: dict[int, float] = {}
    best, misses = float("inf"), 0
    for size in sizes:
        seconds = min(timing(model, size), timing(model, size))
        per_row[size] = seconds / size
        best = min(best, per_row[size])
        misses = misses + 1 if per_row[size] > best * (1 + TOLERANCE) else 0
        if misses >= 2 or clock() - started > budget_s:
            break
    chosen = max(s for s, t in per_row.items() if t <= best * (1 + TOLERANCE))
    return ChunkCurve(per_row, chosen, cap)


def forward_backward_timing(row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Timing:
    """Seconds for one forward and backward-to-input of `rows` random rows, as the gradient kernels run it."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def timing(model: nn.Module, rows: int) -> float:
        x = torch.rand((rows, *row_shape), generator=generator).to(device=device, dtype=dtype)
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            _sync(device)
            started = time.perf_counter()
            logits = model(leaf)
            (grad,) = torch.autograd.grad(logits[:, 0].sum(), leaf)
            _sync(device)
            elapsed = time.perf_counter() - started
        del grad, logits, leaf
        return elapsed

    return timing


def forward_timing(row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Timing:
    """Seconds for one inference forward of `rows` random rows (folds without a backward pass)."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def timing(model: nn.Module, rows: int) -> float:
        x = torch.rand((rows, *row_shape), generator=generator).to(device=device, dtype=dtype)
        with torch.inference_mode():
            _sync(device)
            started = time.perf_counter()
            model(x)
            _sync(device)
            return time.perf_counter() - started

    return timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_rows(model: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                  cap: int, budget_s: float = PROBE_BUDGET_S, backward: bool = True) -> int:
    """The measured chunk size for this model and row (probed on first use, cached), at most `cap`;
    `backward=False` measures inference forwards alone."""
    device = torch.device(device)
    key = (tuple(int(s) for s in row_shape), dtype, device, backward)
    with _LOCK:  # one probe per model and row at a time; concurrent first calls wait for it
        per_model = _CURVES.setdefault(model, {})
        curve = per_model.get(key)
        if curve is None or (curve.cap < cap and curve.rows == curve.cap):
            # Not probed yet, or probed under a smaller cap that it hit: the best may lie above.
            timing = forward_backward_timing if backward else forward_timing
            curve = measure_curve(model, cap, timing(key[0], dtype, device), budget_s)
            per_model[key] = curve
            log.info("chunk curve for %s rows %s on %s: %d rows per chunk (of a cap of %d); seconds per row %s",
                     type(model).__name__, key[0], device, curve.rows, cap,
                     {k: round(v, 6) for k, v in curve.per_row_s.items()})
    return min(curve.rows, cap)


def curve_for(model: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device | str, backward: bool = True) -> ChunkCurve | None:
    """The cached curve, if one was measured (operators and tests)."""
    with _LOCK:
        key = (tuple(int(s) for s in row_shape), dtype, torch.device(device), backward)
        return _CURVES.get(model, {}).get(key)
