"""EvaluationRequest + the served models + limits -> a typed `EvaluationSpec` for the offline worker.

Every check happens at SubmitJob, so a bad evaluation fails the call, not the job, and each refusal is
a field-level `InvalidArgument` naming the proto path to fix (`evaluation.methods[1].integrated_gradients
.steps`). The inputs decode as an explanation job's do (the same decoder and limits, with the
evaluation's own item limit); each compared method is checked by the ExplainRequest checks themselves.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import uuid
from typing import Mapping

import numpy as np
import torch

from service._proto import attribution_pb2 as pb
from service.config import Limits
from service.decoding.pool import ImageDecoder
from service.jobs.config import EvaluationConfig
from service.validation import _Violations, _inputs, _method, _params, _target, resolve_model
from workers.errors import InvalidArgument
from workers.evaluation import jobspec as js
from workers.evaluation.perturbation import BASELINES
from workers.evaluation.randomization import MODES
from workers.methods import BY_NAME, COST_STEPS
from workers.spec import CAM_METHODS, ModelDescription

MAX_METHODS = 16
METRIC_NAMES = {getattr(pb, name.upper()): name for name in js.METRICS}
METRIC_ENUMS = {name: enum for enum, name in METRIC_NAMES.items()}
_AUGMENTATION_RANGES = {"noise": (0.0, 1.0), "shift": (1.0, None), "brightness": (-10.0, 10.0)}
_LAYER_PARAMS = ("cam", "score_cam")
_UNSET_FIELDS = ("model", "inputs", "target", "output", "request_id", "audit")


# Caps on the options whose cost grows with their value: each augmentation re-runs every method on every
# item, each class compared runs every method once more per item (and pairs grow as its square), and the
# bootstrap holds resamples x items indices per metric.
MAX_AUGMENTATIONS, MAX_DISCRIMINATION_CLASSES, MAX_BOOTSTRAP_SAMPLES = 8, 10, 10_000


@dataclasses.dataclass
class ValidatedEvaluation:
    """What SubmitJob stores and the runner runs: the spec, its model, the request with every default
    pinned (model, each method's CAM layer and seed), and the items' names (a data set's file names)."""

    spec: js.EvaluationSpec
    model: ModelDescription
    pinned: pb.EvaluationRequest
    item_names: list[str]


def validate_evaluation(request: pb.EvaluationRequest, models: Mapping[str, ModelDescription], limits: Limits,
                        config: EvaluationConfig, datasets: Mapping[str, tuple[pathlib.Path, ...]], *,
                        request_id: str = "", decoder: ImageDecoder | None = None) -> ValidatedEvaluation:
    """The checked evaluation (see the module docstring); `InvalidArgument` listing every mistake found."""
    model = resolve_model(request.model, models)
    if model.modality != "image":
        raise InvalidArgument.field("evaluation.model", f"model {model.name!r} is a {model.modality} model; the "
                                    "evaluation's metrics (pixel deletion, localisation, image augmentations) "
                                    "are for image models")
    v = _Violations()
    item_limits = dataclasses.replace(limits, max_items=config.max_items)
    inputs, names = _items(request, model, item_limits, datasets, v, decoder)
    items = int(inputs.shape[0]) if inputs is not None else 0
    target = _prefixed(v, lambda w: _target(request.target, model, item_limits, items, w))
    if request.target.WhichOneof("kind") == "top_k":
        v.add("evaluation.target.top_k", "an evaluation explains one class per item; use class_indices, or "
                                         "leave target unset for the predicted class")
    pinned = pb.EvaluationRequest()
    pinned.CopyFrom(request)
    pinned.model = model.name
    if request.dataset:
        pinned.ClearField("inputs")
    methods = _methods(request, pinned, model, limits, items, v)
    regions = _regions(request.regions, model, items, config.max_items, v)
    shuffled = _shuffled(request.shuffled_labels_model, model, models, v)
    options = _options(request.options, model, v)
    metrics = _metrics(request.metrics, regions is not None, bool(shuffled), methods, model, v)
    v.raise_if_any()
    options = dataclasses.replace(options, top_k=min(options.top_k, model.num_classes))
    spec = js.EvaluationSpec(model=model.name, request_id=request_id or uuid.uuid4().hex, inputs=inputs,
                             methods=tuple(methods), metrics=metrics, target=target, regions=regions,
                             shuffled_model=shuffled, options=options)
    return ValidatedEvaluation(spec, model, pinned, names)


def _prefixed(v: _Violations, check):
    """Runs a check of service/validation.py on its own violations, then files them under `evaluation.`."""
    inner = _Violations()
    value = check(inner)
    for item in inner.items:
        v.add(f"evaluation.{item.field}" if item.field else "evaluation", item.description)
    return value


def _items(request: pb.EvaluationRequest, model: ModelDescription, limits: Limits,
           datasets: Mapping[str, tuple[pathlib.Path, ...]], v: _Violations,
           decoder: ImageDecoder | None) -> tuple[torch.Tensor | None, list[str]]:
    """Model-space inputs `# (N, C, H, W)` from `inputs` or the named data set, and the items' names."""
    has_inputs = request.HasField("inputs") and request.inputs.WhichOneof("source") is not None
    if has_inputs == bool(request.dataset):
        v.add("evaluation.inputs", "set exactly one of inputs (tensor or encoded images) and dataset "
                                   f"(configured: {', '.join(sorted(datasets)) or 'none'})")
        return None, []
    if has_inputs:
        declared = (len(request.inputs.images.images) if request.inputs.HasField("images")
                    else int(request.inputs.tensor.shape[0]) if len(request.inputs.tensor.shape) == 4 else 1)
        inputs = _prefixed(v, lambda w: _inputs(request.inputs, model, limits, declared, w, decoder))[0]
        return inputs, []
    files = datasets.get(request.dataset)
    if files is None:
        v.add("evaluation.dataset", f"unknown data set {request.dataset[:64]!r}; this server has: "
                                    f"{', '.join(sorted(datasets)) or 'none (jobs.evaluation.datasets)'}")
        return None, []
    if len(files) > limits.max_items:
        v.add("evaluation.dataset", f"{request.dataset!r} has {len(files)} images; an evaluation scores at most "
                                    f"{limits.max_items} (jobs.evaluation.max_items)")
        return None, []
    try:
        images = [f.read_bytes() for f in files]
    except OSError as exc:
        v.add("evaluation.dataset", f"{request.dataset!r} cannot be read: {exc.strerror}")
        return None, []
    source = pb.Inputs(images=pb.EncodedImages(images=images))
    inputs = _prefixed(v, lambda w: _inputs(source, model, limits, len(images), w, decoder))[0]
    return inputs, [f.name for f in files]


def _methods(request: pb.EvaluationRequest, pinned: pb.EvaluationRequest, model: ModelDescription,
             limits: Limits, items: int, v: _Violations) -> list[js.EvalMethod]:
    if not request.methods:
        v.add("evaluation.methods", f"name the methods to compare (1..{MAX_METHODS}), each an ExplainRequest with "
                                    "`method` and its parameters")
        return []
    if len(request.methods) > MAX_METHODS:
        v.add("evaluation.methods", f"has {len(request.methods)} methods; at most {MAX_METHODS}")
        return []
    out, labels = [], set()
    space = pb.PIXELS if not request.HasField("inputs") or request.inputs.HasField("images") else request.inputs.space
    for index, entry in enumerate(request.methods):
        where = f"methods[{index}]"
        for name in _UNSET_FIELDS:
            set_ = entry.HasField(name) if name in ("inputs", "target", "output") else bool(getattr(entry, name))
            if set_:
                v.add(f"evaluation.{where}.{name}", "must be unset: the evaluation's own is used")
        if entry.method == pb.METHOD_UNSPECIFIED:
            v.add(f"evaluation.{where}.method", "must be set: name the method to compare")
            continue
        name = _prefixed(v, lambda w: _method(entry.method, model, True, _Renamed(w, where)))
        if not name:
            continue
        probe = pb.ExplainRequest()
        probe.CopyFrom(entry)
        probe.inputs.space = space  # a CUSTOM baseline is in the evaluation inputs' space
        params = _prefixed(v, lambda w: _params(probe, name, model, limits, items, _Renamed(w, where)))
        if params.also:
            v.add(f"evaluation.{where}.cam.also", "list each CAM variant as a method of its own (they share the "
                                                  "pass anyway)")
        label = name + (f"@{params.layer}" if params.layer and (name in CAM_METHODS or name == "score_cam") else "")
        while label in labels:
            label += "'"
        labels.add(label)
        seed = int(entry.seed) or int(request.options.seed)
        stored = pinned.methods[index]
        stored.seed = seed
        which = probe.WhichOneof("params") or BY_NAME[name].params
        if which in _LAYER_PARAMS and params.layer:
            getattr(stored, which).layer = params.layer
        out.append(js.EvalMethod(label, name, params, seed))
    return out


class _Renamed:
    """Violations of one method's params filed under `methods[i].`."""

    def __init__(self, v: _Violations, where: str):
        self.v, self.where = v, where

    def add(self, field: str, description: str) -> None:
        self.v.add(f"{self.where}.{field}", description)

    def extend(self, exc: InvalidArgument) -> None:
        for item in exc.violations or []:
            self.add(item.field, item.description)


def _regions(regions, model: ModelDescription, items: int, max_items: int, v: _Violations) -> torch.Tensor | None:
    """Ground truth `# (N, H, W)` bool, or None without regions (or when the items are not known)."""
    if not regions:
        return None
    if len(regions) > max_items or (items and len(regions) != items):
        v.add("evaluation.regions", f"has {len(regions)} regions for {items} items; give one per item, or none")
        return None
    if not items:  # the inputs were refused: nothing to hold the regions against (and no memory spent)
        return None
    h, w = model.height, model.width
    masks = torch.zeros((len(regions), h, w), dtype=torch.bool)
    for i, region in enumerate(regions):
        field = f"evaluation.regions[{i}]"
        shape = region.WhichOneof("shape")
        if shape == "box":
            b = region.box
            if not (b.top < b.bottom <= h and b.left < b.right <= w):
                v.add(f"{field}.box", f"must satisfy top < bottom <= {h} and left < right <= {w} (model input "
                                      f"pixels, bottom/right exclusive), got ({b.top}, {b.left}, {b.bottom}, {b.right})")
                continue
            masks[i, b.top:b.bottom, b.left:b.right] = True
        elif shape == "mask":
            mask = _mask(region.mask, h, w, f"{field}.mask", v)
            if mask is not None:
                masks[i] = mask
        else:
            v.add(field, "set box or mask")
    return masks


def _mask(tensor: pb.Tensor, h: int, w: int, field: str, v: _Violations) -> torch.Tensor | None:
    dtypes = {pb.DTYPE_UNSPECIFIED: np.float32, pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.UINT8: np.uint8}
    if tensor.dtype not in dtypes:
        v.add(f"{field}.dtype", f"unknown dtype {tensor.dtype}")
        return None
    if list(tensor.shape) != [h, w]:
        v.add(f"{field}.shape", f"must be [{h}, {w}] (the model's input size), got {list(tensor.shape)}")
        return None
    dtype = np.dtype(dtypes[tensor.dtype])
    if len(tensor.data) != h * w * dtype.itemsize:
        v.add(f"{field}.data", f"has {len(tensor.data)} bytes; [{h}, {w}] {dtype.name} needs {h * w * dtype.itemsize}")
        return None
    mask = torch.from_numpy(np.frombuffer(tensor.data, dtype=dtype.newbyteorder("<")).reshape(h, w) != 0)
    if not bool(mask.any()):
        v.add(field, "has no pixel inside the region (nonzero = inside)")
        return None
    return mask


def _shuffled(name: str, model: ModelDescription, models: Mapping[str, ModelDescription], v: _Violations) -> str:
    if not name:
        return ""
    other = models.get(name)
    if other is None:
        v.add("evaluation.shuffled_labels_model", f"unknown model {name[:64]!r}; served: {', '.join(models)}")
        return ""
    if other.modality != "image":
        v.add("evaluation.shuffled_labels_model", f"model {name!r} is a {other.modality} model; give an image model")
        return ""
    if other.name == model.name:
        v.add("evaluation.shuffled_labels_model", "must be another model than the one evaluated")
        return ""
    same = ((other.channels, other.height, other.width, tuple(other.mean), tuple(other.std), other.num_classes)
            == (model.channels, model.height, model.width, tuple(model.mean), tuple(model.std), model.num_classes))
    if not same:
        v.add("evaluation.shuffled_labels_model", f"model {name!r} must take the same inputs (input_spec) and have "
                                                  f"the same classes as {model.name!r}")
        return ""
    return name


def _options(o: pb.EvaluationOptions, model: ModelDescription, v: _Violations) -> js.EvalOptions:
    d, f = js.EvalOptions(), "evaluation.options"
    steps, patch = o.curve_steps or d.curve_steps, o.patch_size or d.patch_size
    if not 1 <= steps <= 256:
        v.add(f"{f}.curve_steps", f"must be 1..256, got {steps}")
    side = min(model.height, model.width)
    if not 1 <= patch <= side:
        v.add(f"{f}.patch_size", f"must be 1..{side} (the input's smaller side), got {patch}")
    baselines = tuple(dict.fromkeys(o.baselines))
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        v.add(f"{f}.baselines", f"unknown {bad[:4]}; choose from {', '.join(BASELINES)}")
    modes = tuple(dict.fromkeys(o.randomization_modes)) or d.randomization_modes
    if any(m not in MODES for m in modes):
        v.add(f"{f}.randomization_modes", f"choose from {', '.join(MODES)}, got {list(modes)[:4]}")
    threshold = o.randomization_threshold if o.HasField("randomization_threshold") else d.randomization_threshold
    if not -1.0 <= threshold <= 1.0:
        v.add(f"{f}.randomization_threshold", f"must be a Spearman correlation in [-1, 1], got {threshold}")
    augmentations = _augmentations(o.augmentations, side, v) if o.augmentations else d.augmentations
    top_k = o.top_k or min(d.top_k, model.num_classes)
    most = min(model.num_classes, MAX_DISCRIMINATION_CLASSES)
    if o.top_k and not 2 <= o.top_k <= most:
        v.add(f"{f}.top_k", f"must be 2..{most} (the model's classes, at most {MAX_DISCRIMINATION_CLASSES}), "
                            f"got {o.top_k}")
    samples = o.bootstrap_samples or d.bootstrap_samples
    if not 1 <= samples <= MAX_BOOTSTRAP_SAMPLES:
        v.add(f"{f}.bootstrap_samples", f"must be 1..{MAX_BOOTSTRAP_SAMPLES}, got {samples}")
    confidence = o.confidence if o.HasField("confidence") else d.confidence
    if not 0.0 < confidence < 1.0:
        v.add(f"{f}.confidence", f"must be in (0, 1), got {confidence}")
    return js.EvalOptions(curve_steps=int(steps), patch_size=int(patch),
                          deletion_baselines=baselines or d.deletion_baselines,
                          insertion_baselines=baselines or d.insertion_baselines, randomization_modes=modes,
                          randomization_threshold=float(threshold), augmentations=augmentations, top_k=int(top_k),
                          bootstrap_samples=int(samples), confidence=float(confidence), seed=int(o.seed))


def _augmentations(given, side: int, v: _Violations) -> tuple[tuple[str, float], ...]:
    defaults, out = dict(js.AUGMENTATION_DEFAULTS), []
    given = list(dict.fromkeys(given))  # each one re-runs every method on every item: once is enough
    if len(given) > MAX_AUGMENTATIONS:
        v.add("evaluation.options.augmentations", f"has {len(given)} augmentations; at most {MAX_AUGMENTATIONS}")
        return ()
    for i, text in enumerate(given):
        field = f"evaluation.options.augmentations[{i}]"
        name, _, amount = text.partition(":")
        if name not in defaults:
            v.add(field, f"unknown augmentation {text[:32]!r}; use noise:F, shift:PX or brightness:D")
            continue
        try:
            value = float(amount) if amount else defaults[name]
        except ValueError:
            v.add(field, f"{amount[:32]!r} is not a number")
            continue
        low, high = _AUGMENTATION_RANGES[name]
        high = side - 1 if high is None else high
        if not (math.isfinite(value) and low <= value <= high) or (name == "shift" and value != int(value)):
            v.add(field, f"{name} must be {'a whole number of pixels ' if name == 'shift' else ''}in "
                         f"[{low:g}, {high:g}], got {amount}")
            continue
        out.append((name, value))
    return tuple(out)


def _metrics(given, has_regions: bool, has_shuffled: bool, methods: list[js.EvalMethod],
             model: ModelDescription, v: _Violations) -> tuple[str, ...]:
    """The metrics to compute: the given ones (checked against the inputs), else every one they allow."""
    paths = any(BY_NAME[m.method].cost == COST_STEPS for m in methods if m.method in BY_NAME)
    allowed = {js.POINTING_GAME: has_regions, js.IOU: has_regions, js.ENERGY_IN_BOX: has_regions,
               js.DATA_RANDOMIZATION: has_shuffled, js.CLASS_DISCRIMINATION: model.num_classes >= 2}
    if not given:
        return tuple(m for m in js.METRICS if allowed.get(m, True))
    why = {js.DATA_RANDOMIZATION: "needs shuffled_labels_model",
           js.CLASS_DISCRIMINATION: "needs a model with at least 2 classes",
           js.COMPLETENESS: "applies to path methods (e.g. INTEGRATED_GRADIENTS); none is compared"}
    chosen = []
    for value in given:
        name = METRIC_NAMES.get(value)
        if name is None:
            v.add("evaluation.metrics", f"unknown metric {value}; one of: {', '.join(m.upper() for m in js.METRICS)}")
            continue
        ok = allowed.get(name, True) and (name != js.COMPLETENESS or paths or not methods)
        if not ok:
            reason = why.get(name, "needs regions: one box or mask per item")
            v.add("evaluation.regions" if name in js.LOCALISATION else "evaluation.metrics",
                  f"{name.upper()} {reason}")
        chosen.append(name)
    return tuple(m for m in js.METRICS if m in chosen)

