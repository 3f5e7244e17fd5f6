"""The client's messages: numpy (or torch) to wire tensors, ExplainRequest from keywords, and the
answer as numpy (`Explanation`), with the typed error a failed call raises (`ServiceError`).

Needs only numpy, grpc and the generated messages; service/client.py adds the channels and the calls.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service._proto import attribution_pb2 as pb
from workers.methods import METHODS

_NUMPY_DTYPES = {np.dtype(np.float32): pb.FLOAT32, np.dtype(np.float16): pb.FLOAT16, np.dtype(np.uint8): pb.UINT8}
_WIRE_DTYPES = {pb.DTYPE_UNSPECIFIED: np.float32, pb.FLOAT32: np.float32, pb.FLOAT16: np.float16,
                pb.UINT8: np.uint8}
# Which `params` member of ExplainRequest each method reads, and the keywords it takes.
_FAMILY = {getattr(pb, m.proto): m.params for m in METHODS}
_FAMILY_KEYWORDS = {"gradient": {"absolute"}, "noise": {"samples", "noise_fraction"},
                    "integrated_gradients": {"steps", "rule", "baseline", "blur_sigma"},
                    "cam": {"layer", "also"}, "score_cam": {"layer", "top_k_channels"},
                    "occlusion": {"patch_size", "stride", "baseline_value"},
                    "rise": {"masks", "grid", "keep_probability"}, "xrai": {"steps", "segmentation_scales"},
                    "expected_gradients": {"samples", "noise_stdev", "reference"},
                    "blur_ig": {"steps", "max_sigma"},
                    "guided_ig": {"steps", "fraction", "baseline", "blur_sigma"}}
# Friendly names: the workers' "vanilla", normalization "none", audit "on"/"off".
_ALIASES = {("Method", "VANILLA"): "VANILLA_GRADIENT", ("Normalization", "NONE"): "NO_NORMALIZATION",
            ("AuditMode", "ON"): "AUDIT_ON", ("AuditMode", "OFF"): "AUDIT_OFF"}


class ServiceError(grpc.RpcError):
    """A failed call: `code()` and `details()` as on grpc.Call, plus the rich details."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Sequence[tuple[str, str]] = ()):
        super().__init__(f"{code.name}: {message}")
        self.status_code, self.message, self.violations = code, message, list(violations)

    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> "ServiceError":
        violations = []
        try:
            status = rpc_status.from_call(exc)
        except (ValueError, AttributeError):
            status = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
        message = exc.details() or ""
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message:
            # gRPC's own message-size refusal, before the service sees the request
            message += ("; send PNG/JPEG bytes instead of raw tensors, downscale the images, or send fewer "
                        "items per request (the server's limit: server.max_message_bytes)")
        return cls(exc.code(), message, violations)


# ------------------------------------------------------------- requests --

def enum_names(enum_type) -> list[str]:
    """The lower-case names `build_request` accepts for an enum (aliases not included)."""
    return [k.lower() for k in enum_type.keys() if not k.endswith("UNSPECIFIED")]


def enum_from_name(enum_type, value: Any) -> int:
    """The enum value for a name or int; ValueError naming the choices otherwise."""
    return _enum(enum_type, value)


def _enum(enum_type, value: Any) -> int:
    """An enum value from an int or a (case-insensitive) name such as "smoothgrad" or "nhwc"."""
    if isinstance(value, int):
        return value
    name = str(value).upper()
    name = _ALIASES.get((enum_type.DESCRIPTOR.name, name), name)
    if name not in enum_type.keys():
        choices = ", ".join(enum_names(enum_type))
        raise ValueError(f"unknown {enum_type.DESCRIPTOR.name} {value!r}; one of: {choices}")
    return enum_type.Value(name)


def tensor_from_array(array: Any, layout: str | int = "NCHW") -> pb.Tensor:
    """A numpy array or torch tensor (float32, float16 or uint8; float64 is cast) as a wire Tensor."""
    if hasattr(array, "detach"):  # torch, without importing it
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    if a.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"arrays must be float32, float16 or uint8, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return pb.Tensor(data=a.tobytes(), dtype=_NUMPY_DTYPES[a.dtype.newbyteorder("=")], shape=list(a.shape),
                     layout=_enum(pb.Layout, layout))


def array_from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A wire Tensor as a writable numpy array of its dtype and shape."""
    dtype = np.dtype(_WIRE_DTYPES[tensor.dtype]).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape)).astype(dtype.newbyteorder("="))


def _image_bytes(image: str | pathlib.Path | bytes) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else pathlib.Path(image).read_bytes()


def _set_params(request: pb.ExplainRequest, params: dict[str, Any], layout: str | int) -> None:
    family = _FAMILY.get(request.method)
    unknown = set(params) - _FAMILY_KEYWORDS.get(family, set())
    if unknown:
        raise TypeError(f"{pb.Method.Name(request.method).lower()} takes no {', '.join(sorted(unknown))}; "
                        f"it takes {', '.join(sorted(_FAMILY_KEYWORDS.get(family, ()))) or 'no parameters'}")
    if not params:
        return
    target = getattr(request, family)
    for key, value in params.items():
        if key == "rule":
            target.rule = _enum(pb.IntegrationRule, value)
        elif key == "baseline":
            if isinstance(value, (str, int)):
                target.baseline.kind = _enum(pb.BaselineKind, value)
            else:
                target.baseline.kind = pb.CUSTOM
                target.baseline.tensor.CopyFrom(tensor_from_array(value, layout))
        elif key == "reference":  # an array of baselines: the request's own reference set
            target.reference.kind = pb.CUSTOM
            target.reference.tensor.CopyFrom(tensor_from_array(value, layout))
        elif key == "blur_sigma":
            target.baseline.blur_sigma = value
        elif key == "also":
            target.also.extend(_enum(pb.Method, m) for m in value)
        elif key == "segmentation_scales":
            target.segmentation_scales.extend(float(s) for s in value)
        else:
            setattr(target, key, value)


def build_request(inputs: Any = None, *, images: Sequence[str | pathlib.Path | bytes] | None = None,
                  method: str | int = "vanilla", model: str = "", target: int | Sequence[int] | None = None,
                  top_k: int | None = None, space: str | int = "pixels", layout: str | int = "NCHW",
                  reduction: str | int = 0, normalization: str | int = 0, dtype: str | int = 0,
                  png_overlay: bool = False, native_resolution: bool = False, seed: int = 0,
                  audit: str | int = 0, request_id: str = "", texts: Sequence[str] | None = None,
                  token_ids: Sequence[Sequence[int]] | None = None, **params: Any) -> pb.ExplainRequest:
    """An ExplainRequest from Python values; `params` are the method's parameters (samples=, steps=, ...).

    Text models take `texts` (raw strings, tokenized by the server) or `token_ids` (one id sequence per item,
    any lengths: the server pads and masks them) instead of `inputs`/`images`."""
    if sum(x is not None for x in (inputs, images, texts, token_ids)) != 1:
        raise ValueError("give exactly one of inputs (an array), images (paths or encoded bytes), texts (strings) "
                         "or token_ids (id sequences)")
    request = pb.ExplainRequest(request_id=request_id, model=model, method=_enum(pb.Method, method), seed=seed,
                                audit=_enum(pb.AuditMode, audit))
    if texts is not None:
        request.inputs.texts.texts.extend([texts] if isinstance(texts, str) else list(texts))
    elif token_ids is not None:
        request.inputs.tokens.sequences.extend(pb.TokenSequence(ids=[int(i) for i in ids]) for ids in token_ids)
    elif images is not None:
        request.inputs.images.images.extend(_image_bytes(i) for i in images)
    else:
        request.inputs.tensor.CopyFrom(tensor_from_array(inputs, layout))
        request.inputs.space = _enum(pb.InputSpace, space)
    if top_k is not None:
        request.target.top_k = top_k
    elif target is not None:
        request.target.class_indices.indices.extend([target] if isinstance(target, int) else list(target))
    out = request.output
    out.reduction, out.normalization = _enum(pb.ChannelReduction, reduction), _enum(pb.Normalization, normalization)
    out.dtype, out.png_overlay, out.native_resolution = _enum(pb.DType, dtype), png_overlay, native_resolution
    _set_params(request, params, layout)
    return request


def method_keywords(method: str | int) -> frozenset[str]:
    """The parameter keywords `build_request` takes for `method` (e.g. {"layer", "also"} for grad_cam)."""
    return frozenset(_FAMILY_KEYWORDS.get(_FAMILY.get(_enum(pb.Method, method)), ()))


# -------------------------------------------------------------- results --

@dataclass
class Attribution:
    method: str                  # lower-case Method name, e.g. "grad_cam"
    target: int
    target_score: float
    map: np.ndarray              # (H, W) or (C, H, W), in the requested dtype
    native_map: np.ndarray | None = None
    png_overlay: bytes | None = None
    completeness_error: float | None = None
    completeness_error_absolute: float | None = None
    map_sha256: str = ""


@dataclass
class ItemResult:
    predicted_classes: list[int]
    predicted_scores: list[float]
    attributions: list[Attribution]
    input_sha256: str
    # For an item sent as an encoded image: where the model's input lay in it (proto SourceGeometry;
    # service.render.photo_box turns it into a rectangle of the photo). None for tensor inputs.
    geometry: pb.SourceGeometry | None = None
    # Text models: the item's tokens and ids (padding excluded); each map has one score per token.
    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Explanation:
    """One answered request; `error` is set (and `items` empty) for a failed streamed request."""

    request_id: str
    model: str
    model_version: str
    method: str
    items: list[ItemResult]
    timings: dict[str, float]
    error: ServiceError | None = None
    response: pb.ExplainResponse | None = field(default=None, repr=False)

    @property
    def maps(self) -> np.ndarray:
        """Every map, `(N, maps per item, ...)`."""
        return np.stack([np.stack([a.map for a in item.attributions]) for item in self.items])

    @property
    def predictions(self) -> list[int]:
        """Top-1 class of each item."""
        return [item.predicted_classes[0] for item in self.items]

    @classmethod
    def from_response(cls, response: pb.ExplainResponse) -> "Explanation":
        error = None
        if response.HasField("error"):
            code = next((c for c in grpc.StatusCode if c.value[0] == response.error.code), grpc.StatusCode.UNKNOWN)
            error = ServiceError(code, response.error.message)
        items = [ItemResult(list(i.predicted_classes), list(i.predicted_scores), [
            Attribution(method=pb.Method.Name(a.method).lower(), target=a.target, target_score=a.target_score,
                        map=array_from_tensor(a.map),
                        native_map=array_from_tensor(a.native_map) if a.HasField("native_map") else None,
                        png_overlay=a.png_overlay or None,
                        completeness_error=a.completeness_error if a.HasField("completeness_error") else None,
                        completeness_error_absolute=(a.completeness_error_absolute
                                                     if a.HasField("completeness_error_absolute") else None),
                        map_sha256=a.map_sha256) for a in i.attributions], i.input_sha256,
                            i.geometry if i.HasField("geometry") else None, list(i.tokens), list(i.token_ids))
                 for i in response.items]
        t = response.timings
        timings = {"queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "total_ms": t.total_ms,
                   "batch_samples": t.batch_samples, "batch_requests": t.batch_requests}
        return cls(response.request_id, response.model, response.model_version,
                   pb.Method.Name(response.method).lower(), items, timings, error, response)


# -------------------------------------------------------------- clients --


# ----------------------------------------------------------- evaluation --

def build_evaluation(inputs: Any = None, *, images: Sequence[str | pathlib.Path | bytes] | None = None,
                     dataset: str = "", methods: Sequence[str | int | dict] = ("grad_cam", "integrated_gradients"),
                     model: str = "", target: int | Sequence[int] | None = None, metrics: Sequence[str | int] = (),
                     boxes: Sequence[Sequence[int]] | None = None, shuffled_labels_model: str = "",
                     space: str | int = "pixels", layout: str | int = "NCHW", **options: Any) -> pb.EvaluationRequest:
    """An EvaluationRequest from Python values (docs/faithfulness.md, *The evaluation job*).

    Exactly one of `inputs` (an array), `images` (paths or encoded bytes) or `dataset` (a server data set).
    methods: names ("grad_cam"), enum values, or dicts with "method" and its parameters
    ({"method": "integrated_gradients", "steps": 16}, {"method": "grad_cam", "layer": "layer3"}).
    boxes: one (top, left, bottom, right) per item, in model input pixels (bottom/right exclusive).
    options: EvaluationOptions fields (curve_steps=, baselines=[...], randomization_modes=[...], seed=, ...).
    """
    if (inputs is not None) + (images is not None) + bool(dataset) != 1:
        raise ValueError("give exactly one of inputs (an array), images (paths or encoded bytes) or dataset")
    request = pb.EvaluationRequest(model=model, dataset=dataset, shuffled_labels_model=shuffled_labels_model,
                                   metrics=[_enum(pb.Metric, m) for m in metrics])
    if images is not None:
        request.inputs.images.images.extend(_image_bytes(i) for i in images)
    elif inputs is not None:
        request.inputs.tensor.CopyFrom(tensor_from_array(inputs, layout))
        request.inputs.space = _enum(pb.InputSpace, space)
    if target is not None:
        request.target.class_indices.indices.extend([target] if isinstance(target, int) else list(target))
    for entry in methods:
        params = dict(entry) if isinstance(entry, dict) else {"method": entry}
        method = request.methods.add(method=_enum(pb.Method, params.pop("method")))
        _set_params(method, params, layout)
    for top, left, bottom, right in boxes or ():
        request.regions.add(box=pb.Box(top=top, left=left, bottom=bottom, right=right))
    for key, value in options.items():
        field = getattr(request.options, key)
        if isinstance(value, (list, tuple)):
            field.extend(value)
        else:
            setattr(request.options, key, value)
    return request
