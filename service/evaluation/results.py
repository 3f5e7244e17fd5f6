"""The offline worker's `EvaluationOutcome` as the wire `EvaluationResult`, and its `Recommendation`.

Every field is filled as its comment in proto/attribution/v1/attribution.proto says: per method its
MetricValues (per item, mean, bootstrap interval, and reference / passed where the metric has a chance
level or a threshold), its mean deletion / insertion curves beside the random order's, the
randomization figure's maps for the first items, example maps; the ranking, the recommendation, the
cost (rows, seconds, and the floor of those rows measured on the worker) and the first items' inputs
in pixel space.
"""
from __future__ import annotations

import numpy as np

from service import codec
from service._proto import attribution_pb2 as pb
from service.evaluation.validation import METRIC_ENUMS
from workers.evaluation.jobspec import EvaluationOutcome, EvaluationSpec, MetricData
from workers.spec import ModelDescription


def float_tensor(values) -> pb.Tensor:
    """A float32 array (any shape) as a wire tensor."""
    array = np.ascontiguousarray(np.asarray(values, dtype="<f4"))
    return pb.Tensor(data=array.tobytes(), dtype=pb.FLOAT32, shape=list(array.shape), layout=pb.NCHW)


def _metric(data: MetricData) -> pb.MetricValue:
    value = pb.MetricValue(metric=METRIC_ENUMS[data.metric], variant=data.variant, statistic=data.statistic,
                           per_item=[float(x) for x in data.per_item], mean=data.mean, ci_low=data.ci_low,
                           ci_high=data.ci_high, missing=data.missing)
    if data.reference is not None:
        value.reference = float(data.reference)
    if data.passed is not None:
        value.passed = bool(data.passed)
    return value


def evaluation_result(outcome: EvaluationOutcome, spec: EvaluationSpec, model: ModelDescription,
                      pinned: pb.EvaluationRequest, job_id: str, finished_unix_s: float) -> pb.EvaluationResult:
    """The wire result; `pinned` is the stored request (each method entry as it ran)."""
    result = pb.EvaluationResult(model=outcome.model, model_version=outcome.model_version,
                                 num_items=outcome.num_items, ranking=outcome.ranking,
                                 forward_rows=outcome.forward_rows, backward_rows=outcome.backward_rows,
                                 seconds=outcome.seconds, floor_seconds=outcome.floor_seconds)
    for index, method in enumerate(outcome.methods):
        entry = result.methods.add(label=method.label, seconds=method.seconds,
                                   metrics=[_metric(m) for m in method.metrics])
        entry.method.CopyFrom(pinned.methods[index])
        entry.method.method = codec.METHOD_ENUMS[method.method]
        for curve in method.curves:
            entry.curves.add(metric=METRIC_ENUMS[curve.metric], baseline=curve.baseline,
                             fractions=curve.fractions.tolist(), scores=curve.scores.tolist(),
                             random_scores=curve.random_scores.tolist())
        for figure in method.randomization:
            entry.randomization.add(mode=figure.mode, steps=figure.steps, maps=float_tensor(figure.maps),
                                    spearman=figure.spearman)
        if method.example_maps is not None:
            entry.example_maps.CopyFrom(float_tensor(method.example_maps))
    examples = codec.denormalize(spec.inputs[:spec.example_items], model)  # (items, C, H, W) pixel space
    result.example_inputs.CopyFrom(float_tensor(examples.numpy()))
    recommendation = recommendation_of(outcome, pinned, job_id, finished_unix_s)
    if recommendation is not None:
        result.recommendation.CopyFrom(recommendation)
    return result


def recommendation_of(outcome: EvaluationOutcome, pinned: pb.EvaluationRequest, job_id: str,
                      finished_unix_s: float) -> pb.Recommendation | None:
    """The recommended method (and its CAM layer), or None when the ranking recommended none."""
    if not outcome.recommended:
        return None
    index = next(i for i, m in enumerate(outcome.methods) if m.label == outcome.recommended)
    chosen = outcome.methods[index]
    return pb.Recommendation(method=codec.METHOD_ENUMS[chosen.method], cam_layer=chosen.params.layer,
                             evaluation_job_id=job_id, metrics=[METRIC_ENUMS[m] for m in outcome.ranked_by],
                             evaluated_unix_s=finished_unix_s)
