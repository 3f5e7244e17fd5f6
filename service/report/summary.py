"""An EvaluationResult read for people: the ranking, each method's metric means with their intervals, its
pass / fail marks, and the cost, as plain values (for evaluation.json) and as a compact text table (stdout).

Pure protobuf and the standard library: no numpy, no torch, no server.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from service._proto import attribution_pb2 as pb

# Metrics where every statistic is better low: correlations with a randomized model's maps or between classes.
_LOWER_IS_BETTER = (pb.MODEL_RANDOMIZATION, pb.DATA_RANDOMIZATION, pb.CLASS_DISCRIMINATION)
RANDOMIZATION_METRICS = (pb.MODEL_RANDOMIZATION, pb.DATA_RANDOMIZATION)
CURVE_METRICS = (pb.DELETION, pb.INSERTION)


def metric_name(metric: int) -> str:
    """The metric's lower-case enum name, e.g. "deletion" (its number when this client does not know it)."""
    try:
        return pb.Metric.Name(metric).lower()
    except ValueError:
        return f"metric_{metric}"


def method_name(method: int) -> str:
    try:
        return pb.Method.Name(method).lower()
    except ValueError:
        return f"method_{method}"


def better(value: pb.MetricValue) -> str:
    """"lower" or "higher": which way this value improves."""
    lower = (value.metric in _LOWER_IS_BETTER or (value.metric == pb.DELETION and value.statistic == "auc")
             or (value.metric == pb.COMPLETENESS and "within" not in value.statistic))  # an error, not a share
    return "lower" if lower else "higher"


def is_chance_comparison(value: pb.MetricValue) -> bool:
    """A deletion / insertion value judged against the random order (it carries `passed`)."""
    return value.metric in CURVE_METRICS and value.HasField("passed")


@dataclass(frozen=True)
class Column:
    """One column of the ranking table: a metric in one variant, shown by one statistic."""

    metric: int
    variant: str
    statistic: str

    @property
    def title(self) -> str:
        name = metric_name(self.metric)
        variant = f"/{self.variant}" if self.variant else ""
        statistic = "" if self.statistic in name else f" {self.statistic}"  # "iou iou" says it twice
        return f"{name}{variant}{statistic}"

    def find(self, method: pb.MethodEvaluation) -> pb.MetricValue | None:
        for value in method.metrics:
            if (value.metric, value.variant, value.statistic) == (self.metric, self.variant, self.statistic):
                return value
        return None


def columns(result: pb.EvaluationResult) -> list[Column]:
    """The ranking table's metric columns: one per (metric, variant) in order of first appearance, shown by
    its first statistic that is not a comparison with the random order (that one is a mark of its own)."""
    chosen: dict[tuple[int, str], Column] = {}
    fallback: dict[tuple[int, str], Column] = {}
    for method in result.methods:
        for value in method.metrics:
            key = (value.metric, value.variant)
            column = Column(value.metric, value.variant, value.statistic)
            fallback.setdefault(key, column)
            if key not in chosen and not is_chance_comparison(value):
                chosen[key] = column
    return [chosen.get(key, column) for key, column in fallback.items()]


def ordered_methods(result: pb.EvaluationResult) -> list[pb.MethodEvaluation]:
    """The methods in ranking order, then any the ranking does not name, in result order."""
    by_label = {m.label: m for m in result.methods}
    ranked = [by_label[label] for label in result.ranking if label in by_label]
    return ranked + [m for m in result.methods if m.label not in set(result.ranking)]


def verdict(method: pb.MethodEvaluation, kinds: Sequence[int]) -> tuple[bool | None, list[tuple[str, bool]]]:
    """Whether every judged value of `kinds` passed (None when none was judged), and each one's
    ("metric/variant", passed)."""
    marks = [(f"{metric_name(v.metric)}/{v.variant}" if v.variant else metric_name(v.metric), v.passed)
             for v in method.metrics if v.metric in kinds and v.HasField("passed")]
    return (all(p for _, p in marks) if marks else None), marks


def _number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def value_dict(value: pb.MetricValue) -> dict[str, Any]:
    out = {"metric": metric_name(value.metric), "variant": value.variant, "statistic": value.statistic,
           "mean": _number(value.mean), "ci_low": _number(value.ci_low), "ci_high": _number(value.ci_high),
           "missing": value.missing, "better": better(value)}
    if value.HasField("reference"):
        out["reference"] = _number(value.reference)
    if value.HasField("passed"):
        out["passed"] = value.passed
    return out


def ratio_to_floor(result: pb.EvaluationResult) -> float | None:
    return result.seconds / result.floor_seconds if result.floor_seconds > 0 else None


def recommended_label(result: pb.EvaluationResult) -> str | None:
    """The label of the recommended method (the first ranked entry of its method and CAM layer)."""
    if not result.HasField("recommendation") or result.recommendation.method == pb.METHOD_UNSPECIFIED:
        return None
    rec = result.recommendation
    for method in ordered_methods(result):
        layer = method.method.cam.layer if method.method.HasField("cam") else ""
        if method.method.method == rec.method and (not rec.cam_layer or layer in ("", rec.cam_layer)):
            return method.label
    return None


def summary(result: pb.EvaluationResult, item_names: Sequence[str] = ()) -> dict[str, Any]:
    """The numbers a reader looks for first, as JSON values (NaN as null)."""
    rec = result.recommendation
    methods = []
    for rank, method in enumerate(ordered_methods(result), start=1):
        randomization, _ = verdict(method, RANDOMIZATION_METRICS)
        chance, _ = verdict(method, CURVE_METRICS)
        methods.append({"rank": rank if method.label in result.ranking else None, "label": method.label,
                        "method": method_name(method.method.method),
                        "metrics": [value_dict(v) for v in method.metrics],
                        "randomization_passed": randomization, "beats_random_order": chance,
                        "seconds": method.seconds})
    return {
        "model": result.model, "model_version": result.model_version, "num_items": result.num_items,
        "item_names": list(item_names), "ranking": list(result.ranking),
        "recommendation": None if rec.method == pb.METHOD_UNSPECIFIED else {
            "label": recommended_label(result), "method": method_name(rec.method), "cam_layer": rec.cam_layer,
            "metrics": [metric_name(m) for m in rec.metrics], "evaluation_job_id": rec.evaluation_job_id},
        "methods": methods,
        "cost": {"seconds": result.seconds, "floor_seconds": result.floor_seconds,
                 "ratio_to_floor": ratio_to_floor(result), "forward_rows": result.forward_rows,
                 "backward_rows": result.backward_rows},
    }


def interval(value: pb.MetricValue | None, digits: int = 3) -> str:
    """"mean [low, high]" ("n/a" when the value is missing or NaN)."""
    if value is None or not math.isfinite(value.mean):
        return "n/a"
    if not (math.isfinite(value.ci_low) and math.isfinite(value.ci_high)):
        return f"{value.mean:.{digits}f}"
    return f"{value.mean:.{digits}f} [{value.ci_low:.{digits}f}, {value.ci_high:.{digits}f}]"


def mark(passed: bool | None) -> str:
    return "-" if passed is None else ("pass" if passed else "FAIL")


def ranking_table(result: pb.EvaluationResult) -> str:
    """The ranking as a compact text table: rank, label, the columns of the metrics the ranking used (the
    recommendation's; the first three columns when it names none), the two marks; then the recommendation
    and the cost on a line each. index.html has every metric."""
    ranked_by = set(result.recommendation.metrics)
    cols = [c for c in columns(result) if c.metric in ranked_by] or columns(result)[:3]
    header = ["#", "method"] + [c.title for c in cols] + ["randomization", "vs random order"]
    rows = [header]
    for rank, method in enumerate(ordered_methods(result), start=1):
        rows.append([str(rank) if method.label in result.ranking else "-", method.label]
                    + [interval(c.find(method)) for c in cols]
                    + [mark(verdict(method, RANDOMIZATION_METRICS)[0]), mark(verdict(method, CURVE_METRICS)[0])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    label = recommended_label(result)
    if label is not None:
        lines.append(f"recommended: {label}")
    ratio = ratio_to_floor(result)
    lines.append(f"cost: {result.seconds:.2f} s, {result.forward_rows} forward and {result.backward_rows} "
                 f"backward rows" + (f", {ratio:.1f}x the floor ({result.floor_seconds:.2f} s)" if ratio else ""))
    return "\n".join(lines)
