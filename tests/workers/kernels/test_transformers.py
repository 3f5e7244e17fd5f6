"""Vision transformers: torchvision ViT and Swin loaded from local weights, explained by every online method.

Models are small instances of torchvision's own classes (`VisionTransformer`, `SwinTransformer`) built
through the config's `arch_options`, with random weights saved to a temporary file and loaded back the way
a trained model is. ViT's head is initialised to zero by torchvision, which makes every gradient zero; the
saved weights give it a random head.
"""
from __future__ import annotations

import functools
import pathlib

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tests.workers.kernels.test_cam import PEERS, normalize
from workers.config import InputSpec, ModelConfig, model_config_from_dict
from workers.errors import InvalidArgument, ModelLoadError
from workers.families import builder
from workers.kernels.cam import CAM_VARIANTS, CamRequest, explain_cam
from workers.kernels.gradients import GradientRequest, explain_gradients
from workers.kernels.hooks import LayerTaps
from workers.models import LoadedModel, load_model, sha256_file

pytestmark = [pytest.mark.usefixtures("one_intra_op_thread"),
              pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")]

CLASSES = 6
VIT = {"patch_size": 8, "num_layers": 3, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
SWIN = {"patch_size": [4, 4], "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4],
        "window_size": [4, 4], "stochastic_depth_prob": 0.0}
VIT_SIZE, SWIN_SIZE = 32, 64


def _save_random(arch: str, options: dict, size: int, path: pathlib.Path) -> pathlib.Path:
    """A model of torchvision's class with seeded random weights (a random head where it starts at zero), saved."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        kwargs = {"image_size": size} if arch == "VisionTransformer" else {}
        module = builder(arch)(**options, **kwargs, num_classes=CLASSES)
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and not bool(layer.weight.any()):
                nn.init.normal_(layer.weight, std=0.2)
    torch.save(module.state_dict(), path)
    return path


@functools.lru_cache(maxsize=None)
def _weights(arch: str) -> pathlib.Path:
    import tempfile

    options, size = (VIT, VIT_SIZE) if arch == "VisionTransformer" else (SWIN, SWIN_SIZE)
    return _save_random(arch, options, size, pathlib.Path(tempfile.mkdtemp()) / f"{arch}.pt")


def _config(arch: str, **kwargs) -> ModelConfig:
    options, size = (VIT, VIT_SIZE) if arch == "VisionTransformer" else (SWIN, SWIN_SIZE)
    return ModelConfig(name=arch.lower(), source="torchvision", arch=arch, arch_options=options,
                       path=str(_weights(arch)), num_classes=CLASSES, input=InputSpec(height=size, width=size),
                       **kwargs)


@functools.lru_cache(maxsize=None)
def _model(arch: str) -> LoadedModel:
    return load_model(_config(arch))


def _batch(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def _reshape(layout: str, grid: tuple[int, int]):
    """pytorch-grad-cam's reshape_transform recipes: ViT drops the class token, Swin is channels-last."""
    if layout == "tokens":
        return lambda t: t[:, 1:].reshape(t.shape[0], *grid, t.shape[2]).permute(0, 3, 1, 2)
    return lambda t: t.permute(0, 3, 1, 2)


# ---------------------------------------------------------------- loading

def test_vit_loads_from_a_state_dict_with_its_token_layers():
    model = _model("VisionTransformer")
    assert model.version == sha256_file(_weights("VisionTransformer")) and model.num_classes == CLASSES
    last = "encoder.layers.encoder_layer_2.ln_1"
    assert model.cam_layers == ("encoder.layers.encoder_layer_1.ln_1", last) and model.default_cam_layer == last
    assert model.cam_layouts == dict.fromkeys(model.cam_layers, "tokens")


def test_swin_loads_from_a_state_dict_with_its_channels_last_layers():
    model = _model("SwinTransformer")
    assert model.version == sha256_file(_weights("SwinTransformer"))
    assert model.cam_layers == ("features.5", "norm") and model.default_cam_layer == "norm"
    assert model.cam_layouts == {"features.5": "nhwc", "norm": "nhwc"}


def test_a_config_file_entry_builds_the_same_model():
    cfg = model_config_from_dict({"name": "vit", "source": "torchvision", "arch": "VisionTransformer",
                                  "arch_options": VIT, "weights": str(_weights("VisionTransformer")),
                                  "num_classes": CLASSES,
                                  "input": {"height": VIT_SIZE, "width": VIT_SIZE}})
    assert load_model(cfg).version == _model("VisionTransformer").version


def test_vit_builder_is_sized_to_the_input():
    """vit_b_32 takes image_size from the input spec: the 224 default would refuse a 64 x 64 input."""
    model = load_model(ModelConfig(name="b32", source="torchvision", arch="vit_b_32", num_classes=3,
                                   input=InputSpec(height=64, width=64)))
    assert model.module.image_size == 64
    assert model.default_cam_layer == "encoder.layers.encoder_layer_11.ln_1"


def test_bad_arch_options_and_archs_are_refused_with_what_to_fix(tmp_path):
    with pytest.raises(ModelLoadError, match=r"refuses the options.*hidden_dims.*check arch_options"):
        load_model(ModelConfig(name="v", source="torchvision", arch="VisionTransformer",
                               arch_options={**VIT, "hidden_dims": 8}, input=InputSpec(height=32, width=32)))
    with pytest.raises(ModelLoadError, match=r"unknown torchvision architecture 'VisionTransformr'"):
        load_model(ModelConfig(name="v", source="torchvision", arch="VisionTransformr"))
    with pytest.raises(InvalidArgument, match=r"arch_options.*torchvision only"):
        ModelConfig(name="v", source="torchscript", path="m.pt", arch_options={"image_size": 32})
    with pytest.raises(ModelLoadError, match=r"cannot load weights"):         # weights of another size
        load_model(ModelConfig(name="v", source="torchvision", arch="VisionTransformer",
                               arch_options={**VIT, "hidden_dim": 16}, path=str(_weights("VisionTransformer")),
                               num_classes=CLASSES,
                               input=InputSpec(height=VIT_SIZE, width=VIT_SIZE)))


def test_a_non_square_input_for_vit_is_refused_at_load():
    with pytest.raises(ModelLoadError, match=r"fails on a \(3, 32, 48\) input"):
        load_model(ModelConfig(name="v", source="torchvision", arch="VisionTransformer", arch_options=VIT,
                               input=InputSpec(height=32, width=48)))


# ---------------------------------------------------------------- CAM on tokens and channels-last maps

@pytest.mark.parametrize("arch", ["VisionTransformer", "SwinTransformer"])
@pytest.mark.parametrize("which", [0, -1])
def test_every_variant_matches_pytorch_grad_cam_with_its_reshape_transform(arch, which):
    model = _model(arch)
    layer = model.cam_layers[which]
    size = model.spec.height
    x, t = _batch(3, size), torch.tensor([0, 2, 5])
    with LayerTaps(model.module, [layer], layouts=model.cam_layouts) as taps:
        res = explain_cam(model.module, taps, [CamRequest(x, t, layer, CAM_VARIANTS)])[0]
    grid = tuple(res.native["grad_cam"].shape[-2:])
    assert grid == ((4, 4) if arch == "VisionTransformer" else (2, 2) if layer == "norm" else (4, 4))
    module = dict(model.module.named_modules())[layer]
    for variant in CAM_VARIANTS:
        maps = res.maps[variant]
        assert maps.shape == (3, size, size) and bool(torch.isfinite(maps).all()) and float(maps.std()) > 0
        with PEERS[variant](model.module, [module], reshape_transform=_reshape(model.cam_layouts[layer], grid)) as cam:
            peer = cam(x.clone().requires_grad_(True), [ClassifierOutputTarget(int(c)) for c in t])
        torch.testing.assert_close(normalize(maps), torch.from_numpy(peer), atol=2e-3, rtol=0)


@pytest.mark.parametrize("block, empty", [(2, CAM_VARIANTS[:5]), (1, ("hires_cam",))])
def test_vit_block_outputs_give_empty_maps_which_is_why_ln_1_is_the_default(block, empty):
    """After the last block only the class token reaches the head: every patch token's gradient is zero there.
    From the block before, a patch token reaches the head only through the last block's ln_1, which ignores its
    scale: sum(gradient x activation) is zero on every token, and that is HiResCAM's map."""
    layer = f"encoder.layers.encoder_layer_{block}"
    model = load_model(_config("VisionTransformer", cam_layers=(layer,), cam_layouts={layer: "tokens"}))
    x = _batch(2, VIT_SIZE)
    with LayerTaps(model.module, [layer], layouts=model.cam_layouts) as taps:
        res = explain_cam(model.module, taps, [CamRequest(x, None, layer, CAM_VARIANTS[:5])])[0]
    with LayerTaps(model.module, [f"{layer}.ln_1"], layouts={f"{layer}.ln_1": "tokens"}) as taps:
        ln_1 = explain_cam(model.module, taps, [CamRequest(x, None, f"{layer}.ln_1", empty)])[0]
    for variant in empty:
        scale = float(ln_1.maps[variant].amax())
        assert scale > 0 and float(res.maps[variant].amax()) < 1e-5 * scale, variant


def test_an_undeclared_vit_block_is_refused_naming_the_layout_setting():
    layer = "encoder.layers.encoder_layer_0"
    with pytest.raises(ModelLoadError, match=r"encoder_layer_0.*\(1, 17, 32\).*declare nchw, nhwc or tokens"):
        load_model(_config("VisionTransformer", cam_layers=(layer,)))
    model = load_model(_config("VisionTransformer", cam_layers=(layer,), cam_layouts={layer: "tokens"}))
    assert model.cam_layouts == {layer: "tokens"}


# ---------------------------------------------------------------- gradient methods, unchanged

@pytest.mark.parametrize("arch", ["VisionTransformer", "SwinTransformer"])
def test_gradient_methods_match_captum(arch):
    model = _model(arch)
    x, t = _batch(2, model.spec.height), torch.tensor([1, 4])
    vanilla, ig = explain_gradients(model.module, [GradientRequest(x, t, "vanilla"),
                                                   GradientRequest(x, t, "integrated_gradients", steps=8)])
    saliency = Saliency(model.module).attribute(x.clone(), target=t, abs=False)
    torch.testing.assert_close(vanilla.attributions, saliency, rtol=1e-4, atol=1e-4 * float(saliency.abs().max()))
    reference = IntegratedGradients(model.module).attribute(x, target=t, n_steps=8, method="gausslegendre")
    torch.testing.assert_close(ig.attributions, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert float(vanilla.attributions.abs().max()) > 0 and ig.completeness_error_absolute is not None
