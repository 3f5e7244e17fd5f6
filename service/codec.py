"""Proto <-> tensors: input tensors and encoded images in, maps and overlays out.

Decoding checks what the bytes themselves say (dtype, shape against length,
NaN/Inf, image header dimensions) and raises field-level `InvalidArgument`;
checks against the model and the limits live in validation.py. Everything
decoded ends as model-space float32 CPU tensors `# (N, C, H, W)`.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.io as tvio

from service import fitting
from service._proto import attribution_pb2 as pb
from workers import methods
from service.decoding.pool import Busy, Decoded, DecodeFailure, ImageDecoder, InlineDecoder
from service.text_inputs import item_input
from workers.errors import FieldViolation, InternalError, InvalidArgument, Overloaded
from workers.spec import (AttributionMap, ExplainResult, ExplainSpec, ModelDescription, OutputSpec, SourceGeometry,
                          pixels_to_model_space)

# ------------------------------------------------------------ enum names --
# The workers speak lower-case names (workers/spec.py); the wire speaks enums.

METHOD_NAMES: dict[int, str] = {getattr(pb, m.proto): m.name for m in methods.METHODS}
METHOD_ENUMS: dict[str, int] = {name: enum for enum, name in METHOD_NAMES.items()}
REDUCTION_NAMES = {pb.CHANNEL_REDUCTION_UNSPECIFIED: "abs_max", pb.ABS_MAX: "abs_max", pb.SUM: "sum",
                   pb.NONE: "none"}
NORMALIZATION_NAMES = {pb.NORMALIZATION_UNSPECIFIED: "none", pb.NO_NORMALIZATION: "none",
                       pb.MAX_ABS: "max_abs", pb.MIN_MAX: "min_max"}
DTYPE_NAMES = {pb.DTYPE_UNSPECIFIED: "float32", pb.FLOAT32: "float32", pb.FLOAT16: "float16",
               pb.UINT8: "uint8"}
DTYPE_ENUMS = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "uint8": pb.UINT8}
RULE_NAMES = {pb.INTEGRATION_RULE_UNSPECIFIED: "gauss_legendre", pb.RIEMANN_LEFT: "riemann_left",
              pb.RIEMANN_RIGHT: "riemann_right", pb.RIEMANN_MIDDLE: "riemann_middle",
              pb.RIEMANN_TRAPEZOID: "riemann_trapezoid", pb.GAUSS_LEGENDRE: "gauss_legendre"}
BASELINE_NAMES = {pb.BASELINE_KIND_UNSPECIFIED: "zero", pb.ZERO: "zero", pb.BLACK: "black",
                  pb.BLURRED: "blurred", pb.UNIFORM_NOISE: "uniform_noise", pb.DATASET_MEAN: "dataset_mean",
                  pb.CUSTOM: "custom", pb.PAD_TOKEN: "pad_token"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
# Maps the reader refuses beyond this many bad items, so one message stays readable.
_MAX_ITEM_VIOLATIONS = 8

# ------------------------------------------------------------ tensors in --


def decode_tensor(tensor: pb.Tensor, field: str) -> torch.Tensor:
    """A wire tensor as `# (N, C, H, W)` in its own dtype (f32, f16 or u8); 3-D is one item."""
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument.field(f"{field}.dtype", f"unknown dtype {tensor.dtype}; use FLOAT32, FLOAT16 or UINT8")
    if tensor.layout not in (pb.LAYOUT_UNSPECIFIED, pb.NCHW, pb.NHWC):
        raise InvalidArgument.field(f"{field}.layout", f"unknown layout {tensor.layout}; use NCHW or NHWC")
    shape = [int(d) for d in tensor.shape]
    if len(shape) not in (3, 4) or any(d <= 0 for d in shape):
        raise InvalidArgument.field(f"{field}.shape", f"must be 4 (or 3, one item) positive sizes, got {shape}")
    itemsize = _TORCH_DTYPES[dtype].itemsize
    expected = math.prod(shape) * itemsize  # Python ints: a huge claimed shape cannot overflow
    if len(tensor.data) != expected:
        raise InvalidArgument.field(f"{field}.data", f"has {len(tensor.data)} bytes; shape {shape} of {dtype} "
                                                     f"needs {expected}")
    # bytearray: one copy that torch may own and write (protobuf bytes are read-only).
    # Wire order is little-endian, as every host we run on is.
    x = torch.frombuffer(bytearray(tensor.data), dtype=_TORCH_DTYPES[dtype]).reshape(shape)
    if len(shape) == 3:
        x = x.unsqueeze(0)
    if tensor.layout == pb.NHWC:
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    x = x.contiguous()
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InvalidArgument.field(f"{field}.data", "contains NaN or Inf")
    return x


def normalize(pixels: torch.Tensor, model: ModelDescription) -> torch.Tensor:
    """Pixel space [0, 1] -> model space, (x - mean) / std per channel; float32."""
    mean = torch.tensor(model.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(model.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) - mean) / std


def denormalize(inputs: torch.Tensor, model: ModelDescription) -> torch.Tensor:
    """Model space -> pixel space clamped to [0, 1]; `# (C, H, W)` or `# (N, C, H, W)`."""
    shape = (-1, 1, 1) if inputs.dim() == 3 else (1, -1, 1, 1)
    mean = torch.tensor(model.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(model.std, dtype=torch.float32).view(shape)
    return (inputs.to(torch.float32) * std + mean).clamp_(0.0, 1.0)


def to_model_space(raw: torch.Tensor, space: int, model: ModelDescription, field: str) -> torch.Tensor:
    """A decoded tensor in `space` (InputSpace) -> model space float32.

    `field` names the tensor's dtype field (e.g. "inputs.tensor.dtype"); range
    and overflow problems are reported on the sibling `.data` field.
    """
    data_field = field.rsplit(".", 1)[0] + ".data" if "." in field else field
    if space == pb.MODEL:
        if raw.dtype == torch.uint8:
            raise InvalidArgument.field(field, "uint8 is pixel data; send it with space PIXELS, or send "
                                               "model-space floats")
        return raw.to(torch.float32)
    if raw.dtype == torch.uint8:
        x = pixels_to_model_space(raw, model.mean, model.std)
    else:
        lo, hi = float(raw.min()), float(raw.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidArgument.field(data_field, f"PIXELS floats must lie in [0, 1], found values from {lo:.6g} "
                                                    f"to {hi:.6g}; scale 0..255 data by 1/255 (or send it as UINT8), "
                                                    "or send normalized values with space MODEL")
        x = normalize(raw, model)
    if not bool(torch.isfinite(x).all()):  # only a degenerate std can do this to values in [0, 1]
        raise InvalidArgument.field(data_field, "overflows float32 when normalized with the model's mean/std")
    return x


# ------------------------------------------------------------- images in --


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the dimensions; C4, C8 and CC are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
INLINE_DECODER = InlineDecoder()


def image_dimensions(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from a PNG or JPEG header, without decoding; ValueError otherwise."""
    if data.startswith(_PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("PNG without an IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:2] == b"\xff\xd8":
        return ("jpeg",) + _jpeg_dimensions(data)
    raise ValueError("not a PNG or JPEG file")


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("corrupt JPEG: marker expected")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            break
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        i += 2 + length
    raise ValueError("JPEG without a frame header")


def _check_header(data: bytes, max_pixels: int, field: str) -> str:
    """The file's format after the header checks (pure Python: no decoder has seen the bytes yet)."""
    try:
        fmt, width, height = image_dimensions(data)
    except ValueError as exc:
        raise InvalidArgument.field(field, str(exc)) from None
    if width == 0 or height == 0:
        raise InvalidArgument.field(field, f"{fmt} header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise InvalidArgument.field(field, f"{fmt} is {width}x{height} = {width * height} pixels; the cap is "
                                           f"{max_pixels} per image")
    return fmt


def _item_index(field: str) -> int:
    return int(field.rsplit("[", 1)[1].rstrip("]"))


def _pixels_tensor(decoded: Decoded, model: ModelDescription) -> tuple[torch.Tensor, SourceGeometry]:
    """A decoder's (rows, columns, C) samples -> pixel space `# (1, C, H, W)` float32 in [0, 1], model size,
    fitted by the model's resize policy, and where that input lies in the image."""
    dtype = torch.uint8 if decoded.bytes_per_sample == 1 else torch.uint16
    pixels = decoded.pixels if isinstance(decoded.pixels, bytearray) else bytearray(decoded.pixels)
    x = torch.frombuffer(pixels, dtype=dtype)
    # (rows, columns, C) samples: a channels-last (1, C, h, w) view.
    x = x.reshape(decoded.rows, decoded.columns, model.channels).permute(2, 0, 1).unsqueeze(0)
    return fitting.fit(x, float(torch.iinfo(dtype).max), model, (decoded.source_width, decoded.source_height))


def decode_images(images: Sequence[bytes], model: ModelDescription, max_pixels: int, field: str,
                  decoder: ImageDecoder | None = None) -> torch.Tensor:
    """PNG/JPEG files -> model space `# (N, C, H, W)` at the model's size; every bad file is named in one error."""
    return normalize(decode_pixels(images, model, max_pixels, field, decoder), model)


def decode_images_with_geometry(images: Sequence[bytes], model: ModelDescription, max_pixels: int, field: str,
                                decoder: ImageDecoder | None = None) -> tuple[torch.Tensor,
                                                                              tuple[SourceGeometry, ...]]:
    """As `decode_images`, with each item's `SourceGeometry` (where its model input lies in the image)."""
    pixels, geometry = decode_pixels_with_geometry(images, model, max_pixels, field, decoder)
    return normalize(pixels, model), geometry


def decode_pixels(images: Sequence[bytes], model: ModelDescription, max_pixels: int, field: str,
                  decoder: ImageDecoder | None = None) -> torch.Tensor:
    """PNG/JPEG files -> pixel space `# (N, C, H, W)` float32 in [0, 1] at the model's size."""
    return decode_pixels_with_geometry(images, model, max_pixels, field, decoder)[0]


def decode_pixels_with_geometry(images: Sequence[bytes], model: ModelDescription, max_pixels: int, field: str,
                                decoder: ImageDecoder | None = None) -> tuple[torch.Tensor,
                                                                              tuple[SourceGeometry, ...]]:
    """PNG/JPEG files -> pixel space `# (N, C, H, W)` float32 in [0, 1] at the model's size, and geometry.

    Headers are checked against `max_pixels` here, before a single pixel is
    decoded, so a tiny file claiming a huge image costs nothing. `decoder`
    does the rest (decode, EXIF orientation, convert, resize): the server's
    process pool for client bytes; in-process Pillow (the default) for
    trusted files only.
    """
    violations: list[FieldViolation] = []
    formats: list[str | None] = []
    for i, data in enumerate(images):
        try:
            formats.append(_check_header(data, max_pixels, f"{field}[{i}]"))
        except InvalidArgument as exc:
            formats.append(None)
            violations.extend(exc.violations)
    decoder = decoder or INLINE_DECODER
    readable = [i for i, fmt in enumerate(formats) if fmt is not None]
    try:
        results = decoder.decode([images[i] for i in readable], model.width, model.height, model.channels,
                                 max_pixels) if readable else []
    except Busy as exc:
        raise Overloaded(f"{exc}; retry shortly") from None
    outcomes: list = [None] * len(images)
    for i, outcome in zip(readable, results):
        outcomes[i] = outcome
    decoded = []
    for i, (fmt, outcome) in enumerate(zip(formats, outcomes)):
        if isinstance(outcome, DecodeFailure):
            violations.append(FieldViolation(f"{field}[{i}]", f"could not decode image {i} ({fmt}): {outcome}"))
        elif isinstance(outcome, Decoded):
            decoded.append(_pixels_tensor(outcome, model))
    if violations:
        violations = sorted(violations, key=lambda v: _item_index(v.field))[:_MAX_ITEM_VIOLATIONS]
        raise InvalidArgument(violation_message(violations), violations)
    if len(decoded) != len(images):
        raise InternalError(f"the image decoder answered {len(decoded)} files for {len(images)}")
    return torch.cat([pixels for pixels, _ in decoded]), tuple(geometry for _, geometry in decoded)


def decode_image(data: bytes, model: ModelDescription, max_pixels: int, field: str,
                 decoder: ImageDecoder | None = None) -> torch.Tensor:
    """One trusted PNG/JPEG -> pixel space `# (1, C, H, W)` at the model's size, in [0, 1]."""
    return decode_pixels([data], model, max_pixels, field, decoder)


# --------------------------------------------------------------- maps out --


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes of a CPU tensor."""
    return t.detach().cpu().contiguous().numpy().tobytes()


def scale_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Min-max over the whole map to 0..255; a constant map is all zeros."""
    lo, hi = values.min(), values.max()
    span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    return ((values - lo) / span * 255.0).round_().to(torch.uint8)


def encode_map(values: torch.Tensor, dtype: str) -> pb.Tensor:
    """A float32 map `# (H, W)` or `# (C, H, W)` -> wire tensor in `dtype`."""
    values = values.detach().to(torch.float32).cpu()
    if dtype == "uint8":
        wire = scale_to_uint8(values)
    elif dtype == "float16":
        # Clamped: a huge raw gradient would otherwise become Inf on the wire.
        wire = values.clamp(-65504.0, 65504.0).to(torch.float16)
    else:
        wire = values
    return pb.Tensor(data=tensor_bytes(wire), dtype=DTYPE_ENUMS[dtype], shape=list(values.shape), layout=pb.NCHW)


def map_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_sha256(item: torch.Tensor) -> str:
    """Hex sha256 of one item's model-space float32 bytes, `# (C, H, W)`, or int64 token ids `# (L,)` (item_input)."""
    return hashlib.sha256(tensor_bytes(item.to(torch.float32 if item.is_floating_point() else torch.int64))).hexdigest()


# Inferno, sampled at 11 evenly spaced points (8-bit sRGB); the LUT interpolates.
_INFERNO_ANCHORS = ((0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103), (188, 55, 84),
                    (221, 81, 58), (243, 120, 25), (252, 165, 10), (246, 215, 70), (252, 255, 164))


def colormap_lut(size: int = 256) -> torch.Tensor:
    """`# (size, 3)` float32 colours in [0, 1], dark (low) to bright (high)."""
    anchors = torch.tensor(_INFERNO_ANCHORS, dtype=torch.float32) / 255.0  # (A, 3)
    pos = torch.linspace(0, len(anchors) - 1, size)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo).unsqueeze(1)
    return anchors[lo] * (1 - frac) + anchors[lo + 1] * frac


_LUT = colormap_lut()


def overlay_png(values: torch.Tensor, item: torch.Tensor, model: ModelDescription, alpha: float = 0.5) -> bytes:
    """A map blended over its input as PNG bytes.

    values: `# (H, W)` or `# (C, H, W)` map; item: `# (C, H, W)` model-space input.
    """
    heat = values.detach().to(torch.float32).cpu()
    if heat.dim() == 3:
        heat = heat.abs().amax(dim=0)  # (H, W)
    image = denormalize(item, model)  # (C, H, W) in [0, 1]
    if heat.shape != image.shape[-2:]:
        heat = F.interpolate(heat[None, None], size=tuple(image.shape[-2:]), mode="bilinear",
                             align_corners=False)[0, 0]
    rgb = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    index = scale_to_uint8(heat).long()  # (H, W)
    colours = _LUT[index].permute(2, 0, 1)  # (3, H, W)
    blended = (1 - alpha) * rgb + alpha * colours
    return tensor_bytes(tvio.encode_png((blended * 255.0).round_().to(torch.uint8)))


def _attribution(amap: AttributionMap, item: torch.Tensor, output: OutputSpec,
                 model: ModelDescription) -> pb.Attribution:
    wire = encode_map(amap.map, output.dtype)
    out = pb.Attribution(method=METHOD_ENUMS[amap.method], target=int(amap.target),
                         target_score=float(amap.target_score), map=wire, map_sha256=map_sha256(wire.data))
    if amap.native is not None:
        out.native_map.CopyFrom(encode_map(amap.native, output.dtype))
    if output.png_overlay:
        out.png_overlay = overlay_png(amap.map, item, model)
    if amap.completeness_error is not None:
        out.completeness_error = float(amap.completeness_error)
    if amap.completeness_error_absolute is not None:
        out.completeness_error_absolute = float(amap.completeness_error_absolute)
    return out


def encode_result(result: ExplainResult, spec: ExplainSpec, model: ModelDescription) -> pb.ExplainResponse:
    """A worker's answer -> ExplainResponse (timings.total_ms is the servicer's to fill)."""
    if len(result.items) != spec.items:
        raise InternalError(f"backend answered {len(result.items)} items for {spec.items}")
    items = []
    for i, (item, explanation) in enumerate(zip(spec.inputs, result.items)):
        out = pb.ItemResult(
            predicted_classes=[int(c) for c in explanation.predicted_classes],
            predicted_scores=[float(s) for s in explanation.predicted_scores],
            attributions=[_attribution(a, item, spec.output, model) for a in explanation.attributions],
            input_sha256=input_sha256(item_input(spec, i)), tokens=explanation.tokens,
            token_ids=explanation.token_ids)
        if i < len(spec.geometry):
            g = spec.geometry[i]
            out.geometry.CopyFrom(pb.SourceGeometry(width=g.width, height=g.height, resize=g.resize,
                                                    x0=g.x0, y0=g.y0, x1=g.x1, y1=g.y1))
        items.append(out)
    timings = pb.Timings(queue_ms=result.queue_ms, compute_ms=result.compute_ms,
                         batch_samples=int(result.batch_samples), batch_requests=int(result.batch_requests))
    return pb.ExplainResponse(request_id=spec.request_id, model=result.model or spec.model,
                              model_version=result.model_version, method=METHOD_ENUMS[spec.method],
                              items=items, timings=timings)


def violation_message(violations: Sequence[FieldViolation]) -> str:
    """One readable line naming every bad field."""
    return "; ".join(f"{v.field}: {v.description}" for v in violations)
