"""client.py against real servers: arrays and files in, numpy out, retries, deadlines, auth, TLS."""
from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import torchvision.io as tvio

from service._proto import attribution_pb2 as pb
from service.client import (AsyncAttributionClient, AttributionClient, RetryPolicy, ServiceError,
                            array_from_tensor, build_request, tensor_from_array)
from tests.support import self_signed_cert

FAST_RETRY = RetryPolicy(max_attempts=200, initial_backoff_s=0.02, max_backoff_s=0.2)


@pytest.fixture(scope="module")
def client(server):
    with AttributionClient(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def images(demo_batch) -> np.ndarray:
    return demo_batch.images[:2].numpy()  # (2, 3, 64, 64) float32 pixels


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.float64])
def test_array_round_trip(dtype):
    a = (np.random.default_rng(0).random((2, 3, 4, 5)) * 200).astype(dtype)
    back = array_from_tensor(tensor_from_array(a))
    expected = a.astype(np.float32) if dtype == np.float64 else a
    assert back.dtype == expected.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(TypeError, match="float32, float16 or uint8"):
        tensor_from_array(a.astype(np.int32))


def test_models(client, server, capsys):
    (info,) = client.models()
    assert info.name == "demo" and client.model().name == "demo"
    assert info.input_spec.resize == "stretch"
    from service.cli import models as models_cli
    args = argparse.Namespace(server=server.address, token=None, ca=None, cert=None, key=None, timeout=10.0,
                              json=False)
    assert models_cli.run(args) == 0
    assert "input 3x64x64 (stretch)" in capsys.readouterr().out


def test_photo_results_carry_their_geometry(client, images):
    png = bytes(tvio.encode_png(torch.from_numpy((images[0] * 255).round().astype(np.uint8))).numpy())
    (item,) = client.explain(images=[png], method="grad_cam").items
    assert (item.geometry.width, item.geometry.height, item.geometry.resize) == (64, 64, "stretch")
    assert client.explain(images[:1], method="grad_cam").items[0].geometry is None


def test_layouts_dtypes_and_torch_agree(client, images):
    by_nchw = client.explain(images, method="grad_cam")
    by_nhwc = client.explain(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), method="GRAD_CAM", layout="NHWC")
    by_torch = client.explain(torch.from_numpy(images), method=pb.GRAD_CAM)
    hashes = lambda r: [i.input_sha256 for i in r.items]
    assert hashes(by_nchw) == hashes(by_nhwc) == hashes(by_torch)
    np.testing.assert_array_equal(by_nchw.maps, by_nhwc.maps)
    as_u8 = (images * 255).round().astype(np.uint8)
    from_u8 = client.explain(as_u8, method="grad_cam")
    from_float = client.explain(as_u8.astype(np.float32) / 255, method="grad_cam")
    assert hashes(from_u8) == hashes(from_float)
    half = client.explain(images.astype(np.float16), method="grad_cam")
    assert half.maps.shape == (2, 1, 64, 64) and half.predictions == by_nchw.predictions


def test_result_object(client, images):
    result = client.explain(images, method="smoothgrad", samples=4, top_k=2, dtype="float16", png_overlay=True,
                            request_id="mine", seed=3)
    assert result.request_id == "mine" and result.model == "demo" and result.method == "smoothgrad"
    assert result.maps.shape == (2, 2, 64, 64) and result.maps.dtype == np.float16 and result.error is None
    assert result.timings["batch_samples"] == 2 * 2 * 4 and result.timings["total_ms"] > 0
    first = result.items[0].attributions[0]
    assert first.method == "smoothgrad" and first.png_overlay.startswith(b"\x89PNG") and len(first.map_sha256) == 64
    assert result.predictions == [item.predicted_classes[0] for item in result.items]
    ig = client.explain(images, method="integrated_gradients", steps=8, baseline="blurred", blur_sigma=2.0,
                        rule="riemann_trapezoid")
    assert all(a.completeness_error is not None for i in ig.items for a in i.attributions)
    custom = client.explain(images, method="integrated_gradients", steps=4, baseline=np.zeros_like(images[:1]))
    assert custom.maps.shape == (2, 1, 64, 64)
    cam = client.explain(images, method="grad_cam", layer="block3", also=["layer_cam"], native_resolution=True,
                         target=[0, 1], reduction="none", normalization="min_max")
    assert [a.method for a in cam.items[1].attributions] == ["grad_cam", "layer_cam"]
    assert cam.items[1].attributions[0].target == 1 and cam.items[1].attributions[0].native_map.shape == (16, 16)
    assert 0.0 <= cam.maps.min() and cam.maps.max() <= 1.0


def test_images_by_path(client, images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(tvio.encode_png(torch.from_numpy((image * 255).round().astype(np.uint8))).numpy().tobytes())
        paths.append(path)
    by_path = client.explain(images=paths, method="vanilla")
    by_array = client.explain((images * 255).round().astype(np.uint8), method="vanilla")
    assert [i.input_sha256 for i in by_path.items] == [i.input_sha256 for i in by_array.items]


def test_errors_are_typed(client, images):
    with pytest.raises(ServiceError) as info:
        client.explain(images, method="smoothgrad", samples=1000, top_k=9)
    error = info.value
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in error.violations} == {"noise.samples", "target.top_k"} and "1..256" in error.details()
    with pytest.raises(ServiceError) as info:
        client.explain(images, model="nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and not info.value.violations
    with pytest.raises(TypeError, match="takes no samples"):
        client.explain(images, method="grad_cam", samples=3)
    with pytest.raises(ValueError, match="unknown Method"):
        build_request(images, method="deeplift")
    with pytest.raises(ValueError, match="exactly one"):
        build_request()


def test_stream(client, images):
    requests = [build_request(images[:1], method="grad_cam", request_id=f"q{i}") for i in range(3)]
    requests[1].method = pb.OCCLUSION
    answers = {a.request_id: a for a in client.explain_stream(requests)}
    assert set(answers) == {"q0", "q1", "q2"}
    assert answers["q1"].error.code() == grpc.StatusCode.INVALID_ARGUMENT and not answers["q1"].items
    assert answers["q0"].error is None and answers["q2"].maps.shape == (1, 1, 64, 64)


def test_deadline(client, images):
    with pytest.raises(ServiceError) as info:
        client.explain(images, method="smoothgrad", samples=64, timeout=0.001, retry=False)
    # Either the deadline fires first, or admission answers first that the work cannot finish in time.
    assert info.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert client.models()  # the server is fine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_until_a_late_server_is_up(start_server, images):
    port = _free_port()
    outcome: dict = {}
    calling = threading.Event()

    def call() -> None:
        with AttributionClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=30) as late:
            calling.set()
            try:
                outcome["result"] = late.explain(images, method="vanilla")
            except Exception as exc:  # reported below
                outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    calling.wait(10)
    time.sleep(0.3)  # the first attempts find nothing listening
    harness = start_server(port=port)
    try:
        caller.join(60)
    finally:
        harness.stop()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].maps.shape == (2, 1, 64, 64)


def test_retries_are_bounded_by_attempts_and_timeout():
    port = _free_port()
    with AttributionClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c:
        with pytest.raises(ServiceError) as info:
            c.models(timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A server that answers every call UNAVAILABLE and counts them: the 1 s budget, not the 200
    # attempts the policy allows, ends the retries (backoff from 20 ms up to 200 ms fits ~10 in 1 s).
    calls = []

    def unavailable(request, context):
        calls.append(1)
        context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")

    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("attribution.v1.AttributionService", {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            unavailable, request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString)})])
    bound = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with AttributionClient(f"127.0.0.1:{bound}", retry=FAST_RETRY) as c:
            with pytest.raises(ServiceError) as info:
                c.models(timeout=1.0)
    finally:
        server.stop(0)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 2 <= len(calls) <= 20, len(calls)


def test_async_client(server, images):
    async def main():
        async with AsyncAttributionClient(server.address, timeout=60) as c:
            models = await c.models()
            result = await c.explain(images, method="layer_cam")
            requests = [build_request(images[:1], method="vanilla", request_id=f"a{i}") for i in range(3)]
            streamed = [a async for a in c.explain_stream(requests)]
            with pytest.raises(ServiceError) as info:
                await c.explain(images, method="vanilla", target=7)
            return models, result, streamed, info.value

    models, result, streamed, error = asyncio.run(main())
    assert models[0].name == "demo" and result.maps.shape == (2, 1, 64, 64)
    assert sorted(a.request_id for a in streamed) == ["a0", "a1", "a2"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.violations


def test_tls_and_token(start_server, images, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed_cert(tmp_path)
    harness = start_server(tls_cert=str(cert), tls_key=str(key), auth_token="t0ken")
    try:
        with AttributionClient(harness.address, root_certificates=cert, token="t0ken") as c:
            assert c.explain(images, method="vanilla").maps.shape == (2, 1, 64, 64)
        with AttributionClient(harness.address, root_certificates=cert.read_bytes()) as c:
            with pytest.raises(ServiceError) as info:
                c.models()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        no_retry = RetryPolicy(max_attempts=1)
        with AttributionClient(harness.address, token="t0ken", retry=no_retry) as plaintext:
            with pytest.raises(ServiceError) as info:
                plaintext.models(timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        harness.stop()
