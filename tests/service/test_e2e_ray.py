"""End to end over a real socket, a real local Ray and the real Serve deployment of the demo model."""
from __future__ import annotations

import concurrent.futures
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service._proto import attribution_pb2 as pb
from service.client import AttributionClient, ServiceError
from service.retry import RetryPolicy
from service.backends.serve import ServeBackend
from tests.support import LoopThread, start_front_door
from workers.serve.app import AppConfig, app_name, deploy_all, shutdown_all
from workers.config import BatchingConfig, ModelConfig
from service.backends.local import LocalBackend
from workers.models import ModelRegistry
from workers.spec import ExplainSpec, MethodParams

ONLINE = [("vanilla", {}), ("smoothgrad", {"samples": 8}), ("smoothgrad_sq", {"samples": 4}),
          ("vargrad", {"samples": 4}), ("integrated_gradients", {"steps": 8}), ("grad_cam", {}),
          ("grad_cam_plus_plus", {}), ("layer_cam", {"layer": "block3"})]


@pytest.fixture(scope="module")
def served(ray_session, demo_cache_dir):
    """The demo model on Ray Serve (wide batching window), fronted by a real gRPC server."""
    app = AppConfig(models=(ModelConfig(name="demo", source="demo"),), cache_dir=str(demo_cache_dir),
                    batching=BatchingConfig(batch_wait_timeout_s=0.05))
    deploy_all(app)
    loop = LoopThread()
    running = start_front_door(loop, ServeBackend.from_config(app))
    yield running
    loop.call(running.stop(0.0))
    loop.close()
    shutdown_all(app)


@pytest.fixture(scope="module")
def in_process(demo_cache_dir):
    return LocalBackend(ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=demo_cache_dir))


@pytest.fixture(scope="module")
def client(served):
    with AttributionClient(served.address, timeout=120) as c:
        yield c


def _pixels(demo_heldout, start: int, count: int = 1) -> np.ndarray:
    return demo_heldout.images[start:start + count].numpy()


@pytest.mark.parametrize("method, params", ONLINE)
def test_every_online_method_equals_the_in_process_kernel(client, in_process, demo_heldout, method, params):
    x = _pixels(demo_heldout, 0, 2)
    served = client.explain(x, method=method, seed=5, **params)
    spec = ExplainSpec(model="demo", method=method, seed=5, inputs=_model_space(x), params=MethodParams(**params))
    local = in_process.explain_sync(spec)
    for item, ref in zip(served.items, local.items):
        assert item.predicted_classes == ref.predicted_classes
        np.testing.assert_allclose(item.attributions[0].map, ref.attributions[0].map.numpy(), rtol=1e-4, atol=1e-6)


def test_uint8_pixels_cross_the_hop_as_pixels_and_explain_the_same_input(client, in_process, demo_heldout):
    """A uint8 request's spec carries its pixels over Ray, not the float tensor, and the replica
    rebuilds the very model-space input the front door validated (same input_sha256, same maps)."""
    u8 = (_pixels(demo_heldout, 0, 2) * 255).round().astype(np.uint8)
    served = client.explain(u8, method="integrated_gradients", steps=8, seed=3)
    as_float = client.explain(u8.astype(np.float32) / 255.0, method="integrated_gradients", steps=8, seed=3)
    spec = ExplainSpec(model="demo", method="integrated_gradients", seed=3,
                       inputs=_model_space(u8.astype(np.float32) / 255.0), params=MethodParams(steps=8))
    local = in_process.explain_sync(spec)
    for item, other, ref in zip(served.items, as_float.items, local.items):
        assert item.input_sha256 == other.input_sha256
        np.testing.assert_array_equal(item.attributions[0].map, other.attributions[0].map)
        np.testing.assert_allclose(item.attributions[0].map, ref.attributions[0].map.numpy(), rtol=1e-4, atol=1e-6)


def _model_space(x: np.ndarray) -> torch.Tensor:
    from workers.demo import to_model_space

    return to_model_space(torch.from_numpy(x))


def test_concurrent_batch1_requests_share_batches(client, served, in_process, demo_heldout):
    def one(i: int):
        return client.explain(_pixels(demo_heldout, i), method="grad_cam")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    sizes = [r.timings["batch_requests"] for r in results]
    assert max(sizes) > 1, sizes
    for i, r in enumerate(results):  # equal to unbatched
        (alone,) = in_process.explain_sync(ExplainSpec(model="demo", method="grad_cam",
                                                       inputs=_model_space(_pixels(demo_heldout, i)))).items
        np.testing.assert_allclose(r.items[0].attributions[0].map, alone.attributions[0].map.numpy(),
                                   rtol=1e-4, atol=1e-6)
    text = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = [s for s in families["attribution_batch_requests"].samples
               if s.name.endswith("_bucket") and s.labels["le"] == "1.0"]
    count = [s for s in families["attribution_batch_requests"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in count) > sum(s.value for s in buckets)  # some requests rode in batches > 1
    queue = [s for s in families["attribution_queue_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in queue) >= 32


def test_deadline_drop_and_isolation_inside_a_batch(client, demo_heldout):
    def one(i: int):
        timeout = 0.001 if i % 4 == 0 else 60
        try:
            return client.explain(_pixels(demo_heldout, i), method="smoothgrad", samples=16, timeout=timeout)
        except ServiceError as exc:
            return exc.code()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    for i, outcome in enumerate(outcomes):
        if i % 4 == 0:  # out of time, or refused at once by admission because it cannot finish in time
            assert outcome in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        else:
            assert not isinstance(outcome, grpc.StatusCode), outcome
    assert client.explain(_pixels(demo_heldout, 9), method="grad_cam").items  # still healthy


def test_validation_errors_and_offline_methods_are_refused(client, demo_heldout):
    with pytest.raises(ServiceError) as info:
        client.explain(_pixels(demo_heldout, 0), method="grad_cam", target=9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target" in info.value.details()
    with pytest.raises(ServiceError) as info:
        client.explain(_pixels(demo_heldout, 0), method="score_cam")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SubmitJob" in info.value.details()
    with pytest.raises(ServiceError) as info:
        client.explain(_pixels(demo_heldout, 0), method="grad_cam", model="nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    models = client.models()
    assert [m.name for m in models] == ["demo"] and pb.GRAD_CAM in models[0].online_methods


def test_backpressure_answers_resource_exhausted(ray_session, demo_cache_dir, demo_heldout):
    tight = ModelConfig(name="tight", source="demo")
    app = AppConfig(models=(tight,), cache_dir=str(demo_cache_dir),
                    batching=BatchingConfig(max_ongoing_requests=1, max_queued_requests=1, max_batch_samples=64,
                                            max_concurrent_batches=1))
    deploy_all(app)
    loop = LoopThread()
    try:
        running = start_front_door(loop, ServeBackend.from_config(app))
        # Client retries off: a refused call would otherwise be retried (honouring RetryInfo) until it fits,
        # and on a fast enough machine every call ends OK; this test is about the server's answers.
        with AttributionClient(running.address, timeout=120, retry=RetryPolicy.off()) as c:
            def one(i: int):
                try:
                    c.explain(_pixels(demo_heldout, i), method="smoothgrad", samples=256)
                    return "ok"
                except ServiceError as exc:
                    return exc.code()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(one, range(8)))
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes and "ok" in outcomes, outcomes
            assert set(outcomes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert c.explain(_pixels(demo_heldout, 0), method="grad_cam").items  # recovers
        loop.call(running.stop(0.0))
    finally:
        loop.close()
        shutdown_all(app)


def test_batching_reconfigures_at_runtime(served, ray_session, demo_cache_dir):
    from ray import serve

    from workers.serve.app import build_online_app, model_to_dict

    handle = serve.get_app_handle(app_name("demo"))
    before = handle.batching.remote().result()
    assert before["batch_wait_timeout_s"] == 0.05 and before["compute_slots"] == 2
    # Only the user_config changes: Serve calls reconfigure on the running replica, no restart.
    args = {"model": model_to_dict(ModelConfig(name="demo", source="demo")),
            "batching": {"max_batch_samples": 128, "batch_wait_timeout_s": 0.02, "max_concurrent_batches": 3},
            "device": "auto", "cache_dir": str(demo_cache_dir), "is_default": True}
    serve.run(build_online_app(args), name=app_name("demo"), route_prefix=None)
    deadline = time.time() + 60
    while time.time() < deadline:
        after = handle.batching.remote().result()
        if after["max_batch_samples"] == 128:
            break
        time.sleep(0.5)
    assert after["max_batch_samples"] == 128 and after["compute_slots"] == 3
    assert after["batch_wait_timeout_s"] == 0.02


def test_attach_discovers_the_running_applications(served):
    backend = ServeBackend.discover()
    assert backend.default == "demo" and list(backend._handles) == ["demo"]
