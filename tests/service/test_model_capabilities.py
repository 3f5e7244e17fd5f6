"""Per-model capabilities over gRPC: what ListModels says each model serves, and a refusal, naming what it
does serve, for every call that asks a model for a method it cannot serve.

Three models behind one server (LocalBackend and the in-process offline worker): the demo CNN, a small
torchvision ViT loaded from a weights file (token CAM layers), and a TorchScript classifier (no CAM layers).
"""
from __future__ import annotations

import argparse
import warnings

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from torch import nn

from service._proto import attribution_pb2 as pb
from service.backends.local import LocalBackend
from service.cli import models as models_cli
from service.jobs import JobsConfig
from tests.service.conftest import explain_request
from tests.service.jobs.conftest import FAST, ServiceHarness
from workers.config import InputSpec, ModelConfig
from workers.models import ModelRegistry
from workers.offline import LocalOfflineWorker

SIZE = 32
VIT = {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, service_cache_dir) -> ModelRegistry:
    folder = tmp_path_factory.mktemp("models")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit = __import__("torchvision").models.VisionTransformer(image_size=SIZE, num_classes=3, **VIT)
        nn.init.normal_(vit.heads.head.weight, std=0.3)       # torchvision starts it at zero: no gradient at all
        torch.save(vit.state_dict(), folder / "vit.pt")
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # torch.jit is deprecated; TorchScript files still exist
        torch.jit.save(torch.jit.script(net), str(folder / "tiny.ts"))
    small = InputSpec(height=SIZE, width=SIZE)
    registry = ModelRegistry([
        ModelConfig(name="demo", source="demo"),
        ModelConfig(name="vit", source="torchvision", arch="VisionTransformer", arch_options=VIT, num_classes=3,
                    path=str(folder / "vit.pt"), input=small),
        ModelConfig(name="ts", source="torchscript", path=str(folder / "tiny.ts"), input=small),
    ], cache_dir=service_cache_dir)
    for name in registry.names():
        registry.get(name)
    return registry


@pytest.fixture(scope="module")
def harness(registry, tmp_path_factory):
    config = JobsConfig(offline=FAST, progress_persist_s=0.0, poll_s=0.5)
    running = ServiceHarness(LocalBackend(registry), LocalOfflineWorker(registry, config.offline),
                             tmp_path_factory.mktemp("data"), config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(harness):
    return harness.stub()


def _images(n: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


def _violations(error: grpc.RpcError) -> dict[str, str]:
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


# ---------------------------------------------------------------- what ListModels says

def test_each_model_lists_its_modality_layouts_and_own_methods(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert {m.modality for m in models.values()} == {pb.IMAGE}
    layouts = {name: [(c.name, c.layout) for c in m.cam_layer_layouts] for name, m in models.items()}
    assert layouts["demo"] == [("block3", "nchw"), ("block4", "nchw")]
    assert layouts["vit"] == [("encoder.layers.encoder_layer_0.ln_1", "tokens"),
                              ("encoder.layers.encoder_layer_1.ln_1", "tokens")]
    assert layouts["ts"] == [] and list(models["ts"].cam_layers) == []
    for name in ("demo", "vit"):
        assert {pb.GRAD_CAM, pb.LAYER_CAM} <= set(models[name].online_methods)
        assert {pb.SCORE_CAM, pb.OCCLUSION} <= set(models[name].offline_methods) - set(models[name].online_methods)
    ts = models["ts"]
    assert pb.VANILLA_GRADIENT in ts.online_methods and pb.INTEGRATED_GRADIENTS in ts.online_methods
    assert not {pb.GRAD_CAM, pb.GRAD_CAM_PLUS_PLUS, pb.LAYER_CAM, pb.SCORE_CAM} & set(ts.offline_methods)
    assert pb.OCCLUSION in ts.offline_methods
    assert stub.GetModel(pb.GetModelRequest(name="vit"), timeout=30) == models["vit"]


def test_the_cli_shows_modality_and_layouts(harness, capsys):
    parser = argparse.ArgumentParser()
    models_cli.add_arguments(parser)
    assert models_cli.run(parser.parse_args(["--server", harness.address])) == 0
    out = capsys.readouterr().out
    assert "vit  image  version" in out and "ts  image  version" in out
    assert ("CAM layers: encoder.layers.encoder_layer_0.ln_1 (tokens), encoder.layers.encoder_layer_1.ln_1 (tokens) "
            "(default encoder.layers.encoder_layer_1.ln_1)") in out
    assert "CAM layers: block3 (nchw), block4 (nchw) (default block4)" in out


# ---------------------------------------------------------------- serving and refusing

def test_grad_cam_on_the_vit_token_layers_over_grpc(stub):
    response = stub.Explain(explain_request(_images(2), pb.GRAD_CAM, model="vit",
                                            output={"native_resolution": True}), timeout=60)
    for item in response.items:
        (attribution,) = item.attributions
        assert list(attribution.map.shape) == [SIZE, SIZE] and list(attribution.native_map.shape) == [4, 4]
        values = torch.frombuffer(bytearray(attribution.map.data), dtype=torch.float32)
        assert bool(torch.isfinite(values).all()) and float(values.max()) > float(values.min())


def test_explain_refuses_a_cam_method_on_a_model_without_layers_naming_what_it_serves(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(explain_request(_images(), pb.GRAD_CAM, model="ts"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    method = _violations(info.value)["method"]
    assert "model 'ts' does not support GRAD_CAM" in method and "declares none" in method
    assert "VANILLA_GRADIENT" in method and "INTEGRATED_GRADIENTS" in method and "LAYER_CAM" not in method


def test_explain_stream_refuses_it_in_the_stream_and_goes_on(stub):
    requests = [explain_request(_images(), pb.LAYER_CAM, model="ts", request_id="cam"),
                explain_request(_images(), pb.VANILLA_GRADIENT, model="ts", request_id="vanilla")]
    answers = {a.request_id: a for a in stub.ExplainStream(iter(requests), timeout=60)}
    refused = answers["cam"].error
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "does not support LAYER_CAM" in refused.message and "VANILLA_GRADIENT" in refused.message
    bad = error_details_pb2.BadRequest()
    assert refused.details[0].Unpack(bad) and bad.field_violations[0].field == "method"
    assert not answers["vanilla"].HasField("error") and len(answers["vanilla"].items) == 1


def test_submit_job_refuses_score_cam_on_a_model_without_layers_and_takes_occlusion(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(pb.SubmitJobRequest(request=explain_request(_images(), pb.SCORE_CAM, model="ts")), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    method = _violations(info.value)["method"]
    assert "does not support SCORE_CAM" in method and "OCCLUSION" in method and "GRAD_CAM" not in method
    job = stub.SubmitJob(pb.SubmitJobRequest(request=explain_request(_images(), pb.OCCLUSION, model="ts")),
                         timeout=30)
    assert job.id
