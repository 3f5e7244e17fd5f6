"""One batch of validated text requests -> results, with per-request error isolation.

The text counterpart of workers/pipeline.py (which hands a text model's batches here), with the
same stages: predict (one inference forward per request), resolve targets, fold every request
into one `explain_text` call (per sequence length), then trim each item's scores to its real
tokens, normalize them and assemble the items with their tokens. A failing folded call is
retried request by request, and requests whose caller has gone are dropped between stages and
between a fold's chunks, as for images.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from workers.errors import AttributionError, InvalidArgument
from workers.kernels.text_gradients import TextGradientRequest, explain_text, validate_text_request
from workers.postprocess import normalize
from workers.spec import ExplainResult, ExplainSpec
from workers.stages import WorkerContext, build_items, resolve_targets, to_device
from workers.text.methods import TEXT_METHODS


def explain_text_batch(ctx: WorkerContext, specs: list[ExplainSpec],
                       gone: Callable[[ExplainSpec], bool]) -> list[ExplainResult | AttributionError]:
    """Runs a text model's batch; each entry of the answer is a result or that request's typed error."""
    from workers import pipeline as p  # the shared stage guards; imported late (pipeline imports this module)

    started = time.perf_counter()
    outcomes: list = [None] * len(specs)
    works = [p._Work(i, spec) for i, spec in enumerate(specs)]
    works = [w for w in works if p._guard(outcomes, w, _check_method, gone, ctx)]
    for w in works:
        w.inputs = to_device(w.spec.inputs, ctx.model.device)
    with torch.inference_mode():
        works = [w for w in works if p._guard(outcomes, w, _predict, ctx)]
    works = [w for w in works if p._guard(outcomes, w, _resolve, ctx)]
    works = [w for w in works if p._guard(outcomes, w, p._check_alive, gone, ctx)]
    p._run_folded(works, outcomes, lambda batch: _run(ctx, batch, gone))
    compute_ms = (time.perf_counter() - started) * 1e3
    samples = sum(spec.cost for spec in specs)
    for w in works:
        if w.dropped is not None and outcomes[w.index] is None:
            outcomes[w.index] = w.dropped
        elif outcomes[w.index] is None:
            p._guard(outcomes, w, _assemble, ctx, compute_ms, samples, len(specs))
    return outcomes


def _check_method(work, gone, ctx: WorkerContext) -> None:
    from workers.pipeline import _check_alive

    if work.spec.method not in TEXT_METHODS:
        raise InvalidArgument.field("method", f"text model {ctx.model.name!r} supports "
                                              f"{', '.join(TEXT_METHODS)}; not {work.spec.method}")
    if work.spec.attention_mask is None:
        raise InvalidArgument.field("inputs", f"model {ctx.model.name!r} is a text model: send inputs.tokens or "
                                              "inputs.texts")
    _check_alive(work, gone, ctx)


def _predict(work, ctx: WorkerContext) -> None:
    mask = to_device(work.spec.attention_mask, ctx.model.device)
    work.mask = mask
    work.probs = torch.softmax(ctx.model.text.forward.plain(work.inputs, mask).float(), dim=1)


def _resolve(work, ctx: WorkerContext) -> None:
    spec, model = work.spec, ctx.model
    targets, k = resolve_targets(spec.target, work.probs, model.num_classes, spec.items, model.device)
    work.targets = targets
    ids = work.inputs if k == 1 else work.inputs.repeat_interleave(k, dim=0)
    mask = work.mask if k == 1 else work.mask.repeat_interleave(k, dim=0)
    p = spec.params
    req = TextGradientRequest(ids=ids, mask=mask, targets=targets, method=spec.method, samples=p.samples,
                              noise_fraction=p.noise_fraction, steps=p.steps, rule=p.rule, baseline=p.baseline,
                              pad_id=model.text.pad_id, seed=spec.seed, absolute=p.absolute)
    validate_text_request(req, model.text.vocab_size, model.num_classes, ctx.limits)
    work.kernel_request = req


def _run(ctx: WorkerContext, works: list, gone: Callable[[ExplainSpec], bool]) -> None:
    from workers.pipeline import fold_watch

    watch = fold_watch(ctx, works, gone)
    try:
        results = explain_text(ctx.model.text.forward, [w.kernel_request for w in works], ctx.budget, watch)
    finally:
        ctx.rows_skipped += watch.rows_skipped
    for w, res in zip(works, results):
        if res is None:
            continue
        w.maps[w.spec.method] = res.scores.cpu()
        if res.completeness_error is not None:
            w.completeness = res.completeness_error.float().cpu()
            w.completeness_absolute = res.completeness_error_absolute.float().cpu()


def _assemble(work, ctx: WorkerContext, compute_ms: float, samples: int, requests: int) -> ExplainResult:
    spec, model = work.spec, ctx.model
    k = min(spec.target.per_item if spec.target.kind == "top_k" else 1, model.num_classes)
    scores = work.maps[spec.method]  # (N*k, L)
    if not bool(torch.isfinite(work.probs).all()) or not bool(torch.isfinite(scores).all()):
        raise InvalidArgument.field("inputs", "the model's output or the token scores are NaN or Inf for these "
                                              "tokens")
    real = spec.attention_mask.bool()  # (N, L): the tokens each item reports (padding excluded)
    rows = [normalize(scores[r][real[r // k]].unsqueeze(0), spec.output.normalization)[0].contiguous()
            for r in range(scores.shape[0])]
    items = build_items(work.probs, work.targets, k, {spec.method: rows}, None, work.completeness,
                        work.completeness_absolute)
    tokenizer = model.text.tokenizer
    for i, item in enumerate(items):
        ids = spec.inputs[i][real[i]].tolist()
        item.token_ids = ids
        item.tokens = tokenizer.strings(ids) if tokenizer is not None else []
    return ExplainResult(request_id=spec.request_id, model=model.name, model_version=model.version,
                         method=spec.method, items=items, compute_ms=compute_ms, batch_samples=samples,
                         batch_requests=requests)
