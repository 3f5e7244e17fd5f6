"""Job fixtures: the session's Ray instance, and `start_service`: a real gRPC server on port 0
(the real servicer, its job RPCs delegated to JobService; see jobs_server.py) on its own
event loop thread, with the offline worker in-process or on real Ray Serve.
"""
from __future__ import annotations

import asyncio
import pathlib
import threading
from typing import Any, Coroutine

import grpc
import pytest
import torch

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.jobs import JobsConfig
from tests.service.jobs.jobs_server import start_jobs_server
from workers.config import OfflineConfig
from workers.offline import LocalOfflineWorker

# Small chunks: a few-image Score-CAM job reports progress many times and can be cancelled midway.
FAST = OfflineConfig(items_per_chunk=2, fold_max_rows=8)


def pixels(images: torch.Tensor) -> pb.Inputs:
    """Pixel-space float32 images `# (N, 3, 64, 64)` as wire inputs."""
    x = images.contiguous()
    return pb.Inputs(tensor=pb.Tensor(data=x.numpy().tobytes(), dtype=pb.FLOAT32, shape=list(x.shape)),
                     space=pb.PIXELS)


def job_request(images: torch.Tensor, method: int = pb.SCORE_CAM, priority: int = 0, key: str = "",
                **params: Any) -> pb.SubmitJobRequest:
    """A SubmitJobRequest for `images`; `params` set the method's parameter message (e.g. occlusion=...)."""
    request = pb.ExplainRequest(method=method, inputs=pixels(images))
    for name, value in params.items():
        getattr(request, name).CopyFrom(value)
    return pb.SubmitJobRequest(request=request, priority=priority, idempotency_key=key)


# ----------------------------------------------------------------- server

class ServiceHarness:
    """A gRPC server with the job RPCs on its own event loop thread; tests talk to it over a socket."""

    def __init__(self, online, offline, data_dir: pathlib.Path, config: JobsConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jobs-server-loop", daemon=True)
        self._thread.start()
        self.online, self.offline, self.data_dir, self.config = online, offline, data_dir, config
        self.call(self._start())

    async def _start(self) -> None:
        running = await start_jobs_server(self.online, self.offline, self.data_dir, self.config)
        self.server, self.jobs, self.metrics, self.port = running, running.jobs, running.metrics, running.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stub(self) -> pb_grpc.AttributionServiceStub:
        channel = grpc.insecure_channel(self.address)
        self._channels = getattr(self, "_channels", []) + [channel]
        return pb_grpc.AttributionServiceStub(channel)

    def collect(self, agen, limit: float = 120.0) -> list:
        """Every item of an async generator run on the server's loop."""
        async def drain():
            return [item async for item in agen]

        return self.call(drain(), limit)

    def stop(self) -> None:
        if self.loop.is_closed():
            return

        async def _stop():
            await self.server.stop()
            await self.online.close()

        self.call(_stop())
        for channel in getattr(self, "_channels", []):
            channel.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def start_service(tmp_path, demo_registry):
    """start_service(online=None, offline=None, config=...) -> ServiceHarness; stopped at teardown.

    Without backends it runs in-process (LocalBackend + LocalOfflineWorker on the demo
    model); pass ServeBackend / ServeOfflineBackend for the real Ray path.
    """
    from workers.local import LocalBackend

    started = []

    def start(online=None, offline=None, config: JobsConfig | None = None, data_dir=None) -> ServiceHarness:
        config = config or JobsConfig(offline=FAST, progress_persist_s=0.0, poll_s=0.5)
        harness = ServiceHarness(online or LocalBackend(demo_registry),
                                 offline or LocalOfflineWorker(demo_registry, config.offline),
                                 data_dir or tmp_path / "data", config)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.stop()

