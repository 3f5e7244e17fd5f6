"""codec.py: wire tensors and images in, maps, overlays and hashes out."""
from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
import torch
import torchvision.io as tvio

from service import codec
from service._proto import attribution_pb2 as pb
from tests.service.conftest import pixels_tensor
from workers.errors import InvalidArgument
from workers.spec import AttributionMap, ExplainResult, ExplainSpec, ItemExplanation, ModelDescription, OutputSpec

MODEL = ModelDescription(name="m", version="v", channels=3, height=16, width=12, mean=(0.5, 0.4, 0.3),
                         std=(0.2, 0.25, 0.5), num_classes=4, labels=(), cam_layers=("l",), default_cam_layer="l",
                         online_methods=("vanilla", "grad_cam"), offline_methods=("vanilla", "grad_cam"))
GRAY = ModelDescription(**{**MODEL.__dict__, "channels": 1, "mean": (0.5,), "std": (0.25,)})


def _pixels(n=2, c=3, h=16, w=12, seed=0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("items", [1, 3])
def test_tensor_round_trip(dtype, layout, items):
    x = _pixels(items)
    wire = pixels_tensor(x, dtype, layout)
    decoded = codec.decode_tensor(wire, "t")
    expected = {"float32": x, "float16": x.half(), "uint8": (x * 255).round().to(torch.uint8)}[dtype]
    assert decoded.dtype == expected.dtype and decoded.shape == (items, 3, 16, 12)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)


def test_three_dimensional_tensor_is_one_item():
    x = _pixels(1)
    wire = pixels_tensor(x, "float32", "NHWC")
    wire.shape[:] = [16, 12, 3]
    torch.testing.assert_close(codec.decode_tensor(wire, "t"), x)


@pytest.mark.parametrize("mutate,field,words", [
    (lambda t: t.shape.__setitem__(slice(None), [3, 16]), "t.shape", "must be 4"),
    (lambda t: t.shape.__setitem__(slice(None), [1, 0, 16, 12]), "t.shape", "positive"),
    (lambda t: setattr(t, "data", t.data[:-1]), "t.data", "bytes"),
    (lambda t: setattr(t, "dtype", 9), "t.dtype", "unknown dtype"),
    (lambda t: setattr(t, "layout", 7), "t.layout", "unknown layout"),
    (lambda t: t.shape.__setitem__(slice(None), [10**9, 3, 10**9, 12]), "t.data", "needs"),
])
def test_bad_tensors_name_the_field(mutate, field, words):
    wire = pixels_tensor(_pixels(1))
    mutate(wire)
    with pytest.raises(InvalidArgument) as info:
        codec.decode_tensor(wire, "t")
    assert info.value.violations[0].field == field and words in info.value.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nan_and_inf_are_refused(bad, dtype):
    x = _pixels(1)
    x[0, 1, 2, 3] = bad
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        codec.decode_tensor(pixels_tensor(x, dtype), "t")


def test_pixels_are_normalized_and_model_space_passes_through():
    x = _pixels(2)
    as_u8 = codec.decode_tensor(pixels_tensor(x, "uint8"), "t")
    mean = torch.tensor(MODEL.mean).view(1, 3, 1, 1)
    std = torch.tensor(MODEL.std).view(1, 3, 1, 1)
    expected = (as_u8.float() / 255 - mean) / std
    torch.testing.assert_close(codec.to_model_space(as_u8, pb.PIXELS, MODEL, "t"), expected)
    torch.testing.assert_close(codec.to_model_space(x, pb.PIXELS, MODEL, "t"), (x - mean) / std)
    torch.testing.assert_close(codec.to_model_space(x, pb.MODEL, MODEL, "t"), x)
    torch.testing.assert_close(codec.denormalize(codec.normalize(x, MODEL), MODEL), x)
    with pytest.raises(InvalidArgument, match="uint8 is pixel data"):
        codec.to_model_space(as_u8, pb.MODEL, MODEL, "t")


def _png(x: torch.Tensor) -> bytes:
    return codec.tensor_bytes(tvio.encode_png((x * 255).round().to(torch.uint8)))


def _jpeg(x: torch.Tensor) -> bytes:
    return codec.tensor_bytes(tvio.encode_jpeg((x * 255).round().to(torch.uint8), quality=95))


def test_png_decodes_exactly_at_model_size():
    x = _pixels(1)[0]
    data = _png(x)
    assert codec.image_dimensions(data) == ("png", 12, 16)
    decoded = codec.decode_images([data, data], MODEL, 4096, "images")
    expected = codec.normalize((x * 255).round().unsqueeze(0) / 255, MODEL)
    assert decoded.shape == (2, 3, 16, 12)
    torch.testing.assert_close(decoded[1:], expected)


def test_jpeg_and_grayscale_are_resized_to_the_model():
    big = torch.nn.functional.interpolate(_pixels(1), size=(40, 30), mode="bilinear")[0]
    data = _jpeg(big)
    assert codec.image_dimensions(data) == ("jpeg", 30, 40)
    rgb = codec.decode_images([data], MODEL, 4096, "images")
    gray = codec.decode_images([data], GRAY, 4096, "images")
    assert rgb.shape == (1, 3, 16, 12) and gray.shape == (1, 1, 16, 12)
    pixels = codec.denormalize(rgb, MODEL)
    resized = torch.nn.functional.interpolate(big[None], size=(16, 12), mode="bilinear", antialias=True)
    assert (pixels - resized).abs().mean() < 0.03  # JPEG loss only


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny deflate stream: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b"")


def test_decompression_bomb_refused_before_decoding():
    bomb = _png_claiming(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(InvalidArgument) as info:
        codec.decode_images([bomb], MODEL, 4096 * 4096, "inputs.images.images")
    assert info.value.violations[0].field == "inputs.images.images[0]"
    assert "100000x100000" in info.value.message and "cap" in info.value.message


def test_pixel_cap_is_exact():
    x = _pixels(1, h=64, w=64)[0]
    codec.decode_images([_png(x)], MODEL, 64 * 64, "images")
    with pytest.raises(InvalidArgument, match="cap is 4095"):
        codec.decode_images([_png(x)], MODEL, 64 * 64 - 1, "images")


@pytest.mark.parametrize("data,words", [
    (b"GIF89a....", "not a PNG or JPEG"),
    (b"", "not a PNG or JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "IHDR"),
    (b"\xff\xd8\xff\xd9", "frame header"),
])
def test_unreadable_images_are_refused(data, words):
    with pytest.raises(InvalidArgument, match=words):
        codec.decode_images([data], MODEL, 4096, "images")


def test_truncated_png_fails_cleanly_and_every_bad_image_is_named():
    good = _png(_pixels(1)[0])
    with pytest.raises(InvalidArgument) as info:
        codec.decode_images([good, good[:60], b"nope"], MODEL, 4096, "images")
    assert [v.field for v in info.value.violations] == ["images[1]", "images[2]"]


@pytest.mark.parametrize("shape", [(16, 12), (3, 16, 12)])
def test_map_encodings(shape):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    f32 = codec.encode_map(values, "float32")
    assert list(f32.shape) == list(shape) and f32.dtype == pb.FLOAT32
    torch.testing.assert_close(codec.decode_tensor(_as_input(f32), "m").reshape(shape), values)
    f16 = codec.encode_map(values, "float16")
    torch.testing.assert_close(codec.decode_tensor(_as_input(f16), "m").reshape(shape).float(), values,
                               rtol=1e-3, atol=1e-3)
    u8 = codec.encode_map(values, "uint8")
    raw = torch.frombuffer(bytearray(u8.data), dtype=torch.uint8).reshape(shape)
    assert raw.min() == 0 and raw.max() == 255
    expected = ((values - values.min()) / (values.max() - values.min()) * 255).round()
    assert (raw.float() - expected).abs().max() <= 1


def _as_input(t: pb.Tensor) -> pb.Tensor:
    """A map tensor reshaped to one 3-D item so decode_tensor reads it."""
    out = pb.Tensor()
    out.CopyFrom(t)
    if len(t.shape) == 2:
        out.shape[:] = [1] + list(t.shape)
    return out


def test_edge_maps_encode_safely():
    assert set(codec.encode_map(torch.full((4, 4), 7.0), "uint8").data) == {0}
    huge = codec.encode_map(torch.tensor([[1e6, -1e6]]), "float16")
    assert torch.isfinite(torch.frombuffer(bytearray(huge.data), dtype=torch.float16)).all()


def test_colormap_runs_dark_to_bright():
    lut = codec.colormap_lut()
    assert lut.shape == (256, 3) and 0 <= lut.min() and lut.max() <= 1
    assert lut[0].sum() < 0.1 and lut[-1].sum() > 2.5


def test_overlay_png_decodes_and_shows_the_heat():
    item = codec.normalize(torch.full((1, 3, 16, 12), 0.5), MODEL)[0]
    heat = torch.zeros(16, 12)
    heat[4:8, 4:8] = 1.0
    for values in (heat, heat.expand(3, -1, -1)):
        png = codec.overlay_png(values, item, MODEL)
        image = tvio.decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8))
        assert image.shape == (3, 16, 12) and image.dtype == torch.uint8
        hot, cold = image[:, 5, 5].float(), image[:, 0, 0].float()
        assert hot.sum() > cold.sum() + 100  # bright colormap end over the hot square


def test_hashes():
    item = _pixels(1)[0]
    assert codec.input_sha256(item) == hashlib.sha256(item.numpy().tobytes()).hexdigest()
    assert codec.map_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_encode_result_builds_the_response():
    inputs = codec.normalize(_pixels(2), MODEL)
    spec = ExplainSpec(model="m", method="grad_cam", inputs=inputs, request_id="r1",
                       output=OutputSpec(dtype="uint8", png_overlay=True))
    maps = [AttributionMap("grad_cam", 2, 0.75, torch.rand(16, 12), native=torch.rand(4, 3)),
            AttributionMap("layer_cam", 2, 0.75, torch.rand(16, 12), completeness_error=0.5,
                           completeness_error_absolute=0.125)]
    result = ExplainResult("r1", "m", "v", "grad_cam", [ItemExplanation([2, 1], [0.75, 0.2], maps)] * 2,
                           queue_ms=1.0, compute_ms=2.0, batch_samples=2, batch_requests=1)
    response = codec.encode_result(result, spec, MODEL)
    assert response.request_id == "r1" and response.method == pb.GRAD_CAM and len(response.items) == 2
    item = response.items[1]
    assert item.input_sha256 == codec.input_sha256(inputs[1])
    first, second = item.attributions
    assert first.method == pb.GRAD_CAM and second.method == pb.LAYER_CAM and first.target == 2
    assert first.map.dtype == pb.UINT8 and list(first.native_map.shape) == [4, 3]
    assert first.map_sha256 == hashlib.sha256(first.map.data).hexdigest()
    assert not first.HasField("completeness_error") and second.completeness_error == 0.5
    assert not first.HasField("completeness_error_absolute") and second.completeness_error_absolute == 0.125
    assert first.png_overlay.startswith(b"\x89PNG")
    assert response.timings.compute_ms == 2.0 and response.timings.batch_samples == 2
