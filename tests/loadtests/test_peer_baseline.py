"""The peer baseline over a real socket: it answers Explain with Captum / pytorch-grad-cam maps that match ours.

Both servers run the demo model; the same request goes to each. Expected
differences (loadtests/peer_baseline.py): pytorch-grad-cam min-max normalizes
CAM maps (so we ask ours for MIN_MAX), and SmoothGrad noise draws differ (so
the exact check uses a tiny noise fraction, the loose one a correlation).
"""
from __future__ import annotations


import grpc
import numpy as np
import pytest
import torch

from loadtests.peer_baseline import start_peer
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.server import create_server
from workers.serve.app import AppConfig
from workers.config import ModelConfig
from workers.demo import DemoConfig, make_watermark_dataset
from service.backends.local import LocalBackend
from workers.models import ModelRegistry
from tests.support import LoopThread


@pytest.fixture(scope="module")
def cache_dir(request):
    try:
        return request.getfixturevalue("demo_cache_dir")
    except pytest.FixtureLookupError:
        return None


@pytest.fixture(scope="module")
def stubs(cache_dir):
    """(ours, peer): stubs to our front door (LocalBackend) and to the peer, both on the demo model."""
    loop = LoopThread()
    demo = ModelConfig(name="demo", source="demo")
    ours = loop.call(create_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, grace_s=0.0),
                                   LocalBackend(ModelRegistry([demo], cache_dir=cache_dir))))
    peer = loop.call(start_peer(AppConfig(models=(demo,), cache_dir=str(cache_dir or "")), port=0, threads=1))
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in (ours.port, peer.port)]
    yield tuple(pb_grpc.AttributionServiceStub(ch) for ch in channels)
    for ch in channels:
        ch.close()
    loop.call(peer.stop(0.0))
    loop.call(ours.stop(0.0))
    loop.close()


@pytest.fixture(scope="module")
def images():
    """Two held-out watermark images, uint8 pixels `# (2, 3, 64, 64)` as a wire input."""
    data = make_watermark_dataset(2, seed=4321, config=DemoConfig())
    pixels = (data.images * 255).round().to(torch.uint8).contiguous()
    return pb.Inputs(tensor=pb.Tensor(data=pixels.numpy().tobytes(), dtype=pb.UINT8, shape=list(pixels.shape)),
                     space=pb.PIXELS)


def both(stubs, request: pb.ExplainRequest) -> tuple[pb.ExplainResponse, pb.ExplainResponse]:
    return tuple(stub.Explain(request, timeout=120) for stub in stubs)  # type: ignore[return-value]


def maps(response: pb.ExplainResponse) -> list[np.ndarray]:
    """Every attribution map of the response, float32, item by item."""
    return [np.frombuffer(a.map.data, dtype=np.float32).reshape(tuple(a.map.shape))
            for item in response.items for a in item.attributions]


def test_grad_cam_variants_match_ours_after_min_max(stubs, images):
    # pytorch-grad-cam min-max normalizes every map; ours does when asked.
    request = pb.ExplainRequest(model="demo", method=pb.GRAD_CAM, inputs=images,
                                cam=pb.CamParams(also=[pb.LAYER_CAM, pb.GRAD_CAM_PLUS_PLUS]),
                                output=pb.OutputOptions(normalization=pb.MIN_MAX))
    ours, peer = both(stubs, request)
    assert [a.method for i in peer.items for a in i.attributions] == \
        [a.method for i in ours.items for a in i.attributions]
    assert [a.target for i in peer.items for a in i.attributions] == \
        [a.target for i in ours.items for a in i.attributions]
    for a, b in zip(maps(ours), maps(peer)):
        assert a.shape == b.shape == (64, 64)
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_integrated_gradients_matches_ours(stubs, images):
    request = pb.ExplainRequest(model="demo", method=pb.INTEGRATED_GRADIENTS, inputs=images,
                                integrated_gradients=pb.IntegratedGradientsParams(steps=32))
    ours, peer = both(stubs, request)
    for a, b in zip(maps(ours), maps(peer)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * float(np.abs(a).max()))
    for x, y in zip(ours.items, peer.items):
        assert y.attributions[0].completeness_error == pytest.approx(x.attributions[0].completeness_error, abs=1e-3)


def test_smoothgrad_matches_ours_up_to_the_noise_draws(stubs, images):
    # Near-zero noise: both are the mean of (almost) the same gradient.
    quiet = pb.ExplainRequest(model="demo", method=pb.SMOOTHGRAD, inputs=images, seed=7,
                              noise=pb.NoiseParams(samples=8, noise_fraction=1e-5))
    ours, peer = both(stubs, quiet)
    for a, b in zip(maps(ours), maps(peer)):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-3 * float(np.abs(a).max()))
    # Real noise, different draws: the same picture, not the same pixels.
    noisy = pb.ExplainRequest(model="demo", method=pb.SMOOTHGRAD, inputs=images, seed=7,
                              noise=pb.NoiseParams(samples=64, noise_fraction=0.15))
    ours, peer = both(stubs, noisy)
    for a, b in zip(maps(ours), maps(peer)):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_peer_reports_unbatched_timings_and_models(stubs, images):
    _, peer_stub = stubs
    reply = peer_stub.Explain(pb.ExplainRequest(method=pb.SMOOTHGRAD, inputs=images,
                                                noise=pb.NoiseParams(samples=4)), timeout=60)
    assert reply.model == "demo" and len(reply.items) == 2
    assert reply.timings.batch_requests == 1 and reply.timings.batch_samples == 8  # 2 items x 4 samples
    assert reply.timings.compute_ms > 0 and reply.timings.total_ms >= reply.timings.compute_ms
    (info,) = peer_stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert info.name == "demo" and info.is_default and info.input_spec.height == 64


def test_peer_refusals_carry_status_codes(stubs, images):
    _, peer_stub = stubs
    with pytest.raises(grpc.RpcError) as missing:
        peer_stub.Explain(pb.ExplainRequest(model="nope", method=pb.GRAD_CAM, inputs=images), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        peer_stub.Explain(pb.ExplainRequest(model="demo", inputs=images), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as jobs:
        peer_stub.SubmitJob(pb.SubmitJobRequest(), timeout=10)
    assert jobs.value.code() == grpc.StatusCode.UNIMPLEMENTED
