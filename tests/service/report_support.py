"""An EvaluationResult made from the metric library's real outputs on the demo model, for the report tests.

It runs workers/evaluation on demo items (deletion and insertion against the random order, the cascading
randomization check, localisation, class discrimination), times the evaluation and a forward-only floor of
the same rows, and packs every number into the proto the way the contract describes: nothing is typed in.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from service._proto import attribution_pb2 as pb
from service.client_messages import tensor_from_array
from workers.demo import DEMO_CAM_LAYER, to_model_space
from workers.evaluation import (CurveConfig, MetricResult, cam_attribute, class_discrimination, gradient_attribute,
                                localisation, perturbation_curves, randomization_check)

EXAMPLES = 4  # items shown in the figures


def _value(metric: int, result: MetricResult, statistic: str, variant: str = "", *,
           reference: float | None = None, passed: bool | None = None) -> pb.MetricValue:
    agg = result.aggregate
    value = pb.MetricValue(metric=metric, variant=variant, statistic=statistic, per_item=result.values.tolist(),
                           mean=agg.mean, ci_low=agg.ci_low, ci_high=agg.ci_high, missing=agg.missing)
    if reference is not None:
        value.reference = reference
    if passed is not None:
        value.passed = passed
    return value


def _normalized(maps: Tensor) -> np.ndarray:
    """`# (..., H, W)` min-max normalized per map, float32."""
    flat = maps.detach().float().flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view(maps.shape).numpy().astype(np.float32)


def library_result(model: nn.Module, pixels: Tensor, boxes: Tensor, *, steps: int = 8,
                   labels: Sequence[str] | None = None) -> pb.EvaluationResult:
    """Evaluates three served methods on `pixels` `# (N, 3, H, W)` in [0, 1] with watermark `boxes` `# (N, 4)`.

    labels: the method labels (default grad_cam@block4, vanilla_gradient, integrated_gradients); a test may
    pass hostile ones to check that the page escapes them.
    """
    started = time.perf_counter()
    inputs = to_model_space(pixels)
    with torch.no_grad():  # inference-mode tensors cannot enter the kernels' autograd
        targets = model(inputs).argmax(dim=1)
    labels = list(labels or ("grad_cam@block4", "vanilla_gradient", "integrated_gradients"))
    attributes = {labels[0]: cam_attribute(DEMO_CAM_LAYER), labels[1]: gradient_attribute("vanilla"),
                  labels[2]: gradient_attribute("integrated_gradients", steps=8)}
    requests = [pb.ExplainRequest(method=pb.GRAD_CAM, cam=pb.CamParams(layer=DEMO_CAM_LAYER)),
                pb.ExplainRequest(method=pb.VANILLA_GRADIENT),
                pb.ExplainRequest(method=pb.INTEGRATED_GRADIENTS,
                                  integrated_gradients=pb.IntegratedGradientsParams(steps=8))]
    maps, seconds = {}, {}
    for label, attribute in attributes.items():
        t0 = time.perf_counter()
        maps[label] = attribute(model, inputs, targets).abs()
        seconds[label] = time.perf_counter() - t0
    methods = {label: pb.MethodEvaluation(label=label, method=request, seconds=seconds[label])
               for label, request in zip(labels, requests)}
    rows = 0
    for mode, baseline, metric in (("deletion", "zero", pb.DELETION), ("insertion", "blur", pb.INSERTION)):
        curves = perturbation_curves(model, inputs, maps, targets, CurveConfig(mode, baseline, steps=steps))
        rows += curves.rows
        for label, result in curves.methods.items():
            gain = result.gain.aggregate
            methods[label].metrics.append(_value(metric, result.curves.auc, "auc", baseline))
            methods[label].metrics.append(_value(metric, result.gain, "gain_vs_random", baseline, reference=0.0,
                                                 passed=bool(gain.ci_low > 0)))
            methods[label].curves.append(pb.Curve(metric=metric, baseline=baseline,
                                                  fractions=result.curves.fractions.tolist(),
                                                  scores=result.curves.probs.mean(axis=0).tolist(),
                                                  random_scores=curves.random.probs.mean(axis=0).tolist()))
    checks = randomization_check(model, inputs, targets, attributes, mode="cascading")
    for label, check in checks.items():
        decisive = check.steps[-1].spearman
        methods[label].metrics.append(_value(pb.MODEL_RANDOMIZATION, decisive, "spearman", "cascading",
                                             reference=check.threshold, passed=check.passed))
        methods[label].metrics.append(_value(pb.MODEL_RANDOMIZATION, check.steps[-1].ssim, "ssim", "cascading"))
        stack = torch.stack([check.trained_maps] + check.randomized_maps)[:, :EXAMPLES]  # (S+1, items, H, W)
        methods[label].randomization.append(pb.RandomizationMaps(
            mode="cascading", steps=["trained"] + [", ".join(s.layers[-1:]) for s in check.steps],
            maps=tensor_from_array(_normalized(stack)), spearman=[1.0] + check.curve.tolist()))
        methods[label].example_maps.CopyFrom(tensor_from_array(_normalized(maps[label][:EXAMPLES])))
    for label, m in maps.items():
        found = localisation(m, boxes=boxes)
        methods[label].metrics.extend([_value(pb.POINTING_GAME, found.pointing_game, "hit"),
                                       _value(pb.IOU, found.iou, "iou"),
                                       _value(pb.ENERGY_IN_BOX, found.energy_in_box, "energy")])
        discrimination = class_discrimination(model, inputs, attributes[label], k=3)
        methods[label].metrics.append(_value(pb.CLASS_DISCRIMINATION, discrimination.correlation, "spearman"))
    ranking = _ranking(methods)
    floor = _floor_seconds(model, inputs, rows)
    first = methods[ranking[0]].method
    return pb.EvaluationResult(
        model="demo", model_version="0" * 64, num_items=len(pixels), methods=list(methods.values()),
        ranking=ranking, forward_rows=rows, backward_rows=0, seconds=time.perf_counter() - started,
        floor_seconds=floor, example_inputs=tensor_from_array(pixels[:EXAMPLES].float()),
        recommendation=pb.Recommendation(method=first.method, cam_layer=first.cam.layer,
                                         metrics=[pb.DELETION, pb.INSERTION]))


def _ranking(methods: dict[str, pb.MethodEvaluation]) -> list[str]:
    """Labels by mean rank over the deletion AUC (lower first) and the insertion AUC (higher first)."""
    def auc(label: str, metric: int) -> float:
        return next(v.mean for v in methods[label].metrics if v.metric == metric and v.statistic == "auc")

    labels = list(methods)
    by_deletion = sorted(labels, key=lambda m: auc(m, pb.DELETION))
    by_insertion = sorted(labels, key=lambda m: -auc(m, pb.INSERTION))
    return sorted(labels, key=lambda m: (by_deletion.index(m) + by_insertion.index(m), labels.index(m)))


def _floor_seconds(model: nn.Module, inputs: Tensor, rows: int) -> float:
    """Wall time of `rows` plain forward rows of these inputs, in chunks of 64."""
    batch = inputs.repeat((64 + len(inputs) - 1) // len(inputs), 1, 1, 1)[:64]
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(max(1, rows // 64)):
            model(batch)
    return time.perf_counter() - started
