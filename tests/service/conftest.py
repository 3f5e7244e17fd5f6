"""Front-door fixtures: real servers on port 0 over real sockets, backed by LocalBackend on the demo model.

A server runs on its own event loop in a background thread, so tests stay
plain synchronous functions that talk to it through real gRPC channels.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Coroutine

import grpc
import pytest
import torch

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.server import RunningServer, create_server
from workers.config import ModelConfig
from workers.demo import DemoConfig, make_watermark_dataset
from service.backends.local import LocalBackend
from tests.support import LoopThread
from workers.models import ModelRegistry


class ServerHarness:
    """A RunningServer on a private event loop thread."""

    def __init__(self, config: ServerConfig, backend: Any, **create: Any):
        """`create`: further arguments of create_server (offline, data_dir, jobs, audit)."""
        self.thread = LoopThread("grpc-server-loop")
        self.loop = self.thread.loop
        self.backend = backend
        try:
            self.running: RunningServer = self.call(create_server(config, backend, **create))
        except BaseException:
            self.thread.close()
            raise
        self.stopped = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def call(self, coro: Coroutine, timeout: float = 120.0):
        """Runs `coro` on the server's loop and waits for its result."""
        return self.thread.call(coro, timeout)

    def stop(self, grace: float = 0.0) -> None:
        if not self.stopped:
            self.stopped = True
            self.call(self.running.stop(grace))
        self.thread.close()


def test_config(**overrides: Any) -> ServerConfig:
    """Loopback, any free port, grace 0; overrides win."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "grace_s": 0.0}
    values.update(overrides)
    return ServerConfig(**values)


test_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def service_cache_dir(request) -> pathlib.Path | None:
    """The shared demo cache (tests/conftest.py's `demo_cache_dir`), else the default one."""
    try:
        return request.getfixturevalue("demo_cache_dir")
    except pytest.FixtureLookupError:
        return None


@pytest.fixture(scope="session")
def demo_registry(service_cache_dir) -> ModelRegistry:
    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=service_cache_dir)
    registry.get()  # trains or loads once per session
    return registry


@pytest.fixture(scope="session")
def start_server(demo_registry) -> Callable[..., ServerHarness]:
    """Starts a server with a fresh LocalBackend on the shared demo model; the caller stops it."""

    def start(backend: Any = None, **overrides: Any) -> ServerHarness:
        return ServerHarness(test_config(**overrides), backend or LocalBackend(demo_registry))

    return start


@pytest.fixture(scope="module")
def server(start_server):
    """One server per test module (metrics exporter on a free port)."""
    harness = start_server(metrics_port=0, metrics_host="127.0.0.1")
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.AttributionServiceStub:
    return pb_grpc.AttributionServiceStub(channel)


@pytest.fixture(scope="session")
def demo_batch():
    """8 held-out watermark images with their labels and patch boxes (pixel space, (N, 3, 64, 64))."""
    return make_watermark_dataset(8, seed=12345, config=DemoConfig())


def pixels_tensor(images: torch.Tensor, dtype: str = "float32", layout: str = "NCHW") -> pb.Tensor:
    """Pixel-space images `# (N, C, H, W)` in [0, 1] as a wire tensor."""
    x = images
    if dtype == "uint8":
        x = (x * 255).round().to(torch.uint8)
    elif dtype == "float16":
        x = x.to(torch.float16)
    if layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    x = x.contiguous()
    enum = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "uint8": pb.UINT8}[dtype]
    return pb.Tensor(data=x.numpy().tobytes(), dtype=enum, shape=list(x.shape),
                     layout=pb.NHWC if layout == "NHWC" else pb.NCHW)


def explain_request(images: torch.Tensor, method: int = pb.VANILLA_GRADIENT, **fields: Any) -> pb.ExplainRequest:
    """A PIXELS float32 request for `images`; `fields` set further request fields."""
    request = pb.ExplainRequest(method=method, inputs=pb.Inputs(tensor=pixels_tensor(images), space=pb.PIXELS))
    for key, value in fields.items():
        if isinstance(value, dict):
            getattr(request, key).SetInParent()  # an empty dict still selects a oneof member
            getattr(request, key).MergeFrom(type(getattr(request, key))(**value))
        else:
            setattr(request, key, value)
    return request


@pytest.fixture(scope="module")
def observed_server(demo_registry, tmp_path_factory) -> ServerHarness:
    """A front door as deployed, for the Prometheus and Grafana tests: jobs (in-process offline worker) and an
    audit log in a temporary data directory, and its metrics exporter on a loopback port."""
    from service.jobs import JobsConfig
    from workers.config import OfflineConfig
    from workers.offline import LocalOfflineWorker

    jobs = JobsConfig(offline=OfflineConfig(items_per_chunk=2, fold_max_rows=8), progress_persist_s=0.0, poll_s=0.5)
    harness = ServerHarness(test_config(metrics_port=0, metrics_host="127.0.0.1"), LocalBackend(demo_registry),
                            offline=LocalOfflineWorker(demo_registry, jobs.offline),
                            data_dir=tmp_path_factory.mktemp("observed"), jobs=jobs)
    yield harness
    harness.stop()
