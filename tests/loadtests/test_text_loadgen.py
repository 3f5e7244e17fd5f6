"""The load generator sends text requests: the shipped text scenario against a front door serving the
text demo, counted by the service's own Prometheus metrics like image requests."""
from __future__ import annotations

import json

import grpc
import pytest

from loadtests import cli
from loadtests.requests import encode_requests
from loadtests.scenario import SCENARIO_DIR, load_scenario
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.backends.local import LocalBackend
from service.settings import ServiceConfig
from tests.loadtests.test_loadgen import loadtest_args
from tests.support import LoopThread, start_front_door
from workers.config import ModelConfig
from workers.models import ModelRegistry

SCENARIO = SCENARIO_DIR / "text_demo.yaml"


@pytest.fixture(scope="module")
def text_server():
    loop = LoopThread()
    registry = ModelRegistry([ModelConfig(name="text-demo", source="demo", modality="text")])
    running = start_front_door(loop, LocalBackend(registry))
    # One request first, so the measured window does not hold the model's first-call set-up.
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        pb_grpc.AttributionServiceStub(channel).Explain(pb.ExplainRequest(
            model="text-demo", method=pb.INTEGRATED_GRADIENTS,
            inputs=pb.Inputs(texts=pb.Texts(texts=["we saw a guitar"]))), timeout=120)
    yield running
    loop.call(running.stop(0.0))
    loop.close()


def test_text_scenario_encodes_token_requests():
    scenario = load_scenario(SCENARIO)
    ServiceConfig.from_dict(scenario.serve)  # what --compare would start is a valid config
    info = pb.ModelInfo(name="text-demo", modality=pb.TEXT, is_default=True,
                        text_spec=pb.TextSpec(vocab_size=54, max_length=32))
    prepared = encode_requests(scenario, {"text-demo": info})
    request = pb.ExplainRequest.FromString(prepared.entries[2].payloads[0])
    assert request.method == pb.INTEGRATED_GRADIENTS and request.integrated_gradients.steps == 32
    assert [len(s.ids) for s in request.inputs.tokens.sequences] == [16] * 4
    assert all(0 <= i < 54 for s in request.inputs.tokens.sequences for i in s.ids)


def test_text_load_runs_and_is_counted(text_server, tmp_path):
    assert cli.run(loadtest_args(
        "--server", f"127.0.0.1:{text_server.port}", "--scenario", str(SCENARIO),
        "--metrics-url", f"http://127.0.0.1:{text_server.metrics_port}/metrics", "--duration", "1.5",
        "--warmup", "0.2", "--quiet", "--closed", "2",
        "--json", str(tmp_path / "text.json"))) == 0
    (row,) = json.loads((tmp_path / "text.json").read_text())["levels"]
    assert row["ok"] > 0 and row["errors"] == {}
    # The service's own request counter counts them (over the scrapes' window, not exactly the client's).
    assert row["server"]["requests"] >= 1 and row["server"]["codes"].get("OK", 0) >= 1
