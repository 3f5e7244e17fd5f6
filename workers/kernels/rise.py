"""RISE (Petsiuk et al. 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
Models", arXiv:1806.07421): saliency as the score-weighted average of random masks.

Masks, as section 3.2 of the paper builds them: M binary grids of `grid` x `grid` cells, each
cell kept with probability p; each grid is upsampled bilinearly to (grid + 1) * (cell_h, cell_w)
pixels, cell = ceil(size / grid), and an H x W window is cut from it at a random shift of
[0, cell) pixels per axis, so the soft mask edges fall anywhere, not on a fixed lattice. The
grids and shifts come from a CPU generator seeded with the request seed, so the same seed gives
the same masks on every device, for every item and whatever the items are folded with.

Saliency of target class c for image I:  S_c = 1 / (M * p) * sum_i P_c(I * M_i) * M_i,
P_c the softmax probability of c. The masked copies are `I * M_i` in the inputs' own (model)
space, as the paper's implementation masks the preprocessed image.

Batching: every (mask, item) pair is one row of an inference forward; rows go mask-major (all
items of mask 0, then of mask 1, ...) so a chunk renders each of its masks once whatever the
number of items, and are run in chunks of the measured forward-only chunk size
(`workers.evaluation.perturbation.forward_rows`). One forward scores every target of an item:
top-k costs the same forwards as one class. Progress after every chunk, `cancelled()` before each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.batching import FoldBudget, iter_chunks
from workers.errors import InvalidArgument
from workers.evaluation.perturbation import forward_rows
from workers.kernels.cam import check_batch, check_targets
from workers.kernels.perturbation import IsCancelled, Progress, _Steps

MAX_MASKS = 16384
MIN_GRID, MAX_GRID = 2, 64


@dataclass(frozen=True)
class RiseMasks:
    """M random masks, stored as their coarse grids and shifts; `render` makes the pixels.

    grids: `# (M, s, s)` float32 of 0/1 (1 = the cell is kept); shifts: `# (M, 2)` int64, the
    (row, column) offset of the H x W window in the upsampled grid; size: (H, W).
    """

    grids: Tensor
    shifts: Tensor
    size: tuple[int, int]
    keep_probability: float

    @property
    def count(self) -> int:
        return int(self.grids.shape[0])

    @property
    def cell(self) -> tuple[int, int]:
        s = self.grids.shape[-1]
        return math.ceil(self.size[0] / s), math.ceil(self.size[1] / s)

    def render(self, index: slice, device: torch.device | str = "cpu") -> Tensor:
        """Masks `index` as pixels `# (B, H, W)` float32 in [0, 1], on `device`."""
        grids = self.grids[index].to(device)                                # (B, s, s)
        shifts = self.shifts[index]                                         # (B, 2), CPU
        s = grids.shape[-1]
        (ch, cw), (height, width) = self.cell, self.size
        up = F.interpolate(grids[:, None], size=((s + 1) * ch, (s + 1) * cw), mode="bilinear",
                           align_corners=False)[:, 0]                      # (B, (s+1)ch, (s+1)cw)
        # One slice per mask: on a CPU, 3x cheaper than one gather with index tensors.
        return torch.stack([up[i, dy:dy + height, dx:dx + width]
                            for i, (dy, dx) in enumerate(shifts.tolist())])  # (B, H, W)


def rise_masks(masks: int, grid: int, keep_probability: float, size: tuple[int, int], seed: int) -> RiseMasks:
    """The request's masks: grids with cells kept with probability p, and window shifts, seeded."""
    check_rise_params(masks, grid, keep_probability)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64:
        raise InvalidArgument.field("seed", f"must be an integer in [0, 2^64), got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grids = (torch.rand((masks, grid, grid), generator=generator) < keep_probability).float()
    ch, cw = math.ceil(size[0] / grid), math.ceil(size[1] / grid)
    shifts = torch.stack([torch.randint(0, ch, (masks,), generator=generator),
                          torch.randint(0, cw, (masks,), generator=generator)], dim=1)  # (M, 2)
    return RiseMasks(grids, shifts, (int(size[0]), int(size[1])), float(keep_probability))


def check_rise_params(masks: int, grid: int, keep_probability: float) -> None:
    """Typed errors naming the RiseParams field out of its range."""
    if isinstance(masks, bool) or not isinstance(masks, int) or not 1 <= masks <= MAX_MASKS:
        raise InvalidArgument.field("rise.masks", f"must be an integer in [1, {MAX_MASKS}], got {masks!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or not MIN_GRID <= grid <= MAX_GRID:
        raise InvalidArgument.field("rise.grid", f"must be an integer in [{MIN_GRID}, {MAX_GRID}], got {grid!r}")
    if isinstance(keep_probability, bool) or not isinstance(keep_probability, (int, float)) \
            or not 0.0 < keep_probability < 1.0:
        raise InvalidArgument.field("rise.keep_probability", f"must lie strictly between 0 and 1, got "
                                                             f"{keep_probability!r}")


def rise(model: nn.Module, inputs: Tensor, targets: Tensor, *, masks: int = 4000, grid: int = 7,
         keep_probability: float = 0.5, seed: int = 0, budget: FoldBudget = FoldBudget(),
         progress: Progress = None, cancelled: IsCancelled = None) -> Tensor:
    """RISE maps `# (N, H, W)` for targets `# (N,)`, or `# (N, K, H, W)` for targets `# (N, K)`
    (K classes per item, all scored by the same forwards). float32, on the inputs' device."""
    per_item = isinstance(targets, Tensor) and targets.dim() == 2
    check_batch(inputs, None if per_item else targets)
    if per_item and (targets.shape[0] != inputs.shape[0] or targets.shape[1] == 0 or targets.dtype != torch.int64):
        raise InvalidArgument.field("target", f"must be int64 shaped ({inputs.shape[0]},) or ({inputs.shape[0]}, K)")
    plan = rise_masks(masks, grid, keep_probability, tuple(inputs.shape[-2:]), seed)
    t = (targets if per_item else targets[:, None]).to(inputs.device)     # (N, K)
    maps = _accumulate(model, inputs, t, plan, forward_rows(model, tuple(inputs.shape[1:]), budget,
                                                            device=inputs.device, dtype=inputs.dtype),
                       _Steps("rise", masks * inputs.shape[0], progress, cancelled))
    return maps if per_item else maps[:, 0]


def _accumulate(model: nn.Module, inputs: Tensor, targets: Tensor, plan: RiseMasks, rows: int,
                steps: _Steps) -> Tensor:
    """sum_i P_t(x * M_i) * M_i / (M * p) for every item and target `# (N, K, H, W)`."""
    n, k = targets.shape
    height, width = inputs.shape[-2:]
    device = inputs.device
    total = torch.zeros((n * k, height * width), dtype=torch.float32, device=device)  # (N*K, H*W)
    with torch.inference_mode():
        for chunk in iter_chunks(plan.count * n, rows):
            steps.check()
            first, last = chunk.start // n, (chunk.stop - 1) // n          # masks this chunk touches
            pixels = plan.render(slice(first, last + 1), device)            # (U, H, W)
            u = pixels.shape[0]
            # Rows are mask-major, so the chunk is a contiguous run of the (U, N) products: made by
            # broadcasting (a gather of the items per row costs more than the forward on small nets),
            # at most N - 1 rows on either side made and dropped.
            offset, size = chunk.start - first * n, chunk.stop - chunk.start
            masked = (pixels[:, None, None].to(inputs.dtype) * inputs[None]).flatten(0, 1)  # (U*N, C, H, W)
            logits = model(masked[offset:offset + size])                    # (B, classes)
            item = torch.arange(chunk.start, chunk.stop, device=device) % n
            if chunk.start == 0:
                check_targets(targets, logits.shape[1])
            scores = torch.softmax(logits.float(), dim=1).gather(1, targets[item])  # (B, K)
            # Scores as a dense (U, N*K) matrix (zeros where a mask's row lies in another chunk),
            # so the weighted sum of masks is one matmul.
            dense = torch.zeros((u * n, k), dtype=torch.float32, device=device)
            dense[offset:offset + size] = scores
            total.addmm_(dense.view(u, n * k).T, pixels.view(u, -1).float())
            steps.advance(size)
    return (total / (plan.count * plan.keep_probability)).view(n, k, height, width)
