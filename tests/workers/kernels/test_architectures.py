"""CAM on the architectures users bring, not only the demo model and ResNet (issue 18).

- A layer whose output the next operation edits in place (torchvision DenseNet's
  `F.relu(features, inplace=True)`): every variant and Score-CAM must see the
  layer's own output and agree with pytorch-grad-cam on a twin without the
  in-place edit.
- The default CAM layer of every torchvision family the registry offers.
- Layers whose output is not (N, C, H, W): channels-last maps and transformer
  tokens, explained through a declared layout, refused when undeclared.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tests.workers.kernels.test_cam import PEERS, normalize, peer_cam
from workers.config import InputSpec, ModelConfig
from workers.errors import InvalidArgument, ModelLoadError
from workers.kernels.cam import CAM_VARIANTS, CamRequest, explain_cam
from workers.kernels.hooks import LayerTaps
from workers.kernels.perturbation import _activations, score_cam
from workers.families import FAMILIES
from workers.models import LoadedModel, load_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py

SIZE = 64
SMALL = InputSpec(height=SIZE, width=SIZE)


def _load(arch: str, size: int = SIZE, **kwargs) -> LoadedModel:
    return load_model(ModelConfig(name="m", source="torchvision", arch=arch, num_classes=10,
                                  input=InputSpec(height=size, width=size), **kwargs))


def _batch(n: int = 2, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(3))


@functools.lru_cache(maxsize=1)
def _densenet() -> LoadedModel:
    return _load("densenet121")


class DenseNetWithoutInplace(nn.Module):
    """torchvision DenseNet's forward with a plain ReLU after `features`: the twin pytorch-grad-cam can explain
    (its hooks see the in-place edit: an error with an input that requires grad, a post-ReLU activation on CPU)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.net.features(x))
        return self.net.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


# ---------------------------------------------------------------- in-place edits downstream

@pytest.mark.parametrize("variant", CAM_VARIANTS)
def test_densenet_default_layer_matches_pytorch_grad_cam(variant):
    model = _densenet()
    assert model.default_cam_layer == "features"
    x, t = _batch(), torch.tensor([1, 7])
    with LayerTaps(model.module, [model.default_cam_layer]) as taps:
        ours = explain_cam(model.module, taps, [CamRequest(x, t, "features", (variant,))])[0].maps[variant]
    twin = DenseNetWithoutInplace(model.module)
    torch.testing.assert_close(normalize(ours), peer_cam(variant, twin, model.module.features, x, t),
                               atol=2e-3, rtol=0)


def test_densenet_score_cam_sees_the_layer_output_not_the_post_relu_one():
    model = _densenet()
    x, t = _batch(), torch.tensor([1, 7])
    with torch.inference_mode():
        expected = model.module.features(x)                              # before the in-place ReLU
        assert bool((expected < 0).any())  # else the test could not tell the two apart
        with LayerTaps(model.module, ["features"]) as taps:
            captured = _activations(model.module, taps["features"], x, t, rows=2)
            logits = model.module(x)
    torch.testing.assert_close(captured, expected)
    with torch.inference_mode():
        torch.testing.assert_close(logits, model.module(x))             # the tap does not change the forward
    with LayerTaps(model.module, ["features"]) as taps:
        maps = score_cam(model.module, taps, x, t, "features", top_k_channels=4)
    assert maps.shape == (2, SIZE, SIZE) and bool(torch.isfinite(maps).all())


# The smallest architecture of each family in the registry's table of default CAM layers, and the input side it
# runs at: one where the default layer's map is at least 2 x 2 (AlexNet's and Inception's are 1 x 1 at 64 and 96,
# MaxViT's windows tile only a 224 input).
FAMILY_ARCHS = {"resnet": "resnet18", "mobilenet": "mobilenet_v3_small", "efficientnet": "efficientnet_b0",
                "densenet": "densenet121", "vgg": "vgg11", "convnext": "convnext_tiny", "regnet": "regnet_y_400mf",
                "alexnet": "alexnet", "googlenet": "googlenet", "inception": "inception_v3",
                "shufflenet": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1", "mnasnet": "mnasnet0_5",
                "maxvit": "maxvit_t", "vit": "vit_b_32", "swin": "swin_t"}
FAMILY_SIZES = {"alexnet": 128, "inception": 128, "maxvit": 224}
# Builder keywords (arch_options): without the auxiliary heads, which are trained only and need larger inputs.
FAMILY_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": False},
                  "inception": {"aux_logits": False, "init_weights": False}}
# Other builders of the families above, whose class the registry must recognise as well.
SIBLING_ARCHS = {"resnext50_32x4d": "resnet", "wide_resnet50_2": "resnet", "mobilenet_v2": "mobilenet",
                 "efficientnet_v2_s": "efficientnet", "vit_b_16": "vit", "swin_v2_t": "swin",
                 "regnet_x_400mf": "regnet"}


def _calibrated(model: LoadedModel, size: int = SIZE) -> LoadedModel:
    """BatchNorm statistics from a random batch: at their initial values EfficientNet's and MobileNet's logits are
    ~1e-13 and every map is rounding noise, which no comparison can judge; and a random head where torchvision
    initialises it to zero (ViT), where every gradient would be zero. Deterministic; the other weights stay."""
    batchnorms = [m for m in model.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in batchnorms:
        module.momentum = None                                          # the batch's own statistics
    generator = torch.Generator().manual_seed(1)
    if batchnorms:
        model.module.train()
        with torch.no_grad():
            model.module(torch.randn(16, 3, size, size, generator=generator))
        model.module.eval()
    for module in model.module.modules():
        if isinstance(module, nn.Linear) and not bool(module.weight.any()):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05)
    return model


def test_every_registry_family_is_covered():
    assert set(FAMILY_ARCHS) == set(FAMILIES)


def test_every_torchvision_classification_builder_is_in_a_family():
    """A builder torchvision adds to its classification models without a family here would get no CAM layers."""
    import torchvision

    from workers.families import builder, family_of

    for arch in torchvision.models.list_models(module=torchvision.models):
        cls = torchvision.models.get_model_builder(arch).__annotations__["return"]   # the class it builds
        assert family_of(cls) is not None, arch
    assert builder("VisionTransformer") is torchvision.models.VisionTransformer


def _reshape(layout: str, grid: tuple[int, int]):
    """pytorch-grad-cam's reshape_transform for a layout (its ViT and Swin recipes), None for nchw."""
    if layout == "tokens":
        return lambda t: t[:, 1:].reshape(t.shape[0], *grid, t.shape[2]).permute(0, 3, 1, 2)
    if layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_ARCHS))
def test_default_layer_of_every_torchvision_family(family):
    """Every variant on the family's default layer gives a finite, non-constant map, leaves the forward unchanged,
    and agrees with pytorch-grad-cam given the layer's layout (on DenseNet, its twin without the in-place ReLU)."""
    size = FAMILY_SIZES.get(family, SIZE)
    model = _densenet() if family == "densenet" else _calibrated(
        _load(FAMILY_ARCHS[family], size, arch_options=FAMILY_OPTIONS.get(family)), size)
    layer = model.default_cam_layer
    defaults = FAMILIES[family].layers(model.module)
    assert layer == defaults[-1] and model.cam_layers == defaults
    assert model.cam_layouts == {name: FAMILIES[family].layout for name in defaults}
    x = _batch(2, size, size)
    with LayerTaps(model.module, [layer], layouts=model.cam_layouts) as taps:
        res = explain_cam(model.module, taps, [CamRequest(x, None, layer, CAM_VARIANTS)])[0]
    with torch.inference_mode():
        torch.testing.assert_close(res.logits, model.module(x).float())
    peer_model = DenseNetWithoutInplace(model.module) if family == "densenet" else model.module
    module = dict(model.module.named_modules())[layer]
    reshape = _reshape(model.cam_layouts[layer], tuple(res.native["grad_cam"].shape[-2:]))
    assert min(res.native["grad_cam"].shape[-2:]) >= 2
    for variant in CAM_VARIANTS:
        maps = res.maps[variant]
        assert maps.shape == (2, size, size) and bool(torch.isfinite(maps).all())
        spread = maps.flatten(1).amax(dim=1) - maps.flatten(1).amin(dim=1)
        assert bool((spread > 1e-3 * maps.flatten(1).amax(dim=1)).all()), f"{family} {variant}: a constant map"
        with PEERS[variant](peer_model, [module], reshape_transform=reshape) as cam:
            peer = cam(x.clone().requires_grad_(True), [ClassifierOutputTarget(int(c)) for c in res.targets])
        torch.testing.assert_close(normalize(maps), torch.from_numpy(peer), atol=2e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SIBLING_ARCHS))
def test_sibling_builders_share_their_family_defaults(arch):
    model = _load(arch)
    family = SIBLING_ARCHS[arch]
    assert model.cam_layers == FAMILIES[family].layers(model.module)
    assert set(model.cam_layouts.values()) == {FAMILIES[family].layout}


# ---------------------------------------------------------------- layouts

class ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class TinyChannelsLast(nn.Module):
    """A conv whose map goes on channels-last (`nhwc`, as Swin's stages): both taps see the same values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.nhwc = ChannelsLast()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.nhwc(self.conv(x))).mean(dim=(1, 2)))


class Tokens(nn.Module):
    """Token mixing, the stand-in for a transformer block: `(N, 1 + h*w, C)` in and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.mix(x))


class TinyViT(nn.Module):
    """Patch embedding, a class token, one token block, a head on the class token and the mean patch."""

    def __init__(self, dim: int = 12, patch: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.block = Tokens(dim)
        self.head = nn.Linear(2 * dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)               # (N, h*w, C)
        tokens = self.block(torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1))
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1))


def _frozen(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def test_channels_last_layer_explained_through_its_declared_layout():
    model = _frozen(TinyChannelsLast())
    x, t = _batch(3), torch.tensor([0, 3, 4])
    with LayerTaps(model, ["conv", "nhwc"], layouts={"conv": "nchw", "nhwc": "nhwc"}) as taps:
        first = explain_cam(model, taps, [CamRequest(x, t, "conv", CAM_VARIANTS)])[0]
        last = explain_cam(model, taps, [CamRequest(x, t, "nhwc", CAM_VARIANTS)])[0]
    for variant in CAM_VARIANTS:
        torch.testing.assert_close(last.maps[variant], first.maps[variant])


def test_undeclared_channels_last_layer_is_refused_naming_the_setting():
    model = _frozen(TinyChannelsLast())
    x = _batch(1)
    with LayerTaps(model, ["nhwc"]) as taps:
        with pytest.raises(InvalidArgument, match=r"'nhwc'.*channels-last.*cam_layouts"):
            explain_cam(model, taps, [CamRequest(x, None, "nhwc")])
        with pytest.raises(InvalidArgument, match=r"'nhwc'.*cam_layouts"):
            score_cam(model, taps, x, torch.tensor([0]), "nhwc")


def _swin_reshape(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def test_swin_channels_last_stage_refused_undeclared_and_explained_declared():
    with pytest.raises(ModelLoadError, match=r"'features'.*\(1, 2, 2, 768\).*declare nhwc.*cam_layouts"):
        _load("swin_t", cam_layers=("features",))
    model = _load("swin_t", cam_layers=("features",), cam_layouts={"features": "nhwc"})
    assert model.cam_layouts == {"features": "nhwc"}
    x, t = _batch(), torch.tensor([1, 4])
    with LayerTaps(model.module, ["features"], layouts=model.cam_layouts) as taps:
        ours = explain_cam(model.module, taps, [CamRequest(x, t, "features", ("grad_cam",))])[0].maps["grad_cam"]
    with GradCAM(model.module, [model.module.features], reshape_transform=_swin_reshape) as cam:
        peer = cam(x.clone().requires_grad_(True), [ClassifierOutputTarget(int(c)) for c in t])
    torch.testing.assert_close(normalize(ours), torch.from_numpy(peer), atol=2e-3, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.parametrize("variant", CAM_VARIANTS)
def test_token_layer_matches_pytorch_grad_cam_with_its_reshape_transform(variant, size):
    model = _frozen(TinyViT())
    x, t = _batch(3, *size), torch.tensor([0, 2, 4])
    grid = (size[0] // 8, size[1] // 8)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam's ViT recipe
        return tokens[:, 1:].reshape(tokens.shape[0], *grid, tokens.shape[2]).permute(0, 3, 1, 2)

    with LayerTaps(model, ["block"], layouts={"block": "tokens"}) as taps:
        res = explain_cam(model, taps, [CamRequest(x, t, "block", (variant,))])[0]
    assert res.native[variant].shape == (3, *grid)
    with PEERS[variant](model, [model.block], reshape_transform=reshape) as cam:
        peer = cam(x.clone().requires_grad_(True), [ClassifierOutputTarget(int(c)) for c in t])
    torch.testing.assert_close(normalize(res.maps[variant]), torch.from_numpy(peer), atol=2e-3, rtol=0)


def test_token_layer_refused_undeclared_or_off_grid():
    model = _frozen(TinyViT())
    with LayerTaps(model, ["block"]) as taps:
        with pytest.raises(InvalidArgument, match=r"'block'.*\(2, 17, 12\).*cam_layouts"):
            explain_cam(model, taps, [CamRequest(_batch(2, 32, 32), None, "block")])
    with LayerTaps(model, ["embed"], layouts={"embed": "tokens"}) as taps:
        with pytest.raises(InvalidArgument, match=r"'embed'.*not tokens.*class token"):
            explain_cam(model, taps, [CamRequest(_batch(2, 32, 32), None, "embed")])


def test_unknown_layout_refused_by_the_config():
    with pytest.raises(InvalidArgument, match=r"cam_layouts\.layer4.*'nwhc' is not a layout"):
        ModelConfig(name="m", source="torchvision", arch="resnet18", cam_layouts={"layer4": "nwhc"})
    with pytest.raises(ModelLoadError, match=r"cam_layouts names layer1.*add them to cam_layers"):
        _load("resnet18", cam_layouts={"layer1": "nchw"})
