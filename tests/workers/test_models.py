"""Model registry: every source loads frozen, versioned, with typed errors."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from workers.config import InputSpec, ModelConfig, model_config_from_dict
from workers.errors import InvalidArgument, LayerNotFound, ModelLoadError, ModelNotFound
from workers.demo import DEMO_CAM_LAYER
from workers.models import ModelRegistry, describe, load_model, select_device

SMALL = InputSpec(height=32, width=32)


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and all(not p.requires_grad for p in module.parameters())


@pytest.fixture(scope="module")
def resnet_state(tmp_path_factory):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=10)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(net.state_dict(), folder / "r18.pt")
    save_file(net.state_dict(), str(folder / "r18.safetensors"))
    return net, folder


def test_demo_model_loads_frozen_with_layers(demo_cache_dir):
    model = load_model(ModelConfig(name="demo", source="demo"), "cpu", demo_cache_dir)
    assert _frozen(model.module)
    assert model.num_classes == 4 and model.labels and len(model.labels) == 4
    assert model.default_cam_layer in model.cam_layers
    assert len(model.version) == 64
    assert model.layer(model.default_cam_layer) is dict(model.module.named_modules())[model.default_cam_layer]
    info = describe(model, is_default=True)
    assert info.is_default and "grad_cam" in info.online_methods and "score_cam" in info.offline_methods
    assert "score_cam" not in info.online_methods


@pytest.mark.parametrize("filename", ["r18.pt", "r18.safetensors"])
def test_torchvision_weights_from_file(resnet_state, filename):
    net, folder = resnet_state
    path = folder / filename
    cfg = ModelConfig(name="r18", source="torchvision", arch="resnet18", path=str(path), num_classes=10, input=SMALL)
    model = load_model(cfg)
    assert _frozen(model.module)
    assert model.version == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.cam_layers == ("layer2", "layer3", "layer4") and model.default_cam_layer == "layer4"
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    torch.testing.assert_close(model.module(x), net(x))


def test_torchscript_and_export_files(demo_model, tmp_path):
    scripted = torch.jit.script(demo_model)
    scripted.save(str(tmp_path / "demo.ts"))
    spec = InputSpec(height=64, width=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ts = load_model(ModelConfig(name="ts", source="torchscript", path=str(tmp_path / "demo.ts"), input=spec))
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(demo_model, (torch.zeros(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(tmp_path / "demo.pt2"))
    ex = load_model(ModelConfig(name="ex", source="export", path=str(tmp_path / "demo.pt2"), input=spec))
    x = torch.randn(2, 3, 64, 64)
    for model in (ts, ex):
        assert model.num_classes == 4 and not model.cam_layers
        assert "grad_cam" not in model.online_methods and "smoothgrad" in model.online_methods
        torch.testing.assert_close(model.module(x), demo_model(x))


def test_random_torchvision_is_seeded_and_marked():
    cfg = ModelConfig(name="r", source="torchvision", arch="resnet18", num_classes=10, input=SMALL, seed=7)
    a, b = load_model(cfg), load_model(cfg)
    assert a.version == b.version and a.version.startswith("random-")
    other = load_model(ModelConfig(name="r", source="torchvision", arch="resnet18", num_classes=10,
                                   input=SMALL, seed=8))
    assert other.version != a.version


@pytest.mark.parametrize("cfg, match", [
    (dict(name="x", source="torchvision", arch="no_such_net"), "unknown torchvision architecture"),
    (dict(name="x", source="torchvision", arch="resnet18", path="/nonexistent/w.pt"), "cannot load weights"),
    (dict(name="x", source="torchscript", path="/nonexistent/m.ts"), "cannot load torchscript"),
    (dict(name="x", source="torchvision", arch="resnet18", num_classes=10, cam_layers=("layer9",)),
     "CAM layers not found"),
])
def test_load_errors_are_typed(cfg, match):
    cfg.setdefault("input", SMALL)
    with pytest.raises(ModelLoadError, match=match):
        load_model(ModelConfig(**cfg))


def test_wrong_weights_and_labels(resnet_state, tmp_path):
    _, folder = resnet_state
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(ModelConfig(name="x", source="torchvision", arch="resnet34", path=str(folder / "r18.pt"),
                               num_classes=10, input=SMALL))
    with pytest.raises(ModelLoadError, match="labels"):
        load_model(ModelConfig(name="x", source="torchvision", arch="resnet18", num_classes=10, input=SMALL,
                               labels=("a", "b")))
    with pytest.raises(ModelLoadError, match="config says 5 classes"):
        load_model(ModelConfig(name="x", source="torchscript", path=str(_script_tiny(tmp_path)), num_classes=5,
                               input=SMALL))


def _script_tiny(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path / "tiny.ts"
    torch.jit.script(net).save(str(path))
    return path


def test_registry_lookup_and_typed_errors(demo_cache_dir):
    registry = ModelRegistry([ModelConfig(name="demo", source="demo")], cache_dir=demo_cache_dir)
    assert registry.get() is registry.get("demo")  # loaded once
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        registry.get("nope")
    with pytest.raises(LayerNotFound, match="choose one of"):
        registry.get().layer("fc")


@pytest.mark.parametrize("raw, field", [
    ({"name": "bad name!", "source": "demo"}, "models.name"),
    ({"name": "a", "source": "onnx"}, "source"),
    ({"name": "a", "source": "torchvision"}, "arch"),
    ({"name": "a", "source": "torchscript"}, "path"),
    ({"name": "a", "source": "demo", "colour": 1}, "unknown keys"),
    ({"name": "a", "source": "demo", "input": {"channels": 3, "mean": [0.5], "std": [0.5]}}, "input"),
    ({"name": "a", "source": "torchvision", "arch": "resnet18", "shuffled_labels": True}, "a].shuffled_labels"),
    ({"name": "a", "source": "demo", "modality": "text", "shuffled_labels": True}, "a].shuffled_labels"),
    ({"name": "a", "source": "demo", "shuffled_labels": "yes"}, "a].shuffled_labels"),
])
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(InvalidArgument, match=field):
        model_config_from_dict(raw)


def test_config_reads_labels_file_and_weights_key(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n\n")
    cfg = model_config_from_dict({"name": "a", "source": "torchvision", "arch": "resnet18",
                                  "weights": "/w.pt", "labels": str(tmp_path / "labels.txt"),
                                  "input": {"height": 32, "width": 32}})
    assert cfg.labels == ("cat", "dog") and cfg.path == "/w.pt" and cfg.input.height == 32


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            select_device("cuda")


def test_torchscript_with_cam_layers_is_refused_by_the_config(demo_model, tmp_path):
    """Refused when the config is read (`serve --check` finds it), before any file is loaded, naming the
    sources that support CAM; without CAM layers the same file loads for the gradient methods."""
    torch.jit.script(demo_model).save(str(tmp_path / "demo.ts"))
    spec = {"height": 64, "width": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    for layers in ({"cam_layers": ["features.6"]}, {"cam_layer": "features.6"}):
        with pytest.raises(InvalidArgument, match="TorchScript module cannot carry the forward hooks") as info:
            model_config_from_dict({"name": "ts", "source": "torchscript", "path": str(tmp_path / "demo.ts"),
                                    "input": spec, **layers})
        assert info.value.violations[0].field == "models[ts].cam_layers"
        assert "features.6" in info.value.message
        assert "source torchvision" in info.value.message and "export (torch.export)" in info.value.message
    loaded = load_model(model_config_from_dict({"name": "ts", "source": "torchscript",
                                                "path": str(tmp_path / "demo.ts"), "input": spec}))
    assert loaded.cam_layers == () and "grad_cam" not in loaded.online_methods


def test_exported_model_serves_cam_on_its_layers(demo_model, tmp_path):
    from workers.kernels.cam import CamRequest, explain_cam
    from workers.kernels.hooks import LayerTaps

    exported = torch.export.export(demo_model, (torch.zeros(2, 3, 64, 64),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(exported, str(tmp_path / "demo.pt2"))
    spec = InputSpec(height=64, width=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    layer = DEMO_CAM_LAYER
    ex = load_model(ModelConfig(name="ex", source="export", path=str(tmp_path / "demo.pt2"), input=spec,
                                cam_layers=(layer,)))
    assert ex.cam_layers == (layer,) and "grad_cam" in ex.online_methods
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([0, 1])
    request = lambda: CamRequest(inputs=x, targets=targets, layer=layer, variants=("grad_cam",))
    with LayerTaps(ex.module, (layer,)) as taps, LayerTaps(demo_model, (layer,)) as reference:
        got = explain_cam(ex.module, taps, [request()])[0].maps["grad_cam"]
        want = explain_cam(demo_model, reference, [request()])[0].maps["grad_cam"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
