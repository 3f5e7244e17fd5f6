"""Expected Gradients, Blur IG and Guided IG through the gRPC front door and the local backend: each answers
the map the kernel computes in-process, reference sets (the model's and the request's own), and the
refusals a bad request gets."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from service._proto import attribution_pb2 as pb
from service.client import AttributionClient, ServiceError
from tests.service.conftest import explain_request, pixels_tensor
from service.backends.local import LocalBackend
from workers.config import InputSpec, ModelConfig
from workers.demo import to_model_space
from workers.kernels.gradients import GradientRequest, explain_gradients
from workers.models import ModelRegistry

RAW = {"output": {"reduction": pb.NONE}}  # signed (C, H, W) maps, comparable with the kernel's


def wire_map(attribution: pb.Attribution) -> torch.Tensor:
    return torch.frombuffer(bytearray(attribution.map.data), dtype=torch.float32).reshape(list(attribution.map.shape))


def kernel(demo_registry, images, targets, method, **params):
    model = demo_registry.get()
    req = GradientRequest(to_model_space(images), torch.tensor(targets), method, **params)
    return explain_gradients(model.module, [req])[0]


@pytest.mark.parametrize("method, params, kernel_params", [
    (pb.EXPECTED_GRADIENTS, {"expected_gradients": {"samples": 6, "noise_stdev": 0.1}},
     {"samples": 6, "noise_stdev": 0.1}),
    (pb.BLUR_IG, {"blur_ig": {"steps": 6, "max_sigma": 5.0}}, {"steps": 6, "max_sigma": 5.0}),
    (pb.GUIDED_IG, {"guided_ig": {"steps": 6, "fraction": 0.2}}, {"steps": 6, "fraction": 0.2}),
], ids=["expected_gradients", "blur_ig", "guided_ig"])
def test_each_path_method_answers_the_kernels_map(stub, demo_batch, demo_registry, method, params, kernel_params):
    x = demo_batch.images[:2]
    request = explain_request(x, method, seed=7, **params, **RAW)
    response = stub.Explain(request, timeout=120)
    assert response.method == method and response.timings.batch_samples == 12
    targets = [item.attributions[0].target for item in response.items]
    name = pb.Method.Name(method).lower()
    extra = {"references": demo_registry.get().reference_set} if method == pb.EXPECTED_GRADIENTS else {}
    expected = kernel(demo_registry, x, targets, name, seed=7, **kernel_params, **extra)
    for i, item in enumerate(response.items):
        got = wire_map(item.attributions[0])
        assert torch.allclose(got, expected.attributions[i], rtol=1e-4, atol=1e-4 * float(got.abs().max()))
        has_completeness = item.attributions[0].HasField("completeness_error")
        assert has_completeness == (method != pb.EXPECTED_GRADIENTS)


def test_the_demo_model_reports_its_reference_set(stub):
    (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert info.has_reference_set
    assert {pb.EXPECTED_GRADIENTS, pb.BLUR_IG, pb.GUIDED_IG} <= set(info.online_methods)


def test_a_custom_reference_set_is_drawn_from(server, demo_batch, demo_registry):
    x, refs = demo_batch.images[:1], demo_batch.images[4:7]
    with AttributionClient(server.address) as client:
        result = client.explain(x.numpy(), method="expected_gradients", samples=5, reference=refs.numpy(),
                                reduction="none", seed=3, target=1, timeout=120)
    expected = kernel(demo_registry, x, [1], "expected_gradients", samples=5, seed=3,
                      references=to_model_space(refs))
    got = torch.from_numpy(np.ascontiguousarray(result.maps[0, 0]))
    assert torch.allclose(got, expected.attributions[0], rtol=1e-4, atol=1e-4 * float(got.abs().max()))


@pytest.fixture(scope="module")
def plain_server(start_server, demo_registry):
    """The demo model beside a random-weight ResNet-18 at 32 px, which has no reference set."""
    registry = ModelRegistry([ModelConfig(name="demo", source="demo"),
                              ModelConfig(name="r18", source="torchvision", arch="resnet18", num_classes=4,
                                          input=InputSpec(height=32, width=32))],
                             cache_dir=demo_registry.cache_dir)
    harness = start_server(LocalBackend(registry))
    yield harness
    harness.stop()


def test_expected_gradients_without_any_reference_set_is_refused(plain_server):
    x = torch.rand(1, 3, 32, 32)
    with grpc.insecure_channel(plain_server.address) as channel:
        info = {m.name: m for m in pb_models(channel)}
        assert not info["r18"].has_reference_set and info["demo"].has_reference_set
    with AttributionClient(plain_server.address) as client:
        with pytest.raises(ServiceError) as refused:
            client.explain(x.numpy(), model="r18", method="expected_gradients", timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.violations[0][0] == "expected_gradients.reference"
        assert "CUSTOM" in refused.value.violations[0][1]
        # The same model answers when the request brings its own reference set.
        answered = client.explain(x.numpy(), model="r18", method="expected_gradients", samples=2,
                                  reference=torch.rand(3, 3, 32, 32).numpy(), timeout=60)
        assert answered.maps.shape[:2] == (1, 1)


def pb_models(channel):
    from service._proto import attribution_pb2_grpc as pb_grpc

    return pb_grpc.AttributionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=60).models


@pytest.mark.parametrize("method, params, field", [
    (pb.BLUR_IG, {"blur_ig": {"max_sigma": 100.0}}, "blur_ig.max_sigma"),
    (pb.BLUR_IG, {"blur_ig": {"steps": 100000}}, "blur_ig.steps"),
    (pb.GUIDED_IG, {"guided_ig": {"fraction": 1.5}}, "guided_ig.fraction"),
    (pb.GUIDED_IG, {"guided_ig": {"steps": 1}}, "guided_ig.steps"),
    (pb.EXPECTED_GRADIENTS, {"expected_gradients": {"noise_stdev": 2.0}}, "expected_gradients.noise_stdev"),
    (pb.EXPECTED_GRADIENTS, {"expected_gradients": {"reference": {"kind": pb.BLACK}}},
     "expected_gradients.reference.kind"),
    (pb.EXPECTED_GRADIENTS, {"expected_gradients": {"reference": {"kind": pb.CUSTOM}}},
     "expected_gradients.reference.tensor"),
    (pb.GUIDED_IG, {"noise": {"samples": 4}}, "noise"),
])
def test_bad_path_parameters_are_refused_naming_the_field(stub, demo_batch, method, params, field):
    with pytest.raises(grpc.RpcError) as refused:
        stub.Explain(explain_request(demo_batch.images[:1], method, **params), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.value.details()


def test_a_custom_reference_of_the_wrong_size_is_refused(stub, demo_batch):
    request = explain_request(demo_batch.images[:1], pb.EXPECTED_GRADIENTS)
    request.expected_gradients.reference.kind = pb.CUSTOM
    request.expected_gradients.reference.tensor.CopyFrom(pixels_tensor(torch.rand(2, 3, 16, 16)))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Explain(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected_gradients.reference.tensor.shape" in refused.value.details()
