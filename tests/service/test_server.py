"""server.py + servicer.py + interceptors.py over real sockets, LocalBackend on the demo model."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time

import grpc
import pytest
import torch
import torchvision.io as tvio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import Limits, ServerConfig
from service.interceptors import REQUEST_ID, RequestIdLogFilter
from tests.service.conftest import ServerHarness, explain_request, pixels_tensor, test_config
from workers.demo import to_model_space
from workers.config import InputSpec, ModelConfig
from workers.errors import InvalidArgument
from workers.models import ModelRegistry
from service.backends.local import LocalBackend

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "attribution.v1.AttributionService"


def _array(tensor: pb.Tensor) -> torch.Tensor:
    dtype = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.UINT8: torch.uint8}[tensor.dtype]
    return torch.frombuffer(bytearray(tensor.data), dtype=dtype).reshape(list(tensor.shape))


# ------------------------------------------------------------- models --

def test_list_and_get_models(stub):
    (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert info.name == "demo" and info.is_default and info.num_classes == 4 and len(info.version) == 64
    assert (info.input_spec.channels, info.input_spec.height, info.input_spec.width) == (3, 64, 64)
    assert list(info.cam_layers) == ["block3", "block4"] and info.default_cam_layer == "block4"
    assert pb.SCORE_CAM not in info.online_methods and pb.SCORE_CAM in info.offline_methods
    assert info.limits.max_items == 64 and info.limits.max_top_k == 4
    assert stub.GetModel(pb.GetModelRequest(), timeout=10) == info
    assert stub.GetModel(pb.GetModelRequest(name="demo"), timeout=10) == info


# ------------------------------------------------------------ explain --

METHODS = [
    (pb.VANILLA_GRADIENT, {"gradient": {"absolute": True}}),
    (pb.SMOOTHGRAD, {"noise": {"samples": 4}}),
    (pb.SMOOTHGRAD_SQ, {"noise": {"samples": 4}}),
    (pb.VARGRAD, {"noise": {"samples": 4}}),
    (pb.INTEGRATED_GRADIENTS, {"integrated_gradients": {"steps": 8}}),
    (pb.GRAD_CAM, {}),
    (pb.GRAD_CAM_PLUS_PLUS, {"cam": {"layer": "block3"}}),
    (pb.LAYER_CAM, {}),
]


@pytest.mark.parametrize("method,params", METHODS, ids=[pb.Method.Name(m) for m, _ in METHODS])
def test_every_online_method_answers(stub, demo_batch, method, params):
    x = demo_batch.images[:2]
    response = stub.Explain(explain_request(x, method, request_id=f"m{method}", **params), timeout=60)
    assert response.request_id == f"m{method}" and response.model == "demo" and response.method == method
    assert len(response.model_version) == 64 and response.timings.total_ms > 0
    assert response.timings.batch_samples >= 2 and response.timings.batch_requests == 1
    for item in response.items:
        assert len(item.predicted_classes) == 4 and len(item.input_sha256) == 64
        (attribution,) = item.attributions
        assert attribution.method == method and attribution.target == item.predicted_classes[0]
        assert list(attribution.map.shape) == [64, 64] and attribution.map.dtype == pb.FLOAT32
        assert torch.isfinite(_array(attribution.map)).all()
        assert attribution.HasField("completeness_error") == (method == pb.INTEGRATED_GRADIENTS)


def test_predictions_match_the_model_run_in_process(stub, demo_batch, demo_registry):
    response = stub.Explain(explain_request(demo_batch.images, pb.GRAD_CAM), timeout=60)
    with torch.inference_mode():
        probs = torch.softmax(demo_registry.get().module(to_model_space(demo_batch.images)), dim=1)
    for item, expected in zip(response.items, probs):
        assert item.predicted_classes[0] == int(expected.argmax())
        torch.testing.assert_close(torch.tensor(item.predicted_scores[0]), expected.max(), rtol=1e-4, atol=1e-5)


def test_output_options(stub, demo_batch):
    x = demo_batch.images[:2]
    request = explain_request(x, pb.SMOOTHGRAD, noise={"samples": 2}, target={"top_k": 2},
                              output={"reduction": pb.NONE, "dtype": pb.UINT8, "png_overlay": True}, seed=7)
    response = stub.Explain(request, timeout=60)
    for item in response.items:
        first, second = item.attributions
        assert first.target == item.predicted_classes[0] and second.target == item.predicted_classes[1]
        assert first.target_score >= second.target_score
        raw = _array(first.map)
        assert raw.shape == (3, 64, 64) and raw.dtype == torch.uint8 and int(raw.max()) == 255
        overlay = tvio.decode_png(torch.frombuffer(bytearray(first.png_overlay), dtype=torch.uint8))
        assert overlay.shape == (3, 64, 64)
    again = stub.Explain(request, timeout=60)
    assert [a.map_sha256 for i in again.items for a in i.attributions] == \
        [a.map_sha256 for i in response.items for a in i.attributions]  # seeded: reproducible


def test_cam_variants_native_maps_and_float16(stub, demo_batch):
    request = explain_request(demo_batch.images[:1], pb.GRAD_CAM, cam={"also": [pb.LAYER_CAM]},
                              output={"native_resolution": True, "dtype": pb.FLOAT16},
                              target={"class_indices": {"indices": [int(demo_batch.labels[0])]}})
    (item,) = stub.Explain(request, timeout=60).items
    assert [a.method for a in item.attributions] == [pb.GRAD_CAM, pb.LAYER_CAM]
    for attribution in item.attributions:
        assert attribution.target == int(demo_batch.labels[0]) and attribution.map.dtype == pb.FLOAT16
        assert list(attribution.native_map.shape) == [16, 16]


def test_encoded_images_match_the_tensor_path(stub, demo_batch):
    x = demo_batch.images[:2]
    as_u8 = (x * 255).round().to(torch.uint8)
    pngs = [bytes(tvio.encode_png(img).numpy()) for img in as_u8]
    big = torch.nn.functional.interpolate(x[:1], size=(128, 128), mode="nearest")
    jpeg = bytes(tvio.encode_jpeg((big[0] * 255).round().to(torch.uint8), quality=98).numpy())
    request = pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pb.Inputs(images=pb.EncodedImages(images=pngs + [jpeg])))
    from_images = stub.Explain(request, timeout=60)
    tensor_request = pb.ExplainRequest(method=pb.GRAD_CAM,
                                       inputs=pb.Inputs(tensor=pixels_tensor(as_u8.float() / 255, "float32")))
    from_tensor = stub.Explain(tensor_request, timeout=60)
    for a, b in zip(from_images.items[:2], from_tensor.items):
        assert a.input_sha256 == b.input_sha256 and list(a.predicted_classes) == list(b.predicted_classes)
    assert from_images.items[2].predicted_classes[0] == from_images.items[0].predicted_classes[0]


def test_answers_say_where_the_model_input_lies_in_each_image(stub, start_server, service_cache_dir, demo_batch):
    wide = torch.nn.functional.interpolate(demo_batch.images[:1], size=(64, 128), mode="nearest")
    png = bytes(tvio.encode_png((wide[0] * 255).round().to(torch.uint8)).numpy())
    request = pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pb.Inputs(images=pb.EncodedImages(images=[png])))
    g = stub.Explain(request, timeout=60).items[0].geometry
    assert (g.width, g.height, g.resize, g.x0, g.y0, g.x1, g.y1) == (128, 64, "stretch", 0, 0, 128, 64)
    tensor_request = explain_request(demo_batch.images[:1], pb.GRAD_CAM)
    assert not stub.Explain(tensor_request, timeout=60).items[0].HasField("geometry")
    # The same demo model configured to centre-crop, as torchvision's classification transforms do.
    registry = ModelRegistry([ModelConfig(name="demo", source="demo", input=InputSpec(resize="center_crop"))],
                             cache_dir=service_cache_dir)
    harness = start_server(LocalBackend(registry))
    try:
        with grpc.insecure_channel(harness.address) as channel:
            cropping = pb_grpc.AttributionServiceStub(channel)
            spec = cropping.GetModel(pb.GetModelRequest(name="demo"), timeout=30).input_spec
            assert spec.resize == "center_crop" and spec.crop_fraction == pytest.approx(0.875)
            item = cropping.Explain(request, timeout=60).items[0]
            g = item.geometry
            # 64 / 0.875 covers the 64-pixel side: the centred 56 x 56 square of the 128 x 64 image.
            assert (g.width, g.height, g.resize, g.x0, g.y0, g.x1, g.y1) == (128, 64, "center_crop", 36, 4, 92, 60)
            assert list(item.attributions[0].map.shape) == [64, 64]
    finally:
        harness.stop()


def test_request_id_from_metadata(stub, demo_batch):
    request = explain_request(demo_batch.images[:1])
    response = stub.Explain(request, timeout=60, metadata=(("x-request-id", "trace-42"),))
    assert response.request_id == "trace-42"
    assert len(stub.Explain(request, timeout=60).request_id) == 32


def test_request_id_log_filter():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)

    def inside() -> str:
        REQUEST_ID.set("abc")
        RequestIdLogFilter().filter(record)
        return record.request_id

    assert contextvars.copy_context().run(inside) == "abc"
    RequestIdLogFilter().filter(record)
    assert record.request_id == "-"


# ------------------------------------------------------------- stream --

def test_stream_answers_every_request_by_id_and_survives_errors(stub, demo_batch):
    x = demo_batch.images
    requests = [explain_request(x[i:i + 1], pb.SMOOTHGRAD, noise={"samples": 4}, request_id=f"r{i}") if i % 2
                else explain_request(x[i:i + 1], pb.GRAD_CAM, request_id=f"r{i}") for i in range(6)]
    requests[2].method = pb.SCORE_CAM  # offline only: this one fails, the stream goes on
    requests[4].inputs.tensor.CopyFrom(pixels_tensor(torch.rand(1, 3, 32, 32)))
    requests.append(explain_request(x[:1]))  # no id: the server makes one
    answers = list(stub.ExplainStream(iter(requests), timeout=120))
    by_id = {a.request_id: a for a in answers}
    assert len(answers) == 7 and {f"r{i}" for i in range(6)} < set(by_id)
    for i in (2, 4):
        error = by_id[f"r{i}"].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not by_id[f"r{i}"].items
    assert "SubmitJob" in by_id["r2"].error.message and "Resize first" in by_id["r4"].error.message
    for i in (0, 1, 3, 5):
        answer = by_id[f"r{i}"]
        assert not answer.HasField("error") and answer.method == requests[i].method and len(answer.items) == 1
    (generated,) = set(by_id) - {f"r{i}" for i in range(6)}
    assert len(generated) == 32


def test_stream_with_one_slot_and_unknown_model(start_server, demo_batch):
    harness = start_server(stream_max_in_flight=1)
    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            requests = [explain_request(demo_batch.images[:1], request_id=f"s{i}") for i in range(4)]
            requests[1].model = "missing"
            answers = list(stub.ExplainStream(iter(requests), timeout=60))
    finally:
        harness.stop()
    assert [a.request_id for a in answers] == ["s0", "s1", "s2", "s3"]  # one slot: in order
    assert answers[1].error.code == grpc.StatusCode.NOT_FOUND.value[0] and answers[1].model == "missing"


# ------------------------------------------------- health, reflection --

def test_reflection_lists_and_describes_the_service(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    assert {"Explain", "ExplainStream", "ListModels", "GetModel", "SubmitJob"} <= {m.name for m in service.methods}


def test_health_watch_flips_to_not_serving_and_in_flight_calls_finish(start_server, demo_batch):
    harness = start_server()
    channel = grpc.insecure_channel(harness.address)
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.AttributionServiceStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
    assert next(watch).status == SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == SERVING
    slow = explain_request(demo_batch.images, pb.SMOOTHGRAD, noise={"samples": 64})
    outcome: dict = {}
    caller = threading.Thread(target=lambda: outcome.update(response=stub.Explain(slow, timeout=120)))
    caller.start()
    registry = harness.running.metrics.registry
    while not registry.get_sample_value("attribution_inflight_requests"):
        time.sleep(0.005)
    stopper = threading.Thread(target=harness.stop, kwargs={"grace": 60.0})
    stopper.start()
    assert next(watch).status == NOT_SERVING
    caller.join(120)
    stopper.join(120)
    assert len(outcome["response"].items) == 8  # the in-flight call finished within the grace period
    assert harness.backend._closed  # then the backend was closed
    assert list(watch) == []  # after NOT_SERVING the Watch stream ended cleanly, releasing the server
    with pytest.raises(grpc.RpcError) as info:
        stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_a_taken_port_fails_loudly(server, demo_registry):
    backend = LocalBackend(demo_registry)
    with pytest.raises(OSError, match="cannot listen"):
        ServerHarness(test_config(port=server.running.port), backend)
    asyncio.run(backend.close())


def test_message_size_cap(start_server):
    harness = start_server(max_message_bytes=1 << 20)
    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            big = explain_request(torch.rand(80, 3, 64, 64))  # ~3.9 MB
            with pytest.raises(grpc.RpcError) as info:
                stub.Explain(big, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        from service.client import AttributionClient, ServiceError

        with AttributionClient(harness.address, timeout=30) as client:  # the client says what to change
            with pytest.raises(ServiceError) as said:
                client.explain_request(big, retry=False)
        assert said.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "send PNG/JPEG" in said.value.details()
    finally:
        harness.stop()


# ---------------------------------------------------------------- auth --

def test_bearer_token_auth(start_server, demo_batch):
    harness = start_server(auth_token="s3cret")
    try:
        with grpc.insecure_channel(harness.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ExplainStream(iter([explain_request(demo_batch.images[:1])]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret"),)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=good).models
            answers = list(stub.ExplainStream(iter([explain_request(demo_batch.images[:1])]), timeout=60,
                                              metadata=good))
            assert len(answers) == 1 and not answers[0].HasField("error")
            health = health_pb2_grpc.HealthStub(channel)  # probes and tooling need no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            assert SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        harness.stop()


# -------------------------------------------------------------- config --

def test_config_bounds_and_from_dict():
    config = ServerConfig.from_dict({"port": 0, "metrics_port": None, "keepalive": {"time_s": 30},
                                     "limits": {"max_items": 8}})
    assert config.port == 0 and config.metrics_port is None and config.keepalive.time_s == 30
    assert config.limits == Limits(max_items=8) and config.max_message_bytes >= 16 * 2 * 3 * 224 * 224 * 4
    assert ServerConfig.from_dict({"coalesce": {"max_requests": 1}}).coalesce.backend_options() == {
        "coalesce_max_requests": 1, "coalesce_max_cost": 256, "max_in_flight_per_replica": 4,
        "adaptive_in_flight": False}
    for bad in ({"port": 70000}, {"tls_cert": "a.pem"}, {"stream_max_in_flight": 0}, {"grace_s": -1},
                {"limits": {"max_items": 0}}, {"keepalive": {"time_s": 0}}, {"bogus": 1}, {"limits": {"x": 1}},
                {"max_message_bytes": 10}, {"torch_threads": 0}, {"coalesce": {"max_requests": 0}},
                {"coalesce": {"max_cost": 0}}, {"coalesce": {"window": 1}}, {"inline_max_bytes": -1},
                {"coalesce": {"max_in_flight_per_replica": -1}}, {"inline_max_calls": -1}):
        with pytest.raises(InvalidArgument):
            ServerConfig.from_dict(bad)
