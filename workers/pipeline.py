"""One batch of validated requests -> results, with per-request error isolation.

Stages, each over the whole batch: predict (one inference forward over every
request's items) -> resolve targets -> fold into the kernels (every gradient
request into one `explain_gradients` call, every CAM request into one
`explain_cam` call) -> reduce/normalize on the device -> assemble results.
A CAM request that explains one class per item skips the predict stage: the
CAM pass runs the whole model anyway, and picks the predicted class and
reports the scores from that same forward (a third of a Grad-CAM's cost).
A request that fails validation or a kernel fails alone: a failing folded call
is retried request by request so the culprit is found and its neighbours
still succeed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from workers import tracing
from workers.batching import FoldWatch
from workers.errors import AttributionError, Cancelled, DeadlineExceeded, InternalError, InvalidArgument
from workers.kernels.baselines import make_baseline
from workers.kernels.cam import CamRequest, explain_cam, validate_cam_request
from workers.kernels.gradients import (BASELINE_METHODS, GradientRequest, explain_gradients,
                                       validate_gradient_request)
from workers.postprocess import finish_maps
from workers.spec import CAM_METHODS, GRADIENT_METHODS, ExplainResult, ExplainSpec
from workers.stages import (TOP_PREDICTIONS, ContextCache, WorkerContext, build_items,  # noqa: F401  (re-exported)
                            check_finite, kernel_limits, resolve_targets, to_device)

log = logging.getLogger(__name__)

@dataclass
class _Work:
    """A request on its way through the stages."""

    index: int
    spec: ExplainSpec
    inputs: torch.Tensor | None = None        # (N, C, H, W) on the device
    item_of_row: torch.Tensor | None = None   # (N*k,) item index of each explained row
    targets: torch.Tensor | None = None       # (N*k,)
    probs: torch.Tensor | None = None         # (N, classes)
    kernel_request: object = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)    # method -> (N*k, ...) host maps
    native: dict[str, torch.Tensor] = field(default_factory=dict)
    completeness: torch.Tensor | None = None
    completeness_absolute: torch.Tensor | None = None
    dropped: AttributionError | None = None  # found dead between chunks of its fold


def explain_batch(ctx: WorkerContext, specs: list[ExplainSpec],
                  abandoned: Callable[[ExplainSpec], bool] | None = None) -> list[ExplainResult | AttributionError]:
    """Runs a batch; each entry of the answer is a result or the typed error of that request.

    While this process traces (workers/tracing.py), each request that carries a trace context
    (`spec.trace`) gets a "kernel" span, a child of that context, over the batch's compute: each
    request keeps its own trace, whichever batch it shared.

    abandoned(spec): the caller has gone (cancelled); such a request, like one whose deadline
    passed, is dropped at each stage boundary (before the prediction forward, before the kernels,
    and between the chunks of a gradient fold, whose remaining rows it leaves) and counted in
    `ctx.dropped` (the rows a fold never computed in `ctx.rows_skipped`).
    """
    if not tracing.enabled():
        return _explain_batch(ctx, specs, abandoned)
    spans = [tracing.tracer.start_span("kernel", context=tracing.extract(spec.trace), attributes={
        "attribution.request_id": spec.request_id, "attribution.model": ctx.model.name,
        "attribution.method": spec.method, "attribution.cost": spec.cost,
        "attribution.batch_requests": len(specs)}) if spec.trace else None for spec in specs]
    outcomes: list = []
    try:
        outcomes = _explain_batch(ctx, specs, abandoned)
        return outcomes
    finally:
        for i, span in enumerate(spans):
            if span is None:
                continue
            outcome = outcomes[i] if i < len(outcomes) else None
            if not isinstance(outcome, ExplainResult):
                span.set_status(tracing.StatusCode.ERROR, type(outcome).__name__ if outcome is not None
                                else "the batch failed")
            span.end()


def _explain_batch(ctx: WorkerContext, specs: list[ExplainSpec],
                   abandoned: Callable[[ExplainSpec], bool] | None) -> list[ExplainResult | AttributionError]:
    gone = abandoned or (lambda spec: False)
    if ctx.model.text is not None:  # a text model's batches: embedding-level kernels (workers/text/pipeline.py)
        from workers.text.pipeline import explain_text_batch

        return explain_text_batch(ctx, specs, gone)
    started = time.perf_counter()
    outcomes: list[ExplainResult | AttributionError | None] = [None] * len(specs)
    works = []
    for index, spec in enumerate(specs):
        work = _Work(index, spec)
        if _guard(outcomes, work, _check_online, gone, ctx):
            works.append(work)
    for w in works:  # outside inference mode: the kernels build autograd graphs from these
        w.inputs = to_device(w.spec.inputs, ctx.model.device)
    with torch.inference_mode():
        _predict(ctx, [w for w in works if not _predicts_in_kernel(w, ctx)], outcomes)
    works = [w for w in works if outcomes[w.index] is None and _guard(outcomes, w, _resolve, ctx)]
    works = [w for w in works if _guard(outcomes, w, _check_alive, gone, ctx)]  # before the costly part
    grad_works = [w for w in works if w.spec.method in GRADIENT_METHODS]
    cam_works = [w for w in works if w.spec.method in CAM_METHODS]
    _run_folded(grad_works, outcomes, lambda batch: _run_gradients(ctx, batch, gone))
    _run_folded(cam_works, outcomes, lambda batch: _run_cam(ctx, batch))
    compute_ms = (time.perf_counter() - started) * 1e3
    samples = sum(spec.cost for spec in specs)
    for w in works:
        if w.dropped is not None and outcomes[w.index] is None:
            outcomes[w.index] = w.dropped
        elif outcomes[w.index] is None:
            _guard(outcomes, w, _assemble, ctx, compute_ms, samples, len(specs))
    return outcomes  # type: ignore[return-value]


def _guard(outcomes, work: _Work, stage, *args) -> bool:
    """Runs one request's stage; a failure becomes that request's outcome."""
    try:
        result = stage(work, *args)
    except AttributionError as exc:
        outcomes[work.index] = exc
        return False
    except Exception as exc:  # a bug or a device fault in one request must not fail the batch
        log.exception("request %s failed in %s", work.spec.request_id, getattr(stage, "__name__", stage))
        outcomes[work.index] = InternalError(f"internal error while explaining: {type(exc).__name__}")
        return False
    if result is not None:
        outcomes[work.index] = result
    return True


def _check_online(work: _Work, gone: Callable[[ExplainSpec], bool], ctx: "WorkerContext") -> None:
    if work.spec.method not in GRADIENT_METHODS + CAM_METHODS:
        raise InvalidArgument.field("method", f"{work.spec.method} runs only as an offline job (SubmitJob)")
    _check_alive(work, gone, ctx)


def _check_alive(work: _Work, gone: Callable[[ExplainSpec], bool], ctx: "WorkerContext") -> None:
    """Drops a request nobody waits for any more: its deadline passed or its caller cancelled."""
    deadline = work.spec.deadline
    late = deadline is not None and time.time() > deadline
    if late or gone(work.spec):
        ctx.dropped += 1
        raise (DeadlineExceeded("the request's deadline passed before it was computed; it was dropped") if late
               else Cancelled("the caller cancelled the request; it was dropped"))


def _predict(ctx: WorkerContext, works: list[_Work], outcomes) -> None:
    """One inference forward over every request's items: top-k and target scores."""
    if not works:
        return
    try:
        logits = ctx.model.module(torch.cat([w.inputs for w in works]))  # (sum N, classes)
        probs = torch.softmax(logits.float(), dim=1)
    except Exception:
        if len(works) == 1:
            _guard(outcomes, works[0], _raise_internal)
            return
        for w in works:  # isolate the request that breaks the forward
            _predict(ctx, [w], outcomes)
        return
    offset = 0
    for w in works:
        w.probs = probs[offset:offset + w.spec.items]
        offset += w.spec.items


def _predicts_in_kernel(work: _Work, ctx: WorkerContext) -> bool:
    """A CAM request with one target per item gets its predictions from the CAM pass."""
    target = work.spec.target
    return work.spec.method in CAM_METHODS and (
        target.kind != "top_k" or min(target.k, ctx.model.num_classes) == 1)


def _raise_internal(work: _Work) -> None:
    log.exception("prediction forward failed for request %s", work.spec.request_id)
    raise InternalError("the model failed on this input")


def _resolve(work: _Work, ctx: WorkerContext) -> None:
    """Targets per explained row and the kernel request of this work."""
    spec, n = work.spec, work.spec.items
    device = ctx.model.device
    target = spec.target
    if target.kind != "indices" and _predicts_in_kernel(work, ctx):  # the top-1, picked in the CAM pass
        targets, k = None, 1
    else:
        targets, k = resolve_targets(target, work.probs, ctx.model.num_classes, n, device)
    work.item_of_row = torch.arange(n, device=device).repeat_interleave(k)
    work.targets = targets
    inputs = work.inputs if k == 1 else work.inputs.repeat_interleave(k, dim=0)  # (N*k, C, H, W)
    work.kernel_request = (_gradient_request(ctx, spec, inputs, work.targets) if spec.method in GRADIENT_METHODS
                           else _cam_request(ctx, spec, inputs, work.targets))


def _gradient_request(ctx: WorkerContext, spec: ExplainSpec, inputs, targets) -> GradientRequest:
    p, model = spec.params, ctx.model
    baselines = references = None
    if spec.method in BASELINE_METHODS:
        custom = None if p.baseline_tensor is None else p.baseline_tensor.to(model.device)
        if custom is not None and custom.shape[0] not in (1, inputs.shape[0]) and spec.target.per_item > 1:
            custom = custom.repeat_interleave(spec.target.per_item, dim=0)
        baselines = make_baseline(p.baseline, inputs, mean=model.spec.mean, std=model.spec.std, seed=spec.seed,
                                  blur_sigma=p.blur_sigma, custom=custom)
    elif spec.method == "expected_gradients":  # the request's own reference set, else the model's
        references = model.reference_set if p.baseline_tensor is None else p.baseline_tensor.to(model.device)
    req = GradientRequest(inputs=inputs, targets=targets, method=spec.method, samples=p.samples,
                          noise_fraction=p.noise_fraction, steps=p.steps, rule=p.rule, baselines=baselines,
                          seed=spec.seed, absolute=p.absolute, references=references, noise_stdev=p.noise_stdev,
                          max_sigma=p.max_sigma, fraction=p.fraction)
    validate_gradient_request(req, model.num_classes, ctx.limits)
    return req


def _cam_request(ctx: WorkerContext, spec: ExplainSpec, inputs, targets) -> CamRequest:
    layer = spec.params.layer or ctx.model.default_cam_layer
    variants = (spec.method,) + tuple(v for v in spec.params.also if v != spec.method)
    req = CamRequest(inputs=inputs, targets=targets, layer=layer, variants=variants)
    validate_cam_request(req, ctx.taps, ctx.model.num_classes)
    return req


def _run_folded(works: list[_Work], outcomes, run) -> None:
    """Runs the works folded; if the folded call fails, once more one by one."""
    if not works:
        return
    try:
        run(works)
        return
    except Exception as exc:
        if len(works) == 1:
            _guard(outcomes, works[0], _reraise, exc)
            return
        log.warning("folded kernel call failed (%s); isolating the %d requests", type(exc).__name__, len(works))
    for w in works:
        _guard(outcomes, w, lambda work: run([work]))


def _reraise(work: _Work, exc: Exception) -> None:
    raise exc


def fold_watch(ctx: WorkerContext, works: list, gone: Callable[[ExplainSpec], bool]) -> FoldWatch:
    """The fold's between-chunk check of `works`: a request whose caller has gone is dropped (its
    `dropped` set to the answer it gets) and its rows leave the chunks still to run."""
    def alive(i: int) -> bool:
        ctx.fold_checks += 1
        try:
            _check_alive(works[i], gone, ctx)
        except AttributionError as exc:
            works[i].dropped = exc
            return False
        return True

    return FoldWatch(alive)


def _run_gradients(ctx: WorkerContext, works: list[_Work], gone: Callable[[ExplainSpec], bool]) -> None:
    watch = fold_watch(ctx, works, gone)
    try:
        results = explain_gradients(ctx.model.module, [w.kernel_request for w in works], ctx.budget, ctx.limits,
                                    num_classes=ctx.model.num_classes, watch=watch)
    finally:
        ctx.rows_skipped += watch.rows_skipped
    for w, res in zip(works, results):
        if res is None:  # dropped between chunks: w.dropped is its answer
            continue
        out = w.spec.output
        w.maps[w.spec.method] = finish_maps(res.attributions, out.reduction, out.normalization)
        if res.completeness_error is not None:
            w.completeness = res.completeness_error.float().cpu()
            w.completeness_absolute = res.completeness_error_absolute.float().cpu()


def _run_cam(ctx: WorkerContext, works: list[_Work]) -> None:
    results = explain_cam(ctx.model.module, ctx.taps, [w.kernel_request for w in works], ctx.budget)
    for w, res in zip(works, results):
        if w.probs is None:  # predicted in the pass: its scores are this request's predictions
            w.probs = torch.softmax(res.logits, dim=1)
            w.targets = res.targets
        norm = w.spec.output.normalization
        for variant, maps in res.maps.items():
            w.maps[variant] = finish_maps(maps, "none", norm)
            if w.spec.output.native_resolution:
                w.native[variant] = finish_maps(res.native[variant], "none", norm)


def _assemble(work: _Work, ctx: WorkerContext, compute_ms: float, samples: int, requests: int) -> ExplainResult:
    spec, model = work.spec, ctx.model
    k = spec.target.per_item if spec.target.kind == "top_k" else 1
    k = min(k, model.num_classes)
    check_finite(work.probs, work.maps, k)
    items = build_items(work.probs, work.targets, k, work.maps, work.native, work.completeness,
                        work.completeness_absolute)
    return ExplainResult(request_id=spec.request_id, model=model.name, model_version=model.version,
                         method=spec.method, items=items, compute_ms=compute_ms, batch_samples=samples,
                         batch_requests=requests)
