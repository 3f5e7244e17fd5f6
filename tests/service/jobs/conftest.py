"""Job fixtures: `start_service`, the shipped server (`create_server` with jobs) on port 0 on its
own event loop thread, with the offline worker in-process or on real Ray Serve.
"""
from __future__ import annotations

import asyncio
import pathlib
from typing import Any, Coroutine

import grpc
import pytest
import torch

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.jobs import JobsConfig
from service.server import create_server
from tests.support import LoopThread
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
    """The shipped server (`service.server.create_server` with jobs and an audit log in `data_dir`) on
    its own event loop thread; tests talk to it over a socket or call its job service on that loop."""

    def __init__(self, online, offline, data_dir: pathlib.Path, config: JobsConfig, audit=None):
        self.thread = LoopThread()
        self.online, self.offline, self.data_dir, self.config = online, offline, data_dir, config
        try:
            self.server = self.call(create_server(
                ServerConfig(host="127.0.0.1", port=0, metrics_port=None, grace_s=0.0), online,
                offline=offline, data_dir=data_dir, jobs=config, audit=audit))
        except BaseException:
            self.thread.close()
            raise
        self.jobs, self.metrics, self.port = self.server.jobs, self.server.metrics, self.server.port
        self._channels: list[grpc.Channel] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.thread.loop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine, timeout: float = 120.0):
        return self.thread.call(coro, timeout)

    def stub(self) -> pb_grpc.AttributionServiceStub:
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return pb_grpc.AttributionServiceStub(channel)

    def collect(self, agen, limit: float = 120.0) -> list:
        """Every item of an async generator run on the server's loop."""
        async def drain():
            return [item async for item in agen]

        return self.call(drain(), limit)

    def stop(self) -> None:
        if self.thread.loop.is_closed():
            return
        try:
            self.call(self.server.stop(0.0))  # jobs back to the queue, backend and audit log closed
        finally:
            for channel in self._channels:
                channel.close()
            self.thread.close()


@pytest.fixture
def start_service(tmp_path, demo_registry):
    """start_service(online=None, offline=None, config=...) -> ServiceHarness; stopped at teardown.

    Without backends it runs in-process (LocalBackend + LocalOfflineWorker on the demo
    model); pass ServeBackend / ServeOfflineBackend for the real Ray path.
    """
    from service.backends.local import LocalBackend

    started = []

    def start(online=None, offline=None, config: JobsConfig | None = None, data_dir=None,
              audit=None) -> ServiceHarness:
        config = config or JobsConfig(offline=FAST, progress_persist_s=0.0, poll_s=0.5)
        harness = ServiceHarness(online or LocalBackend(demo_registry),
                                 offline or LocalOfflineWorker(demo_registry, config.offline),
                                 data_dir or tmp_path / "data", config, audit=audit)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.stop()

