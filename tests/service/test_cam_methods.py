"""HiResCAM, XGrad-CAM and EigenCAM end to end: gRPC front door, validation, LocalBackend,
pipeline and kernel on the demo model, each map checked against the kernel run in process;
Ablation-CAM refused online with a pointer to SubmitJob."""
from __future__ import annotations

import grpc
import pytest
import torch

from service._proto import attribution_pb2 as pb
from service.client import build_request
from tests.service.conftest import explain_request
from workers.demo import to_model_space
from workers.kernels.cam import CamRequest, explain_cam
from workers.pipeline import WorkerContext

NEW_ONLINE = {pb.HIRES_CAM: "hires_cam", pb.XGRAD_CAM: "xgrad_cam", pb.EIGEN_CAM: "eigen_cam"}


def _map(tensor: pb.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(tensor.data), dtype=torch.float32).reshape(list(tensor.shape))


@pytest.fixture(scope="module")
def in_process(demo_registry):
    ctx = WorkerContext.create(demo_registry.get())
    yield ctx
    ctx.taps.close()


def test_the_model_lists_the_new_methods(stub):
    (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert set(NEW_ONLINE) <= set(info.online_methods)
    assert pb.ABLATION_CAM in info.offline_methods and pb.ABLATION_CAM not in info.online_methods


@pytest.mark.parametrize("method", list(NEW_ONLINE), ids=[pb.Method.Name(m) for m in NEW_ONLINE])
def test_each_online_method_end_to_end(stub, demo_batch, in_process, method):
    images = demo_batch.images[:3]
    request = explain_request(images, method, cam={"layer": "block3"}, output={"native_resolution": True},
                              request_id=f"cam-{method}")
    response = stub.Explain(request, timeout=60)
    assert response.method == method and len(response.items) == 3
    x = to_model_space(images)
    (expected,) = explain_cam(in_process.model.module, in_process.taps,
                              [CamRequest(x, None, "block3", (NEW_ONLINE[method],))])
    for i, item in enumerate(response.items):
        (attribution,) = item.attributions
        assert attribution.method == method and attribution.target == item.predicted_classes[0]
        assert attribution.target == int(expected.targets[i])
        torch.testing.assert_close(_map(attribution.map), expected.maps[NEW_ONLINE[method]][i], rtol=1e-4, atol=1e-5)
        assert list(attribution.native_map.shape) == [16, 16]


def test_every_variant_from_one_request(stub, demo_batch, in_process):
    """GRAD_CAM with every other online CAM variant in `also`, built by the Python client's build_request."""
    images = demo_batch.images[:2]
    also = ["grad_cam_plus_plus", "layer_cam", "hires_cam", "xgrad_cam", "eigen_cam"]
    request = build_request(images.numpy(), method="grad_cam", also=also, target=[0, 2])
    response = stub.Explain(request, timeout=60)
    (expected,) = explain_cam(in_process.model.module, in_process.taps,
                              [CamRequest(to_model_space(images), torch.tensor([0, 2]), "block4",
                                          ("grad_cam", *also))])
    for i, item in enumerate(response.items):
        names = [pb.Method.Name(a.method).lower() for a in item.attributions]
        assert names == ["grad_cam", *also]
        for name, attribution in zip(names, item.attributions):
            assert attribution.target == [0, 2][i]
            torch.testing.assert_close(_map(attribution.map), expected.maps[name][i], rtol=1e-4, atol=1e-5)


def test_ablation_cam_is_refused_online_and_in_also(stub, demo_batch):
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(explain_request(demo_batch.images[:1], pb.ABLATION_CAM), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SubmitJob" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(explain_request(demo_batch.images[:1], pb.EIGEN_CAM, cam={"also": [pb.ABLATION_CAM]}),
                     timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ABLATION_CAM is not a CAM variant" in err.value.details() and "EIGEN_CAM" in err.value.details()
