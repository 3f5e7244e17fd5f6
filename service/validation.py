"""ExplainRequest + the model's description + limits -> a typed `ExplainSpec`.

Every limit is checked here, before any work is queued, and every refusal is
a field-level `InvalidArgument` naming the proto field path to fix. Checks
that do not depend on each other are collected, so one round trip reports
all of a request's mistakes; a check whose input is already known bad is
skipped rather than reported twice.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Mapping

import torch

from service import codec, path_params
from service._proto import attribution_pb2 as pb
from service.config import Limits
from service.decoding.pool import ImageDecoder
from service.offline_params import rise_params, xrai_params
from service.text_inputs import TEXT_SOURCES, declared_text_items, image_inputs_refusal, text_inputs
from service.path_params import check_item_shape as _check_item_shape
from workers.errors import FieldViolation, InvalidArgument, ModelNotFound
from workers.methods import BY_NAME as METHODS_BY_NAME, METHODS
from workers.spec import (CAM_METHODS, ExplainSpec, MethodParams,
                          ModelDescription, OutputSpec, TargetSpec, request_cost)

_DEFAULTS = MethodParams()
# Which `params` oneof member each method reads.
_PARAMS_FIELD = {m.name: m.params for m in METHODS}
_AUDIT = {pb.AUDIT_MODE_UNSPECIFIED: None, pb.AUDIT_ON: True, pb.AUDIT_OFF: False}


def method_label(method: int) -> str:
    """The enum's proto name, for messages: SMOOTHGRAD, GRAD_CAM, ..."""
    return pb.Method.Name(method) if method in pb.Method.values() else str(method)


class _Violations:
    """Collects field violations; `raise_if_any` raises them as one InvalidArgument."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def extend(self, exc: InvalidArgument) -> None:
        self.items.extend(exc.violations or [FieldViolation("", exc.message)])

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(codec.violation_message(self.items), self.items)


def resolve_model(name: str, models: Mapping[str, ModelDescription]) -> ModelDescription:
    """The model a request names; empty = the default one. `ModelNotFound` otherwise."""
    if not name:
        default = next((m for m in models.values() if m.is_default), None)
        default = default or next(iter(models.values()), None)
        if default is None:
            raise ModelNotFound("(default)", [])
        return default
    if name not in models:
        raise ModelNotFound(name if len(name) <= 64 else name[:61] + "...", list(models))
    return models[name]


def validate_explain(request: pb.ExplainRequest, model: ModelDescription, limits: Limits, *,
                     offline: bool = False, request_id: str = "",
                     time_remaining: float | None = None, decoder: ImageDecoder | None = None) -> ExplainSpec:
    """The typed spec of `request` for `model` (see `resolve_model`).

    offline: the request comes from a job, so offline-only methods are allowed.
    request_id: the id to use when the request carries none (a fresh uuid4 hex otherwise).
    time_remaining: the call's remaining seconds (context.time_remaining()); None = no deadline.
    decoder: decodes `inputs.images`; the server passes its process pool (client bytes never meet a
        native decoder in the server's process); None = in-process Pillow, for trusted files only.
    """
    v = _Violations()
    rid = _request_id(request.request_id, limits, v) or request_id or uuid.uuid4().hex
    method = _method(request.method, model, offline, v)
    declared = _declared_items(request.inputs)
    mask, pixels = None, None
    if model.modality == "text":  # token ids and their mask (service/text_inputs.py)
        (inputs, mask), geometry = text_inputs(request.inputs, model, limits.max_items, v.items), ()
    else:
        inputs, geometry, pixels = _inputs(request.inputs, model, limits, declared, v, decoder)
    items = int(inputs.shape[0]) if inputs is not None else declared
    target = _target(request.target, model, limits, items, v)
    params = _params(request, method, model, limits, items, v) if method else _DEFAULTS
    output = _output(request.output, method, v)
    if model.modality == "text" and output.png_overlay:
        v.add("output.png_overlay", "text models have no image to draw over; leave it unset")
    if request.audit not in _AUDIT:
        v.add("audit", f"unknown audit mode {request.audit}")
    v.raise_if_any()
    deadline = time.time() + time_remaining if time_remaining is not None else None
    return ExplainSpec(model=model.name, method=method, inputs=inputs, request_id=rid, target=target,
                       params=params, output=output, seed=int(request.seed), audit=_AUDIT[request.audit],
                       deadline=deadline, geometry=geometry, attention_mask=mask, pixels_u8=pixels,
                       pixel_mean=model.mean if pixels is not None else (),
                       pixel_std=model.std if pixels is not None else ())


def estimate_cost(request: pb.ExplainRequest, limits: Limits) -> int | None:
    """The request's batching cost (ExplainSpec.cost) from its declared fields, without decoding anything.

    Used for admission before validation. None when a declared size is outside the
    limits: such a request is refused by validation with INVALID_ARGUMENT, never
    as overload, so it is admitted (or not) on its validated cost instead.
    """
    items = max(1, _declared_items(request.inputs))
    targets = max(1, request.target.top_k) if request.target.WhichOneof("kind") == "top_k" else 1
    # One params member is set at most: the others read 0.
    samples = request.noise.samples or request.expected_gradients.samples or _DEFAULTS.samples
    steps = (request.integrated_gradients.steps or request.blur_ig.steps or request.guided_ig.steps
             or _DEFAULTS.steps)
    if (items * targets > limits.max_items or targets > limits.max_top_k or samples > limits.max_samples
            or steps > limits.max_steps):
        return None
    return request_cost(codec.METHOD_NAMES.get(request.method, ""), items, targets, samples, steps)


def _request_id(rid: str, limits: Limits, v: _Violations) -> str:
    if len(rid) > limits.max_request_id_chars:
        v.add("request_id", f"has {len(rid)} characters; at most {limits.max_request_id_chars}")
    elif rid and not rid.isprintable():
        v.add("request_id", "must be printable characters")
    return rid


def _method(method: int, model: ModelDescription, offline: bool, v: _Violations) -> str:
    """The method's name, or "" (with a violation naming what the model serves) when it cannot run here."""
    choices = model.offline_methods if offline else model.online_methods
    listed = ", ".join(method_label(codec.METHOD_ENUMS[m]) for m in choices)
    if method == pb.METHOD_UNSPECIFIED and model.default_method in codec.METHOD_ENUMS:
        method = codec.METHOD_ENUMS[model.default_method]  # the model's adopted recommendation
    name = codec.METHOD_NAMES.get(method)
    if method == pb.METHOD_UNSPECIFIED or name is None:
        what = ("must be set (the model has no adopted default method)" if method == pb.METHOD_UNSPECIFIED
                else f"unknown method {method}")
        v.add("method", f"{what}; one of: {listed}")
        return ""
    if name not in model.offline_methods:  # served neither online nor by jobs
        v.add("method", f"model {model.name!r} does not support {method_label(method)}{_why_not(name, model)}; "
                        f"it supports: {listed}")
        return ""
    if name not in choices:
        v.add("method", f"{method_label(method)} is too expensive to run online; submit it as an offline job "
                        f"with SubmitJob, or choose one of: {listed}")
        return ""
    return name


def _why_not(name: str, model: ModelDescription) -> str:
    """Why a model does not serve a method of the table, from what the model declares."""
    row = METHODS_BY_NAME[name]
    if model.modality not in row.modalities:
        return f" ({method_label(codec.METHOD_ENUMS[name])} does not explain {model.modality} models)"
    if row.needs_layer and not model.cam_layers:
        return " (it reads a CAM layer, and the model declares none)"
    return ""


def _declared_items(inputs: pb.Inputs) -> int:
    """Items the request claims to carry, read before any decoding (0 = unknown)."""
    if inputs.HasField("images"):
        return len(inputs.images.images)
    if inputs.WhichOneof("source") in TEXT_SOURCES:
        return declared_text_items(inputs)
    shape = list(inputs.tensor.shape)
    return int(shape[0]) if len(shape) == 4 else 1 if len(shape) == 3 else 0


def _inputs(inputs: pb.Inputs, model: ModelDescription, limits: Limits, declared: int,
            v: _Violations, decoder: ImageDecoder | None) -> tuple[torch.Tensor | None, tuple, torch.Tensor | None]:
    """Model-space inputs `# (N, C, H, W)`; for encoded images, each one's SourceGeometry; for a uint8
    pixel tensor, the pixels themselves (N, C, H, W), which cross the Ray hop in their place
    (`ExplainSpec.pixels_u8`). None with violations added."""
    source = inputs.WhichOneof("source")
    if source is None:
        v.add("inputs", "set inputs.tensor (raw pixels or model-space values) or inputs.images (PNG/JPEG)")
        return None, (), None
    if source in TEXT_SOURCES:
        v.items.append(image_inputs_refusal(model, source))
        return None, (), None
    if source == "images" and declared == 0:
        v.add("inputs.images.images", "needs at least one image")
        return None, (), None
    if declared > limits.max_items:
        v.add(f"inputs.{source}", f"has {declared} items; at most {limits.max_items} per request")
        return None, (), None
    if inputs.space not in (pb.INPUT_SPACE_UNSPECIFIED, pb.PIXELS, pb.MODEL):
        v.add("inputs.space", f"unknown input space {inputs.space}; use PIXELS or MODEL")
        return None, (), None
    try:
        if source == "images":
            if inputs.space == pb.MODEL:
                raise InvalidArgument.field("inputs.space", "encoded images are pixel data; leave space unset "
                                                            "or PIXELS")
            x, geometry = codec.decode_images_with_geometry(inputs.images.images, model, limits.max_image_pixels,
                                                            "inputs.images.images", decoder)
            return x, geometry, None
        raw = codec.decode_tensor(inputs.tensor, "inputs.tensor")
        _check_item_shape(raw, model, "inputs.tensor.shape")
        x = codec.to_model_space(raw, inputs.space, model, "inputs.tensor.dtype")
        pixels = raw.contiguous() if raw.dtype == torch.uint8 else None
        return x, (), pixels
    except InvalidArgument as exc:
        v.extend(exc)
        return None, (), None


def _target(target: pb.Target, model: ModelDescription, limits: Limits, items: int,
            v: _Violations) -> TargetSpec:
    kind = target.WhichOneof("kind")
    if kind is None or kind == "predicted":
        return TargetSpec()
    if kind == "top_k":
        cap = min(model.num_classes, limits.max_top_k)
        if not 1 <= target.top_k <= cap:
            v.add("target.top_k", f"must be 1..{cap}, got {target.top_k}")
        elif items * target.top_k > limits.max_items:
            # Each target of each item is one explanation, one row of the kernels.
            v.add("target.top_k", f"{items} items x top_k {target.top_k} = {items * target.top_k} explanations; "
                                  f"at most {limits.max_items} per request (server.limits.max_items): send fewer "
                                  "items per request or a smaller top_k")
        return TargetSpec(kind="top_k", k=max(1, int(target.top_k)))
    indices = tuple(int(i) for i in target.class_indices.indices)
    field = "target.class_indices.indices"
    if not indices:
        v.add(field, "give one class index for every item, or one per item")
    elif items and len(indices) not in (1, items):
        v.add(field, f"has {len(indices)} indices for {items} items; give one, or one per item")
    bad = [i for i in indices if not 0 <= i < model.num_classes]
    if bad:
        v.add(field, f"{bad[:5]} out of range: model {model.name!r} has classes 0..{model.num_classes - 1}")
    return TargetSpec(kind="indices", indices=indices)


def _params(request: pb.ExplainRequest, method: str, model: ModelDescription, limits: Limits, items: int,
            v: _Violations) -> MethodParams:
    which, expected = request.WhichOneof("params"), _PARAMS_FIELD[method]
    if which is not None and which != expected:
        v.add(which, f"`{which}` parameters do not apply to {method_label(codec.METHOD_ENUMS[method])}; "
                     f"set `{expected}` or leave the parameters unset")
        return _DEFAULTS
    if expected == "gradient":
        return MethodParams(absolute=request.gradient.absolute)
    if expected == "noise":
        return _noise_params(request.noise, limits, v)
    if expected == "integrated_gradients":
        return path_params.ig_params(request.integrated_gradients, request.inputs, model, limits, items, v)
    if expected == "expected_gradients":
        return path_params.expected_gradients_params(request.expected_gradients, request.inputs, model, limits, v)
    if expected == "blur_ig":
        return path_params.blur_ig_params(request.blur_ig, limits, v)
    if expected == "guided_ig":
        return path_params.guided_ig_params(request.guided_ig, request.inputs, model, limits, items, v)
    if expected == "cam":
        return _cam_params(request.cam, method, model, v)
    if expected == "score_cam":
        layer = _cam_layer(request.score_cam.layer, "score_cam.layer", model, v)
        return MethodParams(layer=layer, top_k_channels=int(request.score_cam.top_k_channels))
    if expected == "rise":
        return rise_params(request.rise, v)
    if expected == "xrai":
        return xrai_params(request.xrai, limits, v)
    return _occlusion_params(request.occlusion, model, v)


def _noise_params(p: pb.NoiseParams, limits: Limits, v: _Violations) -> MethodParams:
    samples = p.samples or _DEFAULTS.samples
    if not 1 <= samples <= limits.max_samples:
        v.add("noise.samples", f"must be 1..{limits.max_samples}, got {samples}")
    # Field presence: an explicit 0 means no noise, unset means the default.
    fraction = p.noise_fraction if p.HasField("noise_fraction") else _DEFAULTS.noise_fraction
    if not 0.0 <= fraction <= 1.0:  # NaN fails too
        v.add("noise.noise_fraction", f"must be 0..1, got {fraction}")
    return MethodParams(samples=int(samples), noise_fraction=float(fraction))


def _cam_layer(layer: str, field: str, model: ModelDescription, v: _Violations) -> str:
    layer = layer or model.default_cam_layer
    if layer not in model.cam_layers:
        shown = layer if len(layer) <= 64 else layer[:61] + "..."
        v.add(field, f"model {model.name!r} has no CAM-able layer {shown!r}; choose one of: "
                     f"{', '.join(model.cam_layers) or '(none)'}")
    return layer


def _cam_params(p: pb.CamParams, method: str, model: ModelDescription, v: _Violations) -> MethodParams:
    layer = _cam_layer(p.layer, "cam.layer", model, v)
    also: list[str] = []
    for value in p.also:
        name = codec.METHOD_NAMES.get(value)
        if name not in CAM_METHODS:
            shared = ", ".join(method_label(codec.METHOD_ENUMS[m]) for m in CAM_METHODS)
            v.add("cam.also", f"{method_label(value)} is not a CAM variant; only {shared} can share the pass")
        elif name != method and name not in also:  # the method itself and repeats add no map
            also.append(name)
    return MethodParams(layer=layer, also=tuple(also))


def _occlusion_params(p: pb.OcclusionParams, model: ModelDescription, v: _Violations) -> MethodParams:
    side = min(model.height, model.width)
    patch = p.patch_size or _DEFAULTS.patch_size
    if not 1 <= patch <= side:
        v.add("occlusion.patch_size", f"must be 1..{side} (the input's smaller side), got {patch}")
    stride = p.stride or max(1, patch // 2)
    if stride > side:
        v.add("occlusion.stride", f"must be 1..{side}, got {stride}")
    if not math.isfinite(p.baseline_value):
        v.add("occlusion.baseline_value", "must be finite")
    return MethodParams(patch_size=int(patch), stride=int(stride), baseline_value=float(p.baseline_value))


def _output(o: pb.OutputOptions, method: str, v: _Violations) -> OutputSpec:
    chosen = {}
    for field, names in (("reduction", codec.REDUCTION_NAMES), ("normalization", codec.NORMALIZATION_NAMES),
                         ("dtype", codec.DTYPE_NAMES)):
        value = getattr(o, field)
        chosen[field] = names.get(value)
        if chosen[field] is None:
            v.add(f"output.{field}", f"unknown value {value}")
    # Only CAM maps have a native (layer) resolution; elsewhere the flag is moot.
    native = o.native_resolution and method in CAM_METHODS + ("score_cam",)
    return OutputSpec(reduction=chosen["reduction"] or "abs_max", normalization=chosen["normalization"] or "none",
                      dtype=chosen["dtype"] or "float32", png_overlay=o.png_overlay, native_resolution=native)
