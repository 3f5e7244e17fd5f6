"""Token attributions of text models, taken at the embedding layer and folded across requests.

Each method runs the gradient family's recipe on the embedding output E `# (N, L, D)` instead of
pixels (workers/text/forward.py replaces the embedding module's output with the rows), and a
token's score is the attribution summed over the embedding dimension D:

    vanilla               gradient x input: sum_d (d f_t / d E)_ld * E_ld
                          (with `absolute`: the score's absolute value)
    smoothgrad            the gradient averaged over noisy copies of E (Gaussian noise of
                          noise_fraction x the item's embedding value range, on real tokens only),
                          times E: sum_d mean_s(g_s)_ld * E_ld
    integrated_gradients  sum_d (E - B)_ld * sum_i w_i (d f_t / d E)(B + a_i (E - B))_ld, from the
                          baseline B: "zero" (zero embeddings) or "pad_token" (the pad id's embedding)
                          at every real token; padding stays at its own embedding along the path,
                          so it gets exactly zero. Completeness: sum over tokens = f(E) - f(B).

Rows are the embedding rows of every request (N, N*S or N*T per request) with their ids and
masks, folded per sequence length into one tensor and run chunk by chunk (`row_gradients`, with a
`FoldWatch` between chunks as the image kernels); a request's answer does not depend on what it
was folded with (its noise comes from its own seeded generator).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.batching import FoldBudget, FoldWatch, auto_budget_bytes, iter_chunks
from workers.errors import InvalidArgument
from workers.kernels.gradients import (RULES, GradientLimits, completeness_errors, integration_points)
from workers.kernels.row_gradients import row_gradients
from workers.text.forward import TextForward
from workers.text.methods import TEXT_BASELINES, TEXT_METHODS

# Bytes one folded row needs per embedding value, forward and backward (a generous multiple of
# the embedding row itself for the activations of a small encoder); the budget divides by it.
_BYTES_PER_VALUE = 4 * 64


@dataclass(frozen=True)
class TextGradientRequest:
    """One request: ids and mask `# (N, L)` int64 (padding masked), a target per item `# (N,)`."""

    ids: Tensor
    mask: Tensor
    targets: Tensor
    method: str
    samples: int = 32
    noise_fraction: float = 0.15
    steps: int = 32
    rule: str = "gauss_legendre"
    baseline: str = "zero"
    pad_id: int = 0
    seed: int = 0
    absolute: bool = False

    @property
    def per_item(self) -> int:
        return self.samples if self.method == "smoothgrad" else self.steps if self.method == \
            "integrated_gradients" else 1


@dataclass
class TextGradientResult:
    scores: Tensor                          # (N, L) float32 per token; 0 at padding
    completeness_error: Tensor | None       # (N,) IG only, relative
    completeness_error_absolute: Tensor | None
    rows: int


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field, description)


def validate_text_request(req: TextGradientRequest, vocab_size: int, num_classes: int,
                          limits: GradientLimits) -> None:
    """Raise InvalidArgument naming the first bad field of `req`."""
    if req.method not in TEXT_METHODS:
        raise _bad("method", f"{req.method} is not available for text models; choose one of "
                             f"{', '.join(TEXT_METHODS)}")
    ids, mask = req.ids, req.mask
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.dtype != torch.int64 or tuple(mask.shape) != tuple(ids.shape):
        raise _bad("inputs", "token ids and mask must be int64 tensors shaped (N, L), N >= 1")
    if ids.shape[0] > limits.max_items:
        raise _bad("inputs", f"{ids.shape[0]} items exceed the limit of {limits.max_items}")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise _bad("inputs.tokens", f"token ids must be in [0, {vocab_size})")
    if not bool((mask.sum(dim=1) > 0).all()):
        raise _bad("inputs.tokens", "every item needs at least one real token")
    t = req.targets
    if tuple(t.shape) != (ids.shape[0],) or bool(((t < 0) | (t >= num_classes)).any()):
        raise _bad("target", f"needs one class in [0, {num_classes}) per item")
    if req.method == "smoothgrad" and not (1 <= req.samples <= limits.max_samples
                                           and 0.0 <= req.noise_fraction <= 1.0):
        raise _bad("noise", f"samples must be 1..{limits.max_samples} and noise_fraction 0..1")
    if req.method == "integrated_gradients":
        if req.rule not in RULES or not 1 <= req.steps <= limits.max_steps:
            raise _bad("integrated_gradients", f"steps must be 1..{limits.max_steps} with a known rule")
        if req.baseline not in TEXT_BASELINES:
            raise _bad("integrated_gradients.baseline.kind", f"text models take the baselines ZERO (zero "
                                                             f"embeddings) or PAD_TOKEN, not {req.baseline}")


def text_rows_per_chunk(budget: FoldBudget, length: int, dim: int, device: torch.device) -> int:
    """Rows per forward+backward chunk: the budget's max_rows, or its bytes over a row's estimate."""
    if budget.max_rows is not None and budget.max_bytes is None:
        return budget.max_rows
    limit = budget.max_bytes if budget.max_bytes is not None else auto_budget_bytes(device)
    rows = max(1, limit // (length * dim * _BYTES_PER_VALUE))
    return int(min(rows, budget.max_rows) if budget.max_rows is not None else rows)


def explain_text(forward: TextForward, requests: list[TextGradientRequest], budget: FoldBudget = FoldBudget(),
                 watch: FoldWatch | None = None) -> list[TextGradientResult | None]:
    """Per-token attributions for every (validated) request, folded per sequence length.

    With `watch`, a request found dead between chunks is answered None (its remaining rows skipped).
    """
    groups: dict[tuple, list[int]] = {}
    for index, req in enumerate(requests):
        groups.setdefault((int(req.ids.shape[1]), req.ids.device), []).append(index)
    results: list[TextGradientResult | None] = [None] * len(requests)
    with torch.inference_mode(False), torch.no_grad():
        for indices in groups.values():
            for index, result in zip(indices, _fold(forward, [requests[i] for i in indices], budget, indices, watch)):
                results[index] = result
    return results


def _fold(forward: TextForward, requests: list[TextGradientRequest], budget: FoldBudget, ids: list[int],
          watch: FoldWatch | None) -> list[TextGradientResult | None]:
    embeds = [forward.embed(req.ids).float() for req in requests]  # each (N, L, D)
    bases = [_baseline(forward, req, e) if req.method == "integrated_gradients" else None
             for req, e in zip(requests, embeds)]
    pieces = [_rows(req, e, b) for req, e, b in zip(requests, embeds, bases)]
    rows = torch.cat([p[0] for p in pieces])  # (R, L, D)
    row_ids = torch.cat([p[1] for p in pieces])
    row_mask = torch.cat([p[2] for p in pieces])
    row_targets = torch.cat([p[3] for p in pieces])
    spans, start = [], 0
    for i, p in zip(ids, pieces):
        spans.append((i, start, start + p[0].shape[0]))
        start += p[0].shape[0]
    size = text_rows_per_chunk(budget, rows.shape[1], rows.shape[2], rows.device)
    grads = row_gradients(forward.logits, rows, row_targets, budget, spans, watch, extras=(row_ids, row_mask),
                          size=size)  # (R, L, D)
    out: list[TextGradientResult | None] = []
    for k, (req, e, b, (i, lo, hi)) in enumerate(zip(requests, embeds, bases, spans)):
        if watch is not None and i in watch.dropped:
            out.append(None)
            continue
        out.append(_reduce(forward, req, e, b, grads[lo:hi], size))
    return out


def _baseline(forward: TextForward, req: TextGradientRequest, embeds: Tensor) -> Tensor:
    """B `# (N, L, D)`: zeros or the pad embedding at real tokens, the item's own embedding at padding."""
    if req.baseline == "pad_token":
        start = forward.embed(torch.full_like(req.ids, req.pad_id)).float()
    else:
        start = torch.zeros_like(embeds)
    return torch.where(req.mask.bool().unsqueeze(-1), start, embeds)


def _rows(req: TextGradientRequest, embeds: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The request's rows `# (N*k, L, D)`, their ids and masks `# (N*k, L)` and targets `# (N*k,)`."""
    k = req.per_item
    n = embeds.shape[0]
    ids, mask = req.ids.repeat_interleave(k, dim=0), req.mask.repeat_interleave(k, dim=0)
    targets = req.targets.to(embeds.device).repeat_interleave(k)
    if req.method == "vanilla":
        return embeds, ids, mask, targets
    if req.method == "smoothgrad":
        real = req.mask.bool().unsqueeze(-1)  # (N, L, 1)
        high = embeds.masked_fill(~real, float("-inf")).amax(dim=(1, 2))
        low = embeds.masked_fill(~real, float("inf")).amin(dim=(1, 2))
        std = ((high - low) * req.noise_fraction).view(n, 1, 1, 1)
        gen = torch.Generator(device=embeds.device).manual_seed(req.seed)
        noise = torch.randn((n, k, *embeds.shape[1:]), generator=gen, device=embeds.device)
        noisy = embeds.unsqueeze(1) + noise * std * real.unsqueeze(1)  # (N, S, L, D)
        return noisy.reshape(n * k, *embeds.shape[1:]), ids, mask, targets
    alphas, _ = integration_points(req.rule, req.steps, embeds.device)
    path = base.unsqueeze(1) + alphas.view(1, -1, 1, 1) * (embeds - base).unsqueeze(1)  # (N, T, L, D)
    return path.reshape(n * k, *embeds.shape[1:]), ids, mask, targets


def _reduce(forward: TextForward, req: TextGradientRequest, embeds: Tensor, base: Tensor | None, grads: Tensor,
            size: int) -> TextGradientResult:
    n, k = embeds.shape[0], req.per_item
    g = grads.float().view(n, k, *embeds.shape[1:])  # (N, k, L, D)
    real = req.mask.to(embeds.dtype)
    if req.method != "integrated_gradients":
        scores = (g.mean(dim=1) * embeds).sum(dim=-1) * real  # (N, L)
        return TextGradientResult(scores.abs() if req.absolute else scores, None, None, n * k)
    _, weights = integration_points(req.rule, req.steps, embeds.device)
    integral = torch.einsum("t,ntld->nld", weights, g)
    scores = ((embeds - base) * integral).sum(dim=-1) * real  # (N, L)
    targets = req.targets.to(embeds.device).unsqueeze(1)
    ends = torch.cat([embeds, base])
    with torch.no_grad():
        logits = torch.cat([forward.logits(ends[c], torch.cat([req.ids, req.ids])[c], torch.cat([req.mask, req.mask])[c])
                            for c in iter_chunks(ends.shape[0], size)]).float()
    delta = logits[:n].gather(1, targets).squeeze(1) - logits[n:].gather(1, targets).squeeze(1)
    relative, absolute = completeness_errors(scores, delta)
    return TextGradientResult(scores, relative, absolute, n * k)
