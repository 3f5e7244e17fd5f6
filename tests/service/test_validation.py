"""validation.py: defaults, limits and every refusal, directly and over a real server."""
from __future__ import annotations

import time
from typing import Callable

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service import codec
from service._proto import attribution_pb2 as pb
from service.config import Limits
from service.validation import resolve_model, validate_explain
from tests.service.conftest import explain_request, pixels_tensor
from workers.errors import InvalidArgument, ModelNotFound
from workers.spec import CAM_METHODS, GRADIENT_METHODS, OFFLINE_ONLY_METHODS, ModelDescription

DEMO = ModelDescription(name="demo", version="v", channels=3, height=64, width=64, mean=(0.47,) * 3,
                        std=(0.25,) * 3, num_classes=4, labels=(), cam_layers=("block3", "block4"),
                        default_cam_layer="block4", online_methods=GRADIENT_METHODS + CAM_METHODS,
                        offline_methods=GRADIENT_METHODS + CAM_METHODS + OFFLINE_ONLY_METHODS, is_default=True)
LIMITS = Limits()


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))


def _validate(request: pb.ExplainRequest, **kw):
    return validate_explain(request, DEMO, LIMITS, **kw)


# ------------------------------------------------------------ defaults --

def test_noise_and_ig_defaults_follow_the_proto():
    spec = _validate(explain_request(_images(), pb.SMOOTHGRAD))
    assert (spec.method, spec.params.samples, spec.params.noise_fraction) == ("smoothgrad", 32, 0.15)
    assert spec.cost == 2 * 32 and spec.target.kind == "predicted"
    spec = _validate(explain_request(_images(), pb.INTEGRATED_GRADIENTS))
    p = spec.params
    assert (p.steps, p.rule, p.baseline, p.blur_sigma) == (32, "gauss_legendre", "zero", 5.0)
    assert (spec.output.reduction, spec.output.normalization, spec.output.dtype) == ("abs_max", "none", "float32")


def test_cam_defaults_and_variants():
    request = explain_request(_images(), pb.GRAD_CAM, cam={"also": [pb.LAYER_CAM, pb.GRAD_CAM, pb.LAYER_CAM]},
                              output={"native_resolution": True})
    spec = _validate(request)
    assert spec.params.layer == "block4" and spec.params.also == ("layer_cam",)
    assert spec.output.native_resolution
    assert not _validate(explain_request(_images(), output={"native_resolution": True})).output.native_resolution


def test_uint8_pixels_are_kept_for_the_hop_and_floats_are_not():
    pixels = (_images(2) * 255).round().to(torch.uint8)
    request = explain_request(_images(2), pb.GRAD_CAM)
    request.inputs.tensor.CopyFrom(pixels_tensor(_images(2), "uint8", "NHWC"))
    spec = _validate(request)
    assert spec.pixels_u8 is not None and torch.equal(spec.pixels_u8, pixels)
    assert (spec.pixel_mean, spec.pixel_std) == (DEMO.mean, DEMO.std)
    assert torch.equal(spec.inputs, codec.normalize(pixels.float() / 255.0, DEMO))  # the same model-space tensor
    assert _validate(explain_request(_images(2), pb.GRAD_CAM)).pixels_u8 is None


@pytest.mark.parametrize("patch,stride,expected", [(0, 0, (8, 4)), (6, 0, (6, 3)), (1, 0, (1, 1)), (5, 2, (5, 2))])
def test_occlusion_defaults_offline(patch, stride, expected):
    request = explain_request(_images(), pb.OCCLUSION, occlusion={"patch_size": patch, "stride": stride})
    spec = _validate(request, offline=True)
    assert (spec.params.patch_size, spec.params.stride) == expected


def test_offline_allows_gradient_free_methods():
    spec = _validate(explain_request(_images(), pb.SCORE_CAM, score_cam={"layer": "block3"}), offline=True)
    assert spec.method == "score_cam" and spec.params.layer == "block3"


def test_request_id_deadline_audit_seed():
    spec = _validate(explain_request(_images(), seed=2**63 + 5, audit=pb.AUDIT_OFF))
    assert len(spec.request_id) == 32 and int(spec.request_id, 16) >= 0
    assert spec.deadline is None and spec.audit is False and spec.seed == 2**63 + 5
    before = time.time()
    spec = _validate(explain_request(_images(), request_id="mine"), request_id="other", time_remaining=5.0)
    after = time.time()
    assert spec.request_id == "mine" and before + 5.0 <= spec.deadline <= after + 5.0
    assert _validate(explain_request(_images()), request_id="given").request_id == "given"


def test_targets():
    spec = _validate(explain_request(_images(3), target={"class_indices": {"indices": [0, 3, 1]}}))
    assert spec.target.kind == "indices" and spec.target.indices == (0, 3, 1)
    spec = _validate(explain_request(_images(3), target={"top_k": 4}))
    assert spec.target.per_item == 4 and spec.cost == 12


def test_inputs_reach_model_space_from_every_encoding():
    x = _images(2)
    expected = codec.normalize(x, DEMO)
    for layout in ("NCHW", "NHWC"):
        request = explain_request(x)
        request.inputs.tensor.CopyFrom(pixels_tensor(x, "float32", layout))
        torch.testing.assert_close(_validate(request).inputs, expected)
    request = explain_request(x)
    request.inputs.tensor.CopyFrom(pixels_tensor(expected, "float32"))
    request.inputs.space = pb.MODEL
    torch.testing.assert_close(_validate(request).inputs, expected)


def test_custom_baseline_uses_the_inputs_space():
    x = _images(2)
    request = explain_request(x, pb.INTEGRATED_GRADIENTS,
                              integrated_gradients={"baseline": {"kind": pb.CUSTOM, "tensor": pixels_tensor(x[:1])}})
    spec = _validate(request)
    torch.testing.assert_close(spec.params.baseline_tensor, codec.normalize(x[:1], DEMO))


def test_resolve_model():
    other = ModelDescription(**{**DEMO.__dict__, "name": "other", "is_default": False})
    models = {"other": other, "demo": DEMO}
    assert resolve_model("", models) is DEMO and resolve_model("other", models) is other
    with pytest.raises(ModelNotFound, match="known models: demo, other"):
        resolve_model("nope", models)
    with pytest.raises(ModelNotFound) as info:
        resolve_model("x" * 10_000, models)
    assert len(info.value.message) < 200


def test_several_mistakes_are_reported_together():
    request = explain_request(_images(), pb.SMOOTHGRAD, noise={"samples": 1000}, target={"top_k": 9},
                              request_id="r" * 200)
    with pytest.raises(InvalidArgument) as info:
        _validate(request)
    assert [v.field for v in info.value.violations] == ["request_id", "target.top_k", "noise.samples"]


# ------------------------------------------------- refusals over the wire --

def _bomb() -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\0" * 16)


def _with(mutate: Callable[[pb.ExplainRequest], None], method: int = pb.VANILLA_GRADIENT, n: int = 2, **fields):
    def build() -> pb.ExplainRequest:
        request = explain_request(_images(n), method, **fields)
        mutate(request)
        return request
    return build


def _same(**fields):
    return _with(lambda r: None, fields.pop("method", pb.VANILLA_GRADIENT), **fields)


def _nan(r):
    x = _images(2)
    x[0, 0, 0, 0] = float("nan")
    r.inputs.tensor.CopyFrom(pixels_tensor(x))


BAD_REQUESTS = [
    ("method unset", _same(method=pb.METHOD_UNSPECIFIED), "method", "must be set"),
    ("method unknown", _same(method=99), "method", "unknown method 99"),
    ("score-cam online", _same(method=pb.SCORE_CAM), "method", "SubmitJob"),
    ("occlusion online", _same(method=pb.OCCLUSION), "method", "SubmitJob"),
    ("no inputs", _with(lambda r: r.ClearField("inputs")), "inputs", "inputs.images"),
    ("params of another method", _same(noise={"samples": 4}), "noise", "do not apply to VANILLA_GRADIENT"),
    ("too many samples", _same(method=pb.SMOOTHGRAD, noise={"samples": 257}), "noise.samples", "1..256"),
    ("noise fraction", _same(method=pb.VARGRAD, noise={"noise_fraction": 1.5}), "noise.noise_fraction", "0..1"),
    ("too many steps", _same(method=pb.INTEGRATED_GRADIENTS, integrated_gradients={"steps": 513}),
     "integrated_gradients.steps", "1..512"),
    ("trapezoid of one step", _same(method=pb.INTEGRATED_GRADIENTS,
                                    integrated_gradients={"steps": 1, "rule": pb.RIEMANN_TRAPEZOID}),
     "integrated_gradients.steps", "steps >= 2"),
    ("blur sigma", _same(method=pb.INTEGRATED_GRADIENTS,
                         integrated_gradients={"baseline": {"kind": pb.BLURRED, "blur_sigma": 100}}),
     "integrated_gradients.baseline.blur_sigma", "(0, 64]"),
    ("custom baseline missing", _same(method=pb.INTEGRATED_GRADIENTS,
                                      integrated_gradients={"baseline": {"kind": pb.CUSTOM}}),
     "integrated_gradients.baseline.tensor", "needs a tensor"),
    ("custom baseline shape", _same(method=pb.INTEGRATED_GRADIENTS, integrated_gradients={"baseline": {
        "kind": pb.CUSTOM, "tensor": pixels_tensor(torch.zeros(1, 3, 32, 32))}}),
     "integrated_gradients.baseline.tensor.shape", "takes (3, 64, 64)"),
    ("baseline tensor without CUSTOM", _same(method=pb.INTEGRATED_GRADIENTS, integrated_gradients={
        "baseline": {"kind": pb.BLACK, "tensor": pixels_tensor(torch.zeros(1, 3, 64, 64))}}),
     "integrated_gradients.baseline.tensor", "only with baseline kind CUSTOM"),
    ("unknown layer", _same(method=pb.GRAD_CAM, cam={"layer": "fc"}), "cam.layer", "block3, block4"),
    ("also not a CAM", _same(method=pb.GRAD_CAM, cam={"also": [pb.SMOOTHGRAD]}), "cam.also", "not a CAM variant"),
    ("top_k above classes", _same(target={"top_k": 5}), "target.top_k", "1..4"),
    ("class out of range", _same(target={"class_indices": {"indices": [4]}}), "target.class_indices.indices",
     "classes 0..3"),
    ("indices per item", _same(target={"class_indices": {"indices": [0, 1, 2]}}), "target.class_indices.indices",
     "3 indices for 2 items"),
    ("wrong size", _with(lambda r: r.inputs.tensor.CopyFrom(pixels_tensor(torch.rand(1, 3, 32, 32)))),
     "inputs.tensor.shape", "Resize first"),
    ("short data", _with(lambda r: setattr(r.inputs.tensor, "data", r.inputs.tensor.data[:-4])),
     "inputs.tensor.data", "needs"),
    ("nan", _with(_nan), "inputs.tensor.data", "NaN or Inf"),
    ("uint8 in model space", _with(lambda r: (r.inputs.tensor.CopyFrom(pixels_tensor(_images(1), "uint8")),
                                              setattr(r.inputs, "space", pb.MODEL))),
     "inputs.tensor.dtype", "uint8 is pixel data"),
    ("too many items", _with(lambda r: r.inputs.tensor.shape.__setitem__(0, 65)), "inputs.tensor", "at most 64"),
    ("decompression bomb", _with(lambda r: r.inputs.CopyFrom(pb.Inputs(images=pb.EncodedImages(images=[_bomb()])))),
     "inputs.images.images[0]", "50000x50000"),
    ("images in model space", _with(lambda r: r.inputs.CopyFrom(pb.Inputs(
        images=pb.EncodedImages(images=[b"x"]), space=pb.MODEL))), "inputs.space", "pixel data"),
    ("no images", _with(lambda r: r.inputs.CopyFrom(pb.Inputs(images=pb.EncodedImages()))),
     "inputs.images.images", "at least one"),
    ("unknown space", _with(lambda r: setattr(r.inputs, "space", 7)), "inputs.space", "unknown input space"),
    ("request id too long", _same(request_id="r" * 129), "request_id", "at most 128"),
    ("output dtype", _same(output={"dtype": 9}), "output.dtype", "unknown value 9"),
    ("audit mode", _same(audit=5), "audit", "unknown audit mode"),
]


@pytest.mark.parametrize("name,build,field,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_refused_with_field_details(stub, name, build, field, words):
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(build(), timeout=30)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert words in error.details() and "Traceback" not in error.details()
    status = rpc_status.from_call(error)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert field in [v.field for v in bad.field_violations]


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(explain_request(_images(), model="resnet9000"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "known models: demo" in info.value.details()


def test_server_stays_healthy_after_refusals(stub, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "attribution.v1.AttributionService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    response = stub.Explain(explain_request(_images()), timeout=60)
    assert len(response.items) == 2


# ------------------------------------------------ limits, front door = kernels --

def test_explanations_are_counted_after_top_k_like_the_kernels_count_rows():
    images = torch.rand(33, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidArgument) as caught:
        validate_explain(explain_request(images, pb.VANILLA_GRADIENT, target={"top_k": 2}), DEMO, LIMITS)
    (violation,) = caught.value.violations
    assert violation.field == "target.top_k" and "66 explanations" in violation.description
    assert "server.limits.max_items" in violation.description
    assert validate_explain(explain_request(images[:32], pb.VANILLA_GRADIENT, target={"top_k": 2}), DEMO, LIMITS)


def test_the_kernels_enforce_the_configured_limits_not_their_own_defaults(demo_registry):
    import asyncio
    import dataclasses

    from service.backends.local import LocalBackend

    raised = Limits(max_items=80, max_samples=300)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    many = torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    described = dataclasses.replace(DEMO, version=demo_registry.get("demo").version)
    backend = LocalBackend(demo_registry, limits=raised)
    specs = [validate_explain(explain_request(images, pb.SMOOTHGRAD, noise={"samples": 300}), described, raised),
             validate_explain(explain_request(many, pb.VANILLA_GRADIENT, target={"top_k": 2}), described, raised)]

    async def run():
        try:
            return [await backend.explain(spec) for spec in specs]
        finally:
            await backend.close()
    smooth, vanilla = asyncio.run(run())
    assert smooth.batch_samples == 300 and len(vanilla.items) == 40
