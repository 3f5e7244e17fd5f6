"""The parameters of the path methods, checked: Integrated Gradients, Expected Gradients (GradientSHAP),
Blur IG and Guided IG, with their baselines and reference sets decoded into model space.

Part of the front door's validation (service/validation.py): each function adds a field-level
violation naming the proto field to fix to `v` (validation's collector) and returns the
`MethodParams` the workers read, defaults filled in.
"""
from __future__ import annotations

import torch

from service import codec
from service._proto import attribution_pb2 as pb
from service.config import Limits
from workers.errors import InvalidArgument
from workers.kernels.path_rows import MAX_BLUR_IG_SIGMA
from workers.spec import MethodParams, ModelDescription

_DEFAULTS = MethodParams()
_MAX_BLUR_SIGMA = 64.0
MAX_REFERENCES = 4096  # baselines in a request's own reference set (workers/kernels/gradient_requests.py)


def check_item_shape(x: torch.Tensor, model: ModelDescription, field: str) -> None:
    got, want = tuple(x.shape[1:]), (model.channels, model.height, model.width)
    if got != want:
        raise InvalidArgument.field(field, f"items are (C, H, W) = {got}; model {model.name!r} takes {want}. "
                                           "Resize first, or send PNG/JPEG in inputs.images to have it done here")


def _steps(value: int, least: int, field: str, limits: Limits, v) -> int:
    steps = value or _DEFAULTS.steps
    if not least <= steps <= limits.max_steps:
        v.add(field, f"must be {least}..{limits.max_steps}, got {steps}")
    return int(steps)


def ig_params(p: pb.IntegratedGradientsParams, inputs: pb.Inputs, model: ModelDescription, limits: Limits,
              items: int, v) -> MethodParams:
    steps = _steps(p.steps, 1, "integrated_gradients.steps", limits, v)
    rule = codec.RULE_NAMES.get(p.rule)
    if rule is None:
        v.add("integrated_gradients.rule", f"unknown integration rule {p.rule}")
    elif rule == "riemann_trapezoid" and steps < 2:
        v.add("integrated_gradients.steps", "RIEMANN_TRAPEZOID needs steps >= 2")
    kind, sigma, tensor = _baseline(p.baseline, "integrated_gradients.baseline", inputs, model, items, v)
    return MethodParams(steps=steps, rule=rule or _DEFAULTS.rule, baseline=kind, blur_sigma=sigma,
                        baseline_tensor=tensor)


def guided_ig_params(p: pb.GuidedIgParams, inputs: pb.Inputs, model: ModelDescription, limits: Limits,
                     items: int, v) -> MethodParams:
    steps = _steps(p.steps, 2, "guided_ig.steps", limits, v)
    fraction = p.fraction or _DEFAULTS.fraction
    if not 0.0 < fraction <= 1.0:  # NaN fails too
        v.add("guided_ig.fraction", f"must be in (0, 1], got {fraction}")
    kind, sigma, tensor = _baseline(p.baseline, "guided_ig.baseline", inputs, model, items, v)
    return MethodParams(steps=steps, fraction=float(fraction), baseline=kind, blur_sigma=sigma, baseline_tensor=tensor)


def blur_ig_params(p: pb.BlurIgParams, limits: Limits, v) -> MethodParams:
    steps = _steps(p.steps, 1, "blur_ig.steps", limits, v)
    sigma = p.max_sigma or _DEFAULTS.max_sigma
    if not 0.0 < sigma <= MAX_BLUR_IG_SIGMA:
        v.add("blur_ig.max_sigma", f"must be in (0, {MAX_BLUR_IG_SIGMA:g}] pixels, got {sigma}")
    return MethodParams(steps=steps, max_sigma=float(sigma))


def expected_gradients_params(p: pb.ExpectedGradientsParams, inputs: pb.Inputs, model: ModelDescription,
                              limits: Limits, v) -> MethodParams:
    samples = p.samples or _DEFAULTS.samples
    if not 1 <= samples <= limits.max_samples:
        v.add("expected_gradients.samples", f"must be 1..{limits.max_samples}, got {samples}")
    if not 0.0 <= p.noise_stdev <= 1.0:  # NaN fails too
        v.add("expected_gradients.noise_stdev", f"must be 0..1 (a fraction of each item's value range), "
                                                f"got {p.noise_stdev}")
    field, references = "expected_gradients.reference", None
    kind = p.reference.kind
    if kind == pb.CUSTOM:
        references = _custom_tensor(p.reference, f"{field}.tensor", inputs, model, 0, v)
    elif kind != pb.BASELINE_KIND_UNSPECIFIED:
        v.add(f"{field}.kind", "baselines are drawn from a reference set: leave the kind unset for the model's own "
                               "(ModelInfo.has_reference_set) or set CUSTOM with the baselines as its tensor")
    elif p.reference.HasField("tensor"):
        v.add(f"{field}.tensor", "is read only with kind CUSTOM")
    elif not model.has_reference_set:
        v.add(field, f"model {model.name!r} has no reference set (ModelInfo.has_reference_set is false): send the "
                     "baselines to draw from as kind CUSTOM with a tensor shaped like the inputs, or configure "
                     f"models[{model.name}].reference_set on the server")
    return MethodParams(samples=int(samples), noise_stdev=float(p.noise_stdev), baseline_tensor=references)


def _baseline(baseline: pb.Baseline, field: str, inputs: pb.Inputs, model: ModelDescription, items: int,
              v) -> tuple[str, float, torch.Tensor | None]:
    """(kind name, blur sigma, custom tensor `# (1 or N, C, H, W)`) of a path's starting Baseline."""
    kind = codec.BASELINE_NAMES.get(baseline.kind)
    if kind is None:
        v.add(f"{field}.kind", f"unknown baseline kind {baseline.kind}")
    elif (kind == "pad_token") != (model.modality == "text") and kind != "zero":
        v.add(f"{field}.kind", "text models take ZERO (zero embeddings) or PAD_TOKEN (the pad token's embedding)"
              if model.modality == "text" else "PAD_TOKEN is for text models; image models take ZERO, BLACK, "
              "BLURRED, UNIFORM_NOISE, DATASET_MEAN or CUSTOM")
        kind = None
    sigma = baseline.blur_sigma or _DEFAULTS.blur_sigma
    if kind == "blurred" and not 0.0 < sigma <= _MAX_BLUR_SIGMA:
        v.add(f"{field}.blur_sigma", f"must be in (0, {_MAX_BLUR_SIGMA:g}], got {sigma}")
    tensor = None
    if kind == "custom":
        tensor = _custom_tensor(baseline, f"{field}.tensor", inputs, model, items, v)
    elif baseline.HasField("tensor"):
        v.add(f"{field}.tensor", "is read only with baseline kind CUSTOM")
    return kind or _DEFAULTS.baseline, float(sigma) if kind == "blurred" else _DEFAULTS.blur_sigma, tensor


def _custom_tensor(baseline: pb.Baseline, field: str, inputs: pb.Inputs, model: ModelDescription, items: int,
                   v) -> torch.Tensor | None:
    """A CUSTOM tensor in model space `# (K, C, H, W)`, in the inputs' space. items > 0: K must be 1 or
    items (a baseline per item); items == 0: any K up to MAX_REFERENCES (a reference set)."""
    if not baseline.HasField("tensor"):
        v.add(field, "kind CUSTOM needs a tensor")
        return None
    space = pb.PIXELS if inputs.HasField("images") else inputs.space
    try:
        raw = codec.decode_tensor(baseline.tensor, field)
        check_item_shape(raw, model, f"{field}.shape")
        if items and raw.shape[0] not in (1, items):
            raise InvalidArgument.field(f"{field}.shape", f"has {raw.shape[0]} items for {items} inputs; "
                                                          "give one, or one per item")
        if not items and raw.shape[0] > MAX_REFERENCES:
            raise InvalidArgument.field(f"{field}.shape", f"has {raw.shape[0]} baselines; at most {MAX_REFERENCES}")
        return codec.to_model_space(raw, space, model, f"{field}.dtype")
    except InvalidArgument as exc:
        v.extend(exc)
        return None
