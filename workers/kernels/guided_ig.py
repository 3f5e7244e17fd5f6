"""Guided Integrated Gradients (Kapishnikov et al. 2021, "Guided Integrated Gradients: an Adaptive Path
Method for Removing Noise"), folded across requests.

The path is chosen as it is walked: at each of T steps, from the current point, the features whose
gradient is smallest in magnitude (the `fraction` quantile) move toward the input first, until the
point's L1 distance to the input has shrunk to (1 - (k+1)/T) of the whole; no feature may stray more
than MAX_DIST (relative) from the straight line between baseline and input. The attribution is the sum
over the path of (step taken) * gradient, so it adds up to about f(x) - f(baseline), like IG.

This follows PAIR's `saliency.core.GuidedIG` (its `max_dist` 0.02), in float64 for the path state.
Each step needs the gradient at every item's current point, so the steps run one after another, but
a step is one fold: the batch dimension holds every item of every Guided IG request at that step (an
item whose request asked for fewer steps has left the fold), chunked by the budget like the other
gradient methods. A request's path depends only on its own gradients, so it is the same alone or folded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from workers.batching import FoldBudget, FoldWatch
from workers.kernels.row_gradients import row_gradients

MAX_DIST = 0.02   # PAIR's default: how far (relative) a feature may stray from the straight-line path
_EPSILON = 1e-9   # PAIR's tolerance of "the L1 target is reached" (math.isclose, rel and abs)


class _Walk:
    """The path state of every item of the fold, `# (M, D)` float64 each (D = C*H*W)."""

    def __init__(self, inputs: Tensor, baselines: Tensor, steps: Tensor, fractions: Tensor):
        self.target = inputs.flatten(1).double()   # (M, D)
        self.start = baselines.flatten(1).double()  # (M, D)
        self.x = self.start.clone()
        self.attr = torch.zeros_like(self.x)
        self.diff = self.target - self.start
        self.l1_total = self.diff.abs().sum(dim=1)  # (M,)
        self.steps = steps            # (M,) int64
        self.fractions = fractions    # (M,) float64
        self.moving = self.l1_total > 0  # a zero path has zero attributions

    def advance(self, step: int, rows: Tensor, grad_actual: Tensor) -> None:
        """Moves the items `rows` `# (m,)` one step, given their gradients `# (m, D)` at their points."""
        x, target, start, diff = self.x[rows], self.target[rows], self.start[rows], self.diff[rows]
        steps = self.steps[rows].double()
        alpha = (step + 1.0) / steps  # (m,)
        lo = (alpha - MAX_DIST).clamp_min(0.0).unsqueeze(1)
        hi = (alpha + MAX_DIST).clamp_max(1.0).unsqueeze(1)
        x_min, x_max = start + diff * lo, start + diff * hi  # (m, D)
        l1_target = (self.l1_total[rows] * (1 - (step + 1) / steps)).unsqueeze(1)  # (m, 1)
        grad = grad_actual.clone()
        attr = self.attr[rows]
        ranks = (self.fractions[rows] * (diff.shape[1] - 1)).floor().long().unsqueeze(1)  # numpy's "lower"
        active = torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        with torch.no_grad():
            while bool(active.any()):
                x_old = x.clone()
                where = torch.where(diff != 0, (x - start) / torch.where(diff != 0, diff, 1.0), hi)
                behind = (where < lo) & active.unsqueeze(1)
                x = torch.where(behind, x_min, x)
                l1_current = (x - target).abs().sum(dim=1, keepdim=True)  # (m, 1)
                tolerance = torch.maximum(_EPSILON * torch.maximum(l1_target.abs(), l1_current.abs()),
                                          torch.full_like(l1_current, _EPSILON))
                reached = ((l1_target - l1_current).abs() <= tolerance).squeeze(1) & active
                moving = active & ~reached
                grad = torch.where(x == x_max, torch.full_like(grad, math.inf), grad)
                magnitude = grad.abs()
                threshold = _lower_quantile(magnitude, ranks)  # (m, 1)
                selected = (magnitude <= threshold) & (grad != math.inf) & moving.unsqueeze(1)
                l1_s = ((x - x_max).abs() * selected).sum(dim=1, keepdim=True)  # (m, 1)
                gamma = torch.where(l1_s > 0, (l1_current - l1_target) / torch.where(l1_s > 0, l1_s, 1.0),
                                    torch.full_like(l1_s, math.inf))
                jump = gamma > 1.0  # (m, 1): every selected feature goes all the way to x_max
                x = torch.where(selected, torch.where(jump, x_max, x + (x_max - x) * gamma), x)
                attr += (x - x_old) * grad_actual
                # A partial move lands on the L1 target; an item with nothing left to move is done too.
                active = moving & jump.squeeze(1) & selected.any(dim=1)
        self.x[rows], self.attr[rows] = x, attr


def guided_ig(model: nn.Module, inputs: list[Tensor], baselines: list[Tensor], targets: list[Tensor],
              steps: list[int], fractions: list[float], budget: FoldBudget, ids: list[int],
              watch: FoldWatch | None = None) -> list[Tensor | None]:
    """Guided IG attributions `# (N, C, H, W)` float32 per request, every request's items walked together.

    inputs/baselines `# (N, C, H, W)` and targets `# (N,)` per request; `ids`: the requests' indices as
    `watch` knows them. A request found dead between steps leaves the walk and is answered None.
    """
    counts = [int(x.shape[0]) for x in inputs]
    walk = _Walk(torch.cat(inputs), torch.cat(baselines),
                 torch.cat([torch.full((n,), t, dtype=torch.long) for n, t in zip(counts, steps)]).to(inputs[0].device),
                 torch.cat([torch.full((n,), f, dtype=torch.float64) for n, f in zip(counts, fractions)])
                 .to(inputs[0].device))
    owner = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)]).to(inputs[0].device)
    all_targets = torch.cat([t.to(inputs[0].device) for t in targets])
    dtype, shape = inputs[0].dtype, inputs[0].shape[1:]
    alive = set(range(len(inputs)))
    for step in range(max(steps)):
        if watch is not None and step > 0:
            still = set(watch.check([ids[j] for j in alive]))  # one check per step for every request
            alive = {k for k in alive if ids[k] in still}
        live = [k for k in alive if step < steps[k]]
        if not live:
            break
        keep = torch.zeros(len(inputs), dtype=torch.bool, device=owner.device)
        keep[live] = True
        rows = (keep[owner] & walk.moving).nonzero().flatten()  # (m,)
        if rows.numel() == 0:
            continue
        points = walk.x[rows].to(dtype).view(-1, *shape)  # (m, C, H, W)
        spans = _spans(owner[rows], ids)
        grads = row_gradients(model, points, all_targets[rows], budget, spans)  # (m, C, H, W)
        walk.advance(step, rows, grads.flatten(1).double())
    out: list[Tensor | None] = []
    start = 0
    for k, n in enumerate(counts):
        out.append(walk.attr[start:start + n].view(n, *shape).float() if k in alive else None)
        start += n
    return out


def _lower_quantile(values: Tensor, ranks: Tensor) -> Tensor:
    """Per row of `values` `# (m, D)`, its element of rank `ranks` `# (m, 1)` (0-based, ascending): numpy's
    quantile "lower". One kthvalue (linear time) per distinct rank, rather than a sort of every row."""
    distinct = torch.unique(ranks)
    if distinct.numel() == 1:
        return values.kthvalue(int(distinct) + 1, dim=1, keepdim=True).values
    out = torch.empty_like(ranks, dtype=values.dtype)
    for rank in distinct.tolist():
        rows = (ranks[:, 0] == rank).nonzero().flatten()
        out[rows] = values[rows].kthvalue(rank + 1, dim=1, keepdim=True).values
    return out


def _spans(owners: Tensor, ids: list[int]) -> list[tuple[int, int, int]]:
    """(request id, first row, end row) of each request's rows in a step's fold (rows are owner-sorted)."""
    spans, values = [], owners.tolist()
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            spans.append((ids[values[start]], start, i))
            start = i
    return spans
