"""A model with an autoscaling config scales from 1 to 2 replicas under sustained load, and back."""
from __future__ import annotations

import threading
import time

import pytest

from service._proto import attribution_pb2 as pb
from service.backends.serve import ServeBackend
from tests.service.conftest import explain_request
from tests.support import LoopThread, start_front_door
from workers.serve.app import AppConfig, app_name, deploy_all, shutdown_all
from workers.config import ModelConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2.0, "look_back_period_s": 1.0, "metrics_interval_s": 0.5}


def _running(model: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name(model))
    if app is None:
        return 0
    return sum(int(d.replica_states.get("RUNNING", 0)) for d in app.deployments.values())


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_scales_up_under_load_and_back_down(ray_session, demo_cache_dir, demo_batch):
    import grpc

    from service._proto import attribution_pb2_grpc as pb_grpc

    app = AppConfig(models=(ModelConfig(name="demo", source="demo", num_cpus=0.5, autoscaling=AUTOSCALING),),
                    cache_dir=str(demo_cache_dir))
    deploy_all(app)
    loop = LoopThread()
    running = start_front_door(loop, ServeBackend.from_config(app))
    stop = threading.Event()
    try:
        assert _wait_for(lambda: _running("demo") == 1, 120)
        request = explain_request(demo_batch.images, pb.SMOOTHGRAD, noise={"samples": 32})

        def client():
            with grpc.insecure_channel(running.address) as channel:
                stub = pb_grpc.AttributionServiceStub(channel)
                while not stop.is_set():
                    try:
                        stub.Explain(request, timeout=60)
                    except grpc.RpcError:
                        time.sleep(0.05)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for thread in clients:
            thread.start()
        assert _wait_for(lambda: _running("demo") == 2, 120), "did not scale up to 2 replicas"
        stop.set()
        for thread in clients:
            thread.join(timeout=90)
        assert _wait_for(lambda: _running("demo") == 1, 120), "did not scale back down to 1 replica"
    finally:
        stop.set()
        loop.call(running.stop(0.0))
        loop.close()
        shutdown_all(app)
