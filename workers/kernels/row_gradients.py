"""The backward half of a gradient fold: d logit[r, target_r] / d row_r for every folded row, chunk by chunk.

workers/kernels/gradients.py lays every request's rows into one tensor; this runs them through the model
in chunks of the budget's size (one forward and one `autograd.grad` each) and, when a `FoldWatch` is given,
asks before each chunk after the first which requests are still wanted, leaving the rows of the others out
of the chunks still to run.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.batching import FoldBudget, FoldWatch, iter_chunks, rows_per_chunk


def row_gradients(model: nn.Module, rows: Tensor, row_targets: Tensor, budget: FoldBudget,
                   spans: list[tuple[int, int, int]], watch: FoldWatch | None = None,
                   extras: tuple[Tensor, ...] = (), size: int | None = None) -> Tensor:
    """d logit[r, target_r] / d row_r for every row, `# (R, C, H, W)`, chunked by the budget.

    spans: (request id, first row, end row) of each request, in row order. With `watch`,
    the rows of requests found dead between chunks are skipped (left unset in the answer).
    extras: per-row tensors `# (R, ...)` sliced like the rows and passed after them,
    `model(rows, *extras)` (a text model's ids and mask); size: rows per chunk, None = from the budget.
    """
    if size is None:
        size = rows_per_chunk(model, tuple(rows.shape[1:]), budget, device=rows.device, dtype=rows.dtype)
    if watch is not None and rows.shape[0] > size:
        return _watched_row_gradients(model, rows, row_targets, size, spans, watch, extras)
    grads = [_chunk_gradient(model, rows, row_targets, [chunk], extras)
             for chunk in iter_chunks(rows.shape[0], size)]
    return grads[0] if len(grads) == 1 else torch.cat(grads)  # (R, C, H, W)


def _watched_row_gradients(model: nn.Module, rows: Tensor, row_targets: Tensor, size: int,
                           spans: list[tuple[int, int, int]], watch: FoldWatch,
                           extras: tuple[Tensor, ...] = ()) -> Tensor:
    """As the plain loop (the same balanced chunks while every request lives), asking `watch`
    before each chunk after the first and leaving the rows of dead requests out of what is left."""
    out = torch.empty_like(rows)  # (R, C, H, W)
    pending = [[ident, start, stop] for ident, start, stop in spans if stop > start]
    first = True
    while pending:
        if not first:
            live = set(watch.check([ident for ident, _, _ in pending]))
            watch.rows_skipped += sum(stop - start for ident, start, stop in pending if ident not in live)
            pending = [p for p in pending if p[0] in live]
            if not pending:
                break
        first = False
        remaining = sum(stop - start for _, start, stop in pending)
        take = remaining // -(-remaining // size)  # iter_chunks' balanced split of what is left
        pieces: list[slice] = []
        while take > 0:
            ident, start, stop = pending[0]
            n = min(take, stop - start)
            if pieces and pieces[-1].stop == start:  # contiguous rows stay one view
                pieces[-1] = slice(pieces[-1].start, start + n)
            else:
                pieces.append(slice(start, start + n))
            pending[0][1] += n
            take -= n
            if pending[0][1] == stop:
                pending.pop(0)
        grad = _chunk_gradient(model, rows, row_targets, pieces, extras)
        offset = 0
        for piece in pieces:
            n = piece.stop - piece.start
            out[piece] = grad[offset:offset + n]
            offset += n
    return out


def _chunk_gradient(model: nn.Module, rows: Tensor, row_targets: Tensor, pieces: list[slice],
                    extras: tuple[Tensor, ...] = ()) -> Tensor:
    """The row gradients of one chunk made of `pieces` of the rows, `# (r, C, H, W)`."""
    if len(pieces) == 1:
        # A leaf view of the rows, no copy.
        x, targets = rows[pieces[0]], row_targets[pieces[0]]
        more = tuple(e[pieces[0]] for e in extras)
    else:
        x, targets = torch.cat([rows[p] for p in pieces]), torch.cat([row_targets[p] for p in pieces])
        more = tuple(torch.cat([e[p] for p in pieces]) for e in extras)
    with torch.enable_grad():
        # Logits of different rows are independent, so the gradient of their sum is each row's own.
        leaf = x.detach().requires_grad_(True)  # (r, C, H, W)
        logits = model(leaf, *more)  # (r, K)
        selected = logits.gather(1, targets.unsqueeze(1)).sum()
        (grad,) = torch.autograd.grad(selected, leaf)
    return grad
