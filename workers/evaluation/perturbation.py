"""Deletion and insertion curves (Petsiuk et al. 2018, "RISE: Randomized Input Sampling for
Explanation of Black-box Models", section 4.1), folded into the batch dimension.

Definitions. A map orders the input's units (pixels, or `patch` x `patch` squares scored by the
mean of the map over them) from most to least salient. At step k of `steps`, the first
round(k / steps * U) of the U units are
    deletion:  replaced by the baseline, starting from the input     x_k = where(m_k, b, x)
    insertion: copied from the input, starting from the baseline     x_k = where(m_k, x, b)
and the curve is the target class's softmax probability p_t(x_k), k = 0..steps. The score is the
area under that curve over the fraction of units changed (trapezoid rule on [0, 1]): low for
deletion (the probability collapses once the first units go) and high for insertion (it rises
once the first units come) mean the map ranks the units the model relies on first.

Against chance. Each curve is also run with a RANDOM order of the same units (seeded, one per
item, shared by every method), and the gain over it is reported, signed so that positive is
better than chance for both modes:
    deletion:  gain = AUC_random - AUC_method,   ratio = AUC_random / AUC_method
    insertion: gain = AUC_method - AUC_random,   ratio = AUC_method / AUC_random
"better than chance by X" is the mean gain X (in probability x fraction units) with its bootstrap
interval; an interval that contains 0 means no better than a random order on these items.

Baselines (what "removed" means), all in the inputs' own (model) space:
    zero: zeros (for normalized inputs, the normalization mean colour);
    blur: a Gaussian blur of the input (`blur_sigma` px; RISE's insertion start);
    mean: each item's per-channel mean.
Ties in a map (e.g. the zeros of a ReLU'd CAM) are broken in a seeded random order, never in
raster order, which would bias the curve towards the image's top rows.

Batching. Every (item, order, step) is one row: the rows of all items, all methods and the random
order are generated chunk by chunk (a chunk never holds more than `rows_per_chunk` rows of the
model under `budget`, forward only) and run through one inference forward each. With
`budget.measure`, the chunk is the largest size within 10 % of the best time per row below that cap,
from a forward-only cost curve measured once per model and row shape (workers/chunk_curve.py): on a
CPU a small net runs several times faster per row in chunks of tens of rows than in one huge chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.chunk_curve import measured_rows
from workers.errors import InvalidArgument
from workers.evaluation.aggregate import MetricResult, metric
from workers.kernels.baselines import gaussian_blur

MODES = ("deletion", "insertion")
BASELINES = ("zero", "blur", "mean")
RANDOM = "random"  # the key of the random order's curves


@dataclass(frozen=True)
class CurveConfig:
    """How a deletion / insertion curve is taken.

    steps: points after the start (the curve has steps + 1 points); patch: side of a unit in px
    (1 = pixels); blur_sigma: px, for the blur baseline; seed: the random order and tie breaks.
    """

    mode: str = "deletion"
    baseline: str = "zero"
    steps: int = 32
    patch: int = 1
    blur_sigma: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument.field("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.baseline not in BASELINES:
            raise InvalidArgument.field("baseline", f"must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 4096:
            raise InvalidArgument.field("steps", f"must be an integer in 1..4096, got {self.steps!r}")
        if not isinstance(self.patch, int) or self.patch < 1:
            raise InvalidArgument.field("patch", f"must be a positive integer, got {self.patch!r}")
        if not self.blur_sigma > 0:
            raise InvalidArgument.field("blur_sigma", f"must be > 0, got {self.blur_sigma!r}")


@dataclass
class Curves:
    """One order's curves on N items: `fractions` `# (S+1,)` of units changed, `probs` `# (N, S+1)`
    the target's softmax probability at each, `auc` the per-item area."""

    fractions: np.ndarray
    probs: np.ndarray
    auc: MetricResult


@dataclass
class MethodCurves:
    """A method's curves and how they compare with the random order's on the same items.

    gain: per item, positive = better than chance (see the module docstring for the sign);
    ratio: per item, > 1 = better than chance (inf/NaN where the denominator AUC is 0).
    """

    method: str
    curves: Curves
    gain: MetricResult
    ratio: MetricResult


@dataclass
class PerturbationResult:
    """Deletion or insertion over N items for every method, plus the shared random order."""

    config: CurveConfig
    methods: dict[str, MethodCurves]
    random: Curves
    rows: int  # forward rows the evaluation ran: its cost in model passes


def make_baseline(kind: str, inputs: Tensor, blur_sigma: float = 5.0) -> Tensor:
    """What removed units become `# (N, C, H, W)`: zero, blur or mean (see the module docstring)."""
    if kind == "zero":
        return torch.zeros_like(inputs)
    if kind == "blur":
        return gaussian_blur(inputs, blur_sigma)
    if kind == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs).clone()
    raise InvalidArgument.field("baseline", f"must be one of {', '.join(BASELINES)}, got {kind!r}")


def unit_scores(maps: Tensor, patch: int) -> Tensor:
    """Saliency per unit `# (N, U)`: the mean of `maps` `# (N, H, W)` over each patch (edge patches
    over their pixels inside the image), raster order."""
    if patch == 1:
        return maps.flatten(1).float()
    pooled = F.avg_pool2d(maps.unsqueeze(1).float(), patch, stride=patch, ceil_mode=True)  # (N, 1, h, w)
    return pooled.flatten(1)


def salience_ranks(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Position `# (N, U)` of each unit in its item's order, most salient first; ties in a random order."""
    n, u = scores.shape
    shuffle = torch.rand((n, u), generator=generator).argsort(dim=1).to(scores.device)  # (N, U)
    shuffled = scores.gather(1, shuffle)
    order = shuffle.gather(1, shuffled.argsort(dim=1, descending=True, stable=True))  # (N, U) units, first first
    return order.argsort(dim=1)


def random_ranks(n: int, u: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A random order per item `# (N, U)` (a uniformly random permutation of the units)."""
    return torch.rand((n, u), generator=generator).argsort(dim=1).argsort(dim=1).to(device)


def step_counts(units: int, steps: int) -> np.ndarray:
    """Units changed at each step `# (S+1,)`: round(k / steps * units), k = 0..steps."""
    return np.rint(np.arange(steps + 1) * units / steps).astype(np.int64)


def perturbation_curves(model: nn.Module, inputs: Tensor, maps: Mapping[str, Tensor], targets: Tensor,
                        config: CurveConfig = CurveConfig(), *, budget: FoldBudget = FoldBudget(),
                        ranks: Mapping[str, Tensor] | None = None) -> PerturbationResult:
    """Deletion or insertion curves of every method in `maps` and of a random order, on the same items.

    model: the classifier, used as it is (eval mode is the caller's); inputs `# (N, C, H, W)` in
    model space on the model's device; maps: method -> `# (N, H, W)` saliency at the input's size
    (larger = more important; pass |map| to rank by magnitude); targets `# (N,)` class per item.
    ranks: precomputed orders (method -> `# (N, U)`, as `salience_ranks` gives), for callers that
    reuse them across baselines; maps still name the methods.
    """
    x, t = _check(inputs, maps, targets)
    n, _, height, width = x.shape
    patch = config.patch
    gen = torch.Generator().manual_seed(int(config.seed))
    names = list(maps)
    orders = []  # (N, U) per order: the methods', then the random one
    for name in names:
        given = None if ranks is None else ranks.get(name)
        orders.append(given if given is not None else salience_ranks(unit_scores(maps[name].to(x.device), patch), gen))
    units = orders[0].shape[1] if orders else unit_scores(x[:, 0], patch).shape[1]
    orders.append(random_ranks(n, units, gen, x.device))
    order_stack = torch.stack(orders, dim=1)  # (N, O, U)
    counts = step_counts(units, config.steps)
    probs = _run_rows(model, x, t, order_stack, counts, make_baseline(config.baseline, x, config.blur_sigma),
                      config, budget, (height, width))  # (N, O, S+1)
    fractions = counts / units
    curves = [_curves(fractions, probs[:, o], f"{config.mode}_auc", config.seed) for o in range(len(orders))]
    random = curves[-1]
    methods = {name: _compare(name, curves[o], random, config) for o, name in enumerate(names)}
    return PerturbationResult(config, methods, random, rows=n * len(orders) * (config.steps + 1))


def _check(inputs: Tensor, maps: Mapping[str, Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or not inputs.is_floating_point() or inputs.shape[0] == 0:
        raise InvalidArgument.field("inputs", "must be a non-empty floating tensor shaped (N, C, H, W)")
    n, _, height, width = inputs.shape
    for name, m in maps.items():
        if not isinstance(m, Tensor) or tuple(m.shape) != (n, height, width):
            raise InvalidArgument.field(f"maps.{name}", f"must be shaped ({n}, {height}, {width}), got "
                                                        f"{tuple(m.shape) if isinstance(m, Tensor) else type(m)}")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (n,):
        raise InvalidArgument.field("targets", f"must be one class index per item, shape ({n},)")
    return inputs, targets.to(inputs.device).long()


def _unit_mask(ranks: Tensor, counts: Tensor, patch: int, size: tuple[int, int]) -> Tensor:
    """Which pixels are changed `# (B, 1, H, W)`: units ranked below each row's count `# (B,)`."""
    height, width = size
    h, w = -(-height // patch), -(-width // patch)
    changed = (ranks < counts[:, None]).view(-1, 1, h, w)  # (B, 1, h, w)
    if patch > 1:
        changed = changed.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[..., :height, :width]
    return changed


def _run_rows(model: nn.Module, x: Tensor, targets: Tensor, orders: Tensor, counts: np.ndarray, baseline: Tensor,
              config: CurveConfig, budget: FoldBudget, size: tuple[int, int]) -> Tensor:
    """Target probabilities `# (N, O, S+1)` of every (item, order, step) row, run in chunks."""
    n, o, _ = orders.shape
    s1 = len(counts)
    total = n * o * s1
    chunk = forward_rows(model, tuple(x.shape[1:]), budget, device=x.device, dtype=x.dtype)
    step_count = torch.as_tensor(counts, device=x.device)
    start, end = (x, baseline) if config.mode == "deletion" else (baseline, x)  # changed units go start -> end
    out = torch.empty(total, dtype=torch.float32, device=x.device)
    with torch.inference_mode():
        for piece in iter_chunks(total, chunk):
            row = torch.arange(piece.start, piece.stop, device=x.device)  # flat (item, order, step) index
            item, rest = row // (o * s1), row % (o * s1)
            order, step = rest // s1, rest % s1
            changed = _unit_mask(orders[item, order], step_count[step], config.patch, size)  # (B, 1, H, W)
            rows = torch.where(changed, end[item], start[item])  # (B, C, H, W)
            logits = model(rows)
            out[piece] = torch.softmax(logits.float(), dim=1).gather(1, targets[item, None])[:, 0]
    return out.view(n, o, s1)


def forward_rows(model: nn.Module, row_shape: tuple[int, ...], budget: FoldBudget, *, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> int:
    """Rows per inference chunk: the budget's forward-only cap, or with `budget.measure` the measured size below it."""
    cap = rows_per_chunk(model, row_shape, budget, device=device, dtype=dtype, backward=False)
    if not budget.measure:
        return cap
    return measured_rows(model, row_shape, dtype, torch.device(device), cap=cap, backward=False)


def _curves(fractions: np.ndarray, probs: Tensor, name: str, seed: int) -> Curves:
    values = probs.double().cpu().numpy()  # (N, S+1)
    auc = np.trapezoid(values, fractions, axis=1)  # (N,)
    return Curves(fractions.astype(np.float64), values, metric(name, auc, seed=seed))


def _compare(name: str, curves: Curves, random: Curves, config: CurveConfig) -> MethodCurves:
    ours, chance = curves.auc.values, random.auc.values
    sign = 1.0 if config.mode == "insertion" else -1.0
    gain = sign * (ours - chance)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ours / chance if config.mode == "insertion" else chance / ours
    return MethodCurves(name, curves, metric(f"{config.mode}_gain_over_random", gain, seed=config.seed),
                        metric(f"{config.mode}_ratio_over_random", ratio, seed=config.seed))
