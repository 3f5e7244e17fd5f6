"""Session-wide fixtures: the embedded demo model and a held-out set with known answers.

The demo model is trained once per test session into a temporary cache (about
15 s of one CPU core); every fixture here is a pure function of
`DemoConfig()` and fixed seeds, never of the global RNG. Treat the session
objects as read-only: they are shared by every test.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from workers.demo import DemoConfig, DemoNet, WatermarkBatch, load_or_build_demo, make_watermark_dataset, to_model_space

# Held-out images come from seed + this offset: unlike the training seeds
# (seed for the watermarked scenes, seed + 1_000_003 for the blank ones).
HELDOUT_SEED_OFFSET = 10_007
HELDOUT_SIZE = 200


@pytest.fixture(scope="session")
def demo_config() -> DemoConfig:
    return DemoConfig()


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def demo_model(demo_cache_dir: pathlib.Path, demo_config: DemoConfig) -> DemoNet:
    """The built DemoNet: eval mode, no parameter requiring grad."""
    model, _ = load_or_build_demo(demo_cache_dir, demo_config)
    return model


@pytest.fixture(scope="session")
def demo_heldout(demo_config: DemoConfig) -> WatermarkBatch:
    """200 held-out images (pixel space) with labels and watermark boxes."""
    return make_watermark_dataset(HELDOUT_SIZE, demo_config.seed + HELDOUT_SEED_OFFSET, demo_config)


@pytest.fixture(scope="session")
def demo_heldout_inputs(demo_heldout: WatermarkBatch) -> torch.Tensor:
    """`demo_heldout.images` in model space, (200, 3, 64, 64): what DemoNet consumes."""
    return to_model_space(demo_heldout.images)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for the whole test session, torn down at its end."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    if started:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (loadtests/pgserver.py); skipped where none is installed."""
    import os

    from loadtests.pgserver import PostgresServer

    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        if os.environ.get("ATTRIBUTION_REQUIRE_SYSTEM") == "1":
            raise
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server, dropped after the test."""
    url = postgres_server.database()
    yield url
    postgres_server.drop(url)


# Fixtures that start another process: the tests that use them are `process` tests.
PROCESS_FIXTURES = ("local_server", "serve_process", "processes")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the local Ray (directly or through a fixture) carries the `ray` marker,
    and every test that needs a server process the `process` marker, so `-m "not ray and not process"`
    leaves them all out without each module having to say so."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "ray_session" in names:
            item.add_marker(pytest.mark.ray)
        if any(name in names for name in PROCESS_FIXTURES):
            item.add_marker(pytest.mark.process)
        if "postgres_server" in names:
            item.add_marker(pytest.mark.postgres)
