"""torchvision classification families: how each is built at a given input size, and its CAM layers.

A family is recognised by the class of the built module (so a model built from a builder name, e.g.
`vit_b_16`, and one built from the class itself, e.g. `VisionTransformer` with `arch_options`, are
the same family). Each family names its CAM layers, the default last, and their layout:

- convolutional families: their last feature map (and, for ResNets, two earlier stages), `nchw`;
- ViT (`VisionTransformer`): the last encoder block's `ln_1`, whose tokens `(N, 1 + h*w, C)` feed the
  block's attention, where the class token the head reads gathers from the patch tokens; and the
  `ln_1` of the block before it. Not the last block's own output: after it only the class token
  reaches the head, so every patch token's gradient there is zero and every CAM map is empty. Not
  the output of the block before either: a patch token reaches the head from there only through
  the last block's `ln_1`, which ignores its scale, so sum(gradient x activation) is zero on every
  token and HiResCAM's map is empty;
- Swin (`SwinTransformer`, v1 and v2): the final `norm`, on the last stage's channels-last
  `(N, h, w, C)` map (what the head pools), and the output of the stage before, both `nhwc`.

Names that depend on depth (ViT's encoder blocks) are read from the built module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """One torchvision family: the classes that make it, its CAM layers (default last) and their layout."""

    classes: tuple[str, ...]
    layers: Callable[[nn.Module], tuple[str, ...]]
    layout: str = "nchw"


def _fixed(*names: str) -> Callable[[nn.Module], tuple[str, ...]]:
    return lambda _module: names


def _vit_layers(module: nn.Module) -> tuple[str, ...]:
    depth = len(module.encoder.layers)
    return tuple(f"encoder.layers.encoder_layer_{block}.ln_1" for block in range(max(0, depth - 2), depth))


def _swin_layers(module: nn.Module) -> tuple[str, ...]:
    stages = len(module.features)          # patch embedding, then stages and patch mergings alternating
    return (f"features.{stages - 3}", "norm") if stages >= 4 else ("norm",)


FAMILIES: dict[str, Family] = {
    "resnet": Family(("ResNet",), _fixed("layer2", "layer3", "layer4")),  # resnet, resnext, wide_resnet
    "mobilenet": Family(("MobileNetV2", "MobileNetV3"), _fixed("features")),
    "efficientnet": Family(("EfficientNet",), _fixed("features")),
    "densenet": Family(("DenseNet",), _fixed("features")),
    "vgg": Family(("VGG",), _fixed("features")),
    "convnext": Family(("ConvNeXt",), _fixed("features")),
    "regnet": Family(("RegNet",), _fixed("trunk_output")),
    "alexnet": Family(("AlexNet",), _fixed("features")),
    "googlenet": Family(("GoogLeNet",), _fixed("inception4e", "inception5b")),
    "inception": Family(("Inception3",), _fixed("Mixed_6e", "Mixed_7c")),
    "shufflenet": Family(("ShuffleNetV2",), _fixed("stage4", "conv5")),
    "squeezenet": Family(("SqueezeNet",), _fixed("features")),
    "mnasnet": Family(("MNASNet",), _fixed("layers")),
    "maxvit": Family(("MaxVit",), _fixed("blocks.2", "blocks.3")),
    "vit": Family(("VisionTransformer",), _vit_layers, "tokens"),
    "swin": Family(("SwinTransformer",), _swin_layers, "nhwc"),
}

# The builder keyword that fixes the input size, for the families whose modules are built for one size.
_SIZE_OPTIONS = {"vit_": "image_size", "VisionTransformer": "image_size",
                 "maxvit": "input_size", "MaxVit": "input_size"}


def family_of(module: nn.Module | type) -> str | None:
    """The family of a built torchvision module (or of its class), or None."""
    name = (module if isinstance(module, type) else type(module)).__name__
    return next((family for family, f in FAMILIES.items() if name in f.classes), None)


def cam_defaults(module: nn.Module) -> tuple[tuple[str, ...], dict[str, str]]:
    """The family's CAM layers (default last) and their layouts; ((), {}) for a module of no known family."""
    family = family_of(module)
    if family is None:
        return (), {}
    spec = FAMILIES[family]
    layers = spec.layers(module)
    return layers, {name: spec.layout for name in layers}


def size_options(arch: str, height: int, width: int) -> dict[str, object]:
    """Builder keywords that size a model for a height x width input (ViT's image_size, MaxViT's input_size)."""
    for prefix, option in _SIZE_OPTIONS.items():
        if arch.startswith(prefix):
            return {option: height if option == "image_size" else (height, width)}
    return {}


def builder(arch: str) -> Callable[..., nn.Module]:
    """The torchvision builder (`resnet18`, `vit_b_16`, ...) or model class (`VisionTransformer`, ...) `arch`
    names; ValueError when it names neither."""
    import torchvision

    try:
        return torchvision.models.get_model_builder(arch)
    except ValueError:
        cls = getattr(torchvision.models, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
        raise ValueError(f"unknown torchvision architecture {arch!r}") from None
