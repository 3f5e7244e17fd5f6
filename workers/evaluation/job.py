"""An evaluation job on the offline worker: every method's maps, then each requested metric, in phases.

    run_evaluation(contexts, spec, items_per_chunk=8, progress=report, cancelled=flag) -> EvaluationOutcome

Phases, in order (each only when a requested metric needs it): targets (the given classes, else the
model's prediction) -> maps of every method on the trained model (`MethodRunner`: folded, chunk by chunk
of items) -> deletion and insertion curves for each baseline (every method and the random order in one
fold of forward rows) -> localisation -> model randomization for each mode (each randomized model built
once and every method run on it before the next) -> data randomization (the shuffled-labels model) ->
stability (per augmentation, every method's maps in one folded call) -> class discrimination (the top-k
classes of every item, every method in one folded call). Progress is reported after each phase in
proportion to its expected cost; cancellation is read between phases and between the chunks of every
attribution call. The cost is counted in rows (`RowCounter`) and compared with its floor: the same rows
at the best per-row time this worker measured for the model (workers/chunk_curve.py), inference rows
at the forward-only time and rows with a backward pass at the forward-plus-backward time.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from workers.batching import iter_chunks, rows_per_chunk
from workers.chunk_curve import curve_for, measured_rows
from workers.errors import Cancelled, InvalidArgument
from workers.evaluation import jobspec as js
from workers.evaluation.completeness import COMPLETENESS_TOLERANCE
from workers.evaluation.localisation import localisation
from workers.evaluation.perturbation import CurveConfig, perturbation_curves
from workers.evaluation.ranking import (above, below, metric_data, min_max, rank_methods,
                                        randomization_figure)
from workers.evaluation.randomization import data_randomization_check, parametrized_layers, randomization_check
from workers.evaluation.runner import MethodRunner, RowCounter
from workers.evaluation.similarity import mean_pairwise_spearman, spearman
from workers.evaluation.stability import Augmentation, augment, overlap
from workers.stages import WorkerContext, resolve_targets, to_device

Progress = Callable[[float], None] | None


class _Phases:
    """Reports the fraction done after each phase, weighted by expected cost; checks for cancellation."""

    def __init__(self, weights: dict[str, float], progress: Progress, cancelled: Callable[[], bool]):
        self.weights, self.progress, self.cancelled = weights, progress, cancelled
        self.total, self.done = max(sum(weights.values()), 1e-9), 0.0

    def start(self, name: str) -> None:
        if self.cancelled():
            raise Cancelled(f"the evaluation was cancelled before its {name} phase")

    def end(self, name: str) -> None:
        self.done += self.weights.get(name, 0.0)
        if self.progress is not None:
            self.progress(min(1.0, self.done / self.total))


def _weights(spec: js.EvaluationSpec, layers: int) -> dict[str, float]:
    """Expected cost of each phase, in units of one attribution pass over the items."""
    o, wanted = spec.options, set(spec.metrics)
    curve_rows = (o.curve_steps + 1) * (len(spec.methods) + 1) / max(1, 4 * len(spec.methods))
    weights = {"maps": 1.0}
    for mode, baselines in ((js.DELETION, o.deletion_baselines), (js.INSERTION, o.insertion_baselines)):
        if mode in wanted:
            weights.update({f"{mode}:{b}": curve_rows for b in baselines})
    if js.MODEL_RANDOMIZATION in wanted:
        weights.update({f"randomization:{m}": float(layers) for m in o.randomization_modes})
    weights.update({name: w for name, w in ((js.DATA_RANDOMIZATION, 1.0), (js.STABILITY, len(o.augmentations)),
                                            (js.CLASS_DISCRIMINATION, float(o.top_k))) if name in wanted})
    return weights


def _augmentation(name: str, amount: float) -> Augmentation:
    if name == "shift":
        return Augmentation("shift", offset=(int(amount), int(amount)))
    return Augmentation(name, amount=float(amount))


def run_evaluation(contexts: Callable[[str], WorkerContext], spec: js.EvaluationSpec, *, items_per_chunk: int = 8,
                   progress: Progress = None, cancelled: Callable[[], bool] | None = None) -> js.EvaluationOutcome:
    """Runs `spec` (see the module docstring); raises `Cancelled` between phases when asked."""
    started = time.perf_counter()
    cancelled = cancelled or (lambda: False)
    ctx = contexts(spec.model)
    module, opts, wanted = ctx.model.module, spec.options, set(spec.metrics)
    per_row = _per_row_seconds(ctx)  # measured (or cached) before the counting starts
    counter = RowCounter()
    runner = MethodRunner(ctx, spec.methods, counter, items_per_chunk=items_per_chunk, cancelled=cancelled)
    phases = _Phases(_weights(spec, len(parametrized_layers(module))), progress, cancelled)
    outcomes = {m.label: js.MethodOutcome(m.label, m.method, m.params) for m in spec.methods}
    try:
        x = to_device(spec.inputs, ctx.model.device)  # (N, C, H, W)
        targets = _targets(ctx, spec, x)  # (N,)
        phases.start("maps")
        maps = runner.maps(module, x, targets)
        for label, out in outcomes.items():
            out.example_maps = min_max(maps[label][:spec.example_items])
            errors = runner.completeness.get(label)
            if js.COMPLETENESS in wanted and errors is not None:
                out.metrics.append(below(metric_data(js.COMPLETENESS, "", "relative_error", errors, opts),
                                         COMPLETENESS_TOLERANCE))
        phases.end("maps")
        _curves(spec, module, x, maps, targets, ctx, outcomes, phases, runner)
        if spec.regions is not None and wanted & set(js.LOCALISATION):
            _localisation(spec, maps, outcomes, runner)
        if js.MODEL_RANDOMIZATION in wanted:
            for mode in opts.randomization_modes:
                phases.start(f"randomization:{mode}")
                results = randomization_check(module, x, targets, runner.attributes(), mode=mode,
                                              threshold=opts.randomization_threshold, seed=opts.seed)
                _randomization(js.MODEL_RANDOMIZATION, mode, results, outcomes, spec)
                phases.end(f"randomization:{mode}")
        if js.DATA_RANDOMIZATION in wanted:
            phases.start(js.DATA_RANDOMIZATION)
            shuffled = contexts(spec.shuffled_model).model.module
            results = data_randomization_check(module, shuffled, x, targets, runner.attributes(),
                                               threshold=opts.randomization_threshold, seed=opts.seed)
            _randomization(js.DATA_RANDOMIZATION, "", results, outcomes, spec)
            phases.end(js.DATA_RANDOMIZATION)
        if js.STABILITY in wanted:
            phases.start(js.STABILITY)
            _stability(spec, ctx, x, maps, targets, outcomes, runner)
            phases.end(js.STABILITY)
        if js.CLASS_DISCRIMINATION in wanted:
            phases.start(js.CLASS_DISCRIMINATION)
            _discrimination(spec, ctx, x, outcomes, runner)
            phases.end(js.CLASS_DISCRIMINATION)
    finally:
        runner.close()
        counter.close()
    for label, out in outcomes.items():
        out.seconds += runner.seconds[label]
    ranking, recommended, used = rank_methods(list(outcomes.values()))
    floor = counter.backward * per_row[1] + (counter.forward - counter.backward) * per_row[0]
    return js.EvaluationOutcome(spec.request_id, ctx.model.name, ctx.model.version, spec.items,
                                list(outcomes.values()), ranking, recommended, used, forward_rows=counter.forward,
                                backward_rows=counter.backward, seconds=time.perf_counter() - started,
                                floor_seconds=floor)


def _per_row_seconds(ctx: WorkerContext) -> tuple[float, float]:
    """The best measured seconds per row (forward only, forward plus backward) of the model on this worker."""
    model, budget = ctx.model, ctx.budget
    row = (model.spec.channels, model.spec.height, model.spec.width)
    best = []
    for backward in (False, True):
        cap = rows_per_chunk(model.module, row, budget, device=model.device, backward=backward)
        measured_rows(model.module, row, torch.float32, model.device, cap=cap, backward=backward)
        curve = curve_for(model.module, row, torch.float32, model.device, backward=backward)
        best.append(min(curve.per_row_s.values()) if curve is not None and curve.per_row_s else 0.0)
    return best[0], best[1]


def _targets(ctx: WorkerContext, spec: js.EvaluationSpec, x: Tensor) -> Tensor:
    """The class each map explains `# (N,)`: the given indices, else the model's top-1 class."""
    probs = None if spec.target.kind == "indices" else torch.softmax(_logits(ctx, ctx.model.module, x), dim=1)
    targets, _ = resolve_targets(spec.target, probs, ctx.model.num_classes, x.shape[0], x.device)
    return targets.clone()


def _logits(ctx: WorkerContext, module, x: Tensor) -> Tensor:
    """`module`'s logits `# (N, classes)` float32, in inference chunks of the memory budget."""
    size = rows_per_chunk(ctx.model.module, tuple(x.shape[1:]), ctx.budget, device=x.device, backward=False)
    with torch.inference_mode():
        return torch.cat([module(x[c]).float() for c in iter_chunks(x.shape[0], size)])


def _timed(runner: MethodRunner, labels, seconds: float) -> None:
    for label in labels:
        runner.seconds[label] += seconds / max(1, len(labels))


def _curves(spec, module, x, maps, targets, ctx, outcomes, phases, runner) -> None:
    opts, wanted = spec.options, set(spec.metrics)
    for mode, baselines in ((js.DELETION, opts.deletion_baselines), (js.INSERTION, opts.insertion_baselines)):
        if mode not in wanted:
            continue
        for baseline in baselines:
            phases.start(f"{mode}:{baseline}")
            started = time.perf_counter()
            config = CurveConfig(mode=mode, baseline=baseline, steps=opts.curve_steps, patch=opts.patch_size,
                                 seed=opts.seed)
            result = perturbation_curves(module, x, {k: v.abs().to(x.device) for k, v in maps.items()}, targets,
                                         config, budget=ctx.budget)
            for label, curves in result.methods.items():
                out = outcomes[label]
                out.metrics.append(metric_data(mode, baseline, "auc", curves.curves.auc.values, opts))
                out.metrics.append(above(metric_data(mode, baseline, "gain_vs_random", curves.gain.values, opts), 0.0))
                out.curves.append(js.CurveData(mode, baseline, curves.curves.fractions.astype("float32"),
                                               curves.curves.probs.mean(axis=0).astype("float32"),
                                               result.random.probs.mean(axis=0).astype("float32")))
            _timed(runner, list(outcomes), time.perf_counter() - started)
            phases.end(f"{mode}:{baseline}")


def _localisation(spec, maps, outcomes, runner) -> None:
    wanted = set(spec.metrics)
    for label, out in outcomes.items():
        started = time.perf_counter()
        result = localisation(maps[label], masks=spec.regions, seed=spec.options.seed)
        chance = float(result.area.aggregate.mean)
        for metric, statistic, values in ((js.POINTING_GAME, "hit", result.pointing_game.values),
                                          (js.IOU, "iou", result.iou.values),
                                          (js.ENERGY_IN_BOX, "energy", result.energy_in_box.values)):
            if metric in wanted:
                out.metrics.append(above(metric_data(metric, "", statistic, values, spec.options), chance))
        runner.seconds[label] += time.perf_counter() - started


def _randomization(metric: str, mode: str, results, outcomes, spec) -> None:
    opts = spec.options
    for label, result in results.items():
        out = outcomes[label]
        means = [step.spearman.aggregate.mean for step in result.steps]
        decisive = (min(range(len(means)), key=lambda i: means[i]) if mode == "independent" else len(means) - 1)
        step = result.steps[decisive]
        rho = metric_data(metric, mode, "spearman", step.spearman.values, opts)
        rho.reference, rho.passed = float(result.threshold), bool(result.passed)
        out.metrics += [rho, metric_data(metric, mode, "ssim", step.ssim.values, opts)]
        out.randomization.append(randomization_figure(result, mode or "data", spec.example_items))


def _stability(spec, ctx, x, maps, targets, outcomes, runner) -> None:
    opts, module = spec.options, ctx.model.module
    predicted = _logits(ctx, module, x).argmax(dim=1)
    for index, (name, amount) in enumerate(opts.augmentations):
        aug = _augmentation(name, amount)
        changed = augment(x, aug, opts.seed + index)
        moved = runner.maps(module, changed, targets)
        kept = (_logits(ctx, module, changed).argmax(dim=1) == predicted).float()
        for label, out in outcomes.items():
            base, other = maps[label], moved[label]
            a, b = overlap(base, other, *aug.offset) if aug.kind == "shift" else (base, other)
            out.metrics.append(metric_data(js.STABILITY, name, "spearman", spearman(a, b), opts))
            out.metrics.append(metric_data(js.STABILITY, name, "prediction_kept", kept, opts))


def _discrimination(spec, ctx, x, outcomes, runner) -> None:
    k, module = spec.options.top_k, ctx.model.module
    logits = _logits(ctx, module, x)
    if not 2 <= k <= logits.shape[1]:
        raise InvalidArgument.field("evaluation.options.top_k", f"must be in 2..{logits.shape[1]}, got {k}")
    classes = logits.topk(k, dim=1).indices  # (N, k)
    rows = x.repeat_interleave(k, dim=0)  # (N*k, C, H, W): item-major, class-minor
    items = torch.arange(x.shape[0]).repeat_interleave(k)  # each row's item: its per-item baseline
    maps = runner.maps(module, rows, classes.reshape(-1), items=items)
    for label, out in outcomes.items():
        stacked = maps[label].view(x.shape[0], k, *maps[label].shape[1:])  # (N, k, H, W)
        out.metrics.append(metric_data(js.CLASS_DISCRIMINATION, "", "spearman", mean_pairwise_spearman(stacked),
                                       spec.options))
