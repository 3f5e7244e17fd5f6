"""A text request through the Ray Serve path: the text demo deployed on real Ray Serve behind the real
front door answers token ids and raw text as the in-process pipeline does."""
from __future__ import annotations

import numpy as np
import pytest

from service.backends.local import LocalBackend
from service.backends.serve import ServeBackend
from service.client import AttributionClient
from tests.support import LoopThread, start_front_door
from workers.config import ModelConfig
from workers.models import ModelRegistry
from workers.serve.app import AppConfig, deploy_all, shutdown_all

pytestmark = pytest.mark.ray

TEXT = ModelConfig(name="text-demo", source="demo", modality="text")


@pytest.fixture(scope="module")
def served(ray_session):
    app = AppConfig(models=(TEXT,))
    deploy_all(app)
    loop = LoopThread()
    running = start_front_door(loop, ServeBackend.from_config(app))
    yield running
    loop.call(running.stop(0.0))
    loop.close()
    shutdown_all(app)


def _explain(address: str, texts: list[str]):
    with AttributionClient(address, timeout=120) as client:
        return client.explain(texts=texts, model="text-demo", method="integrated_gradients", steps=16)


def test_text_request_through_ray_serve(served):
    texts = ["the rain was very bad", "we saw a guitar ."]
    served_answer = _explain(served.address, texts)
    loop = LoopThread()
    running = start_front_door(loop, LocalBackend(ModelRegistry([TEXT])))
    try:
        local_answer = _explain(running.address, texts)
    finally:
        loop.call(running.stop(0.0))
        loop.close()
    for item, ref, cue in zip(served_answer.items, local_answer.items, ("rain", "guitar")):
        assert item.tokens == ref.tokens and item.tokens[int(item.attributions[0].map.argmax())] == cue
        np.testing.assert_allclose(item.attributions[0].map, ref.attributions[0].map, rtol=1e-4, atol=1e-5)
