"""Model registry: load a configured model once, ready to explain.

Loading puts the module in eval mode and turns off every parameter's
`requires_grad` exactly once, so no request ever flips a shared model's mode or
accumulates parameter gradients. Weights are read with `weights_only=True`
(or safetensors); nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import logging
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from workers import families
from workers.config import CAM_SOURCES, InputSpec, ModelConfig, no_cam_on_torchscript
from workers.errors import InvalidArgument, LayerNotFound, ModelLoadError, ModelNotFound
from workers.kernels.hooks import to_nchw
from workers.methods import model_methods
from workers.spec import ModelDescription

if TYPE_CHECKING:
    from workers.text.loading import TextModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to explain, shared by every request on a replica."""

    name: str
    module: nn.Module
    spec: InputSpec
    num_classes: int
    version: str                      # sha256 of the weights, hex
    device: torch.device
    cam_layers: tuple[str, ...] = ()
    default_cam_layer: str = ""
    cam_layouts: dict[str, str] = field(default_factory=dict)  # every CAM layer's layout, declared or detected
    labels: tuple[str, ...] = ()
    reference_set: torch.Tensor | None = None  # Expected Gradients' baselines, model space (R, C, H, W)
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    text: "TextModel | None" = None   # text models: embedding forward, vocabulary, tokenizer (workers/text)

    def layer(self, name: str) -> nn.Module:
        """The CAM-able layer `name`; `LayerNotFound` lists the choices."""
        if name not in self.cam_layers or name not in self._modules:
            raise LayerNotFound(self.name, name, list(self.cam_layers))
        return self._modules[name]

    @property
    def modality(self) -> str:
        return "text" if self.text is not None else "image"

    @property
    def online_methods(self) -> tuple[str, ...]:
        """What Explain serves for this model (`workers.methods.model_methods`)."""
        return model_methods(self.modality, bool(self.cam_layers))[0]

    @property
    def offline_methods(self) -> tuple[str, ...]:
        """What SubmitJob serves for this model: the online methods and the offline-only ones it can run."""
        return model_methods(self.modality, bool(self.cam_layers))[1]


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_state(module: nn.Module) -> str:
    """Hash of the parameters and buffers, for models built in code."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return state


def _build_torchvision(cfg: ModelConfig) -> tuple[nn.Module, str]:
    """A torchvision builder (`vit_b_16`) or model class (`VisionTransformer`) with the config's
    `arch_options`, sized for the input where the family needs it, then its weights."""
    try:
        make = families.builder(cfg.arch)
    except ValueError as exc:
        raise ModelLoadError(f"model {cfg.name!r}: {exc}") from exc
    kwargs = {} if isinstance(make, type) else {"weights": None}
    kwargs.update(families.size_options(cfg.arch, cfg.input.height, cfg.input.width))
    kwargs.update(cfg.arch_options or {})
    if cfg.num_classes:
        kwargs["num_classes"] = cfg.num_classes

    def build() -> nn.Module:
        try:
            return make(**kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelLoadError(f"model {cfg.name!r}: torchvision {cfg.arch} refuses the options "
                                 f"{kwargs}: {exc}; check arch_options") from exc

    if not cfg.path:
        # Random weights, seeded: for benchmarks and tests only; the version says so.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = build()
        return module, "random-" + sha256_state(module)[:16]
    module = build()
    path = pathlib.Path(cfg.path)
    try:
        module.load_state_dict(_read_state_dict(path))
    except (OSError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"model {cfg.name!r}: cannot load weights from {path}: {exc}") from exc
    return module, sha256_file(path)


def _build_from_file(cfg: ModelConfig, with_layers: bool) -> tuple[nn.Module, str]:
    """A TorchScript or torch.export file. with_layers: CAM layers are configured, so an exported
    program is unflattened back into its submodules (the flat `.module()` never calls them, so their
    forward hooks would never fire)."""
    path = pathlib.Path(cfg.path)
    try:
        if cfg.source == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu")
        elif with_layers:
            module = torch.export.unflatten(torch.export.load(str(path)))
        else:
            module = torch.export.load(str(path)).module()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"model {cfg.name!r}: cannot load {cfg.source} file {path}: {exc}") from exc
    return module, sha256_file(path)


def _build_demo(cfg: ModelConfig, cache_dir: pathlib.Path | None):
    from workers import demo

    config = demo.DemoConfig(seed=cfg.seed, shuffle_labels=cfg.shuffled_labels)
    module, weights = demo.load_or_build_demo(cache_dir or demo.default_cache_dir(), config)
    # Size and normalization are the demo's own; how images reach that size is the config's.
    spec = InputSpec(channels=3, height=config.image_size, width=config.image_size,
                     mean=tuple(demo.DEMO_MEAN), std=tuple(demo.DEMO_STD), resize=cfg.input.resize,
                     crop_fraction=cfg.input.crop_fraction)
    return module, sha256_file(weights), spec, demo.DEMO_CAM_LAYERS, demo.DEMO_CAM_LAYER, demo.DEMO_LABELS


def _default_cam_layers(cfg: ModelConfig, module: nn.Module | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The CAM layers (configured, else the torchvision family's) and the layouts the family knows for them."""
    layers, layouts = families.cam_defaults(module) if cfg.source == "torchvision" else ((), {})
    if cfg.cam_layers:
        return cfg.cam_layers, layouts
    if layers:
        return layers, layouts
    return ((cfg.cam_layer,) if cfg.cam_layer else ()), {}


def select_device(preference: str = "auto") -> torch.device:
    """The replica's device, chosen once: `auto` takes CUDA when present."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {preference!r} asked for, but no CUDA device is present")
    return device


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu",
               cache_dir: pathlib.Path | None = None) -> LoadedModel:
    """Builds, loads and freezes one configured model on `device`."""
    device = torch.device(device)
    if cfg.modality == "text":
        from workers.text.loading import load_text_model

        return load_text_model(cfg, device)
    spec, labels = cfg.input, cfg.labels
    if cfg.source == "demo":
        module, version, spec, cam_layers, cam_layer, demo_labels = _build_demo(cfg, cache_dir)
        labels = labels or tuple(demo_labels)
        known_layouts = {}
    else:
        if cfg.source == "torchvision":
            module, version = _build_torchvision(cfg)
            cam_layers, known_layouts = _default_cam_layers(cfg, module)
        else:
            cam_layers, known_layouts = _default_cam_layers(cfg)
            module, version = _build_from_file(cfg, bool(cam_layers))
        cam_layer = cfg.cam_layer or (cam_layers[-1] if cam_layers else "")
    if cfg.source not in CAM_SOURCES and cam_layers:  # the config refuses it first; a guard for the loader
        raise ModelLoadError(f"model {cfg.name!r}: {no_cam_on_torchscript(cam_layers)}")
    if cfg.source != "export":  # an exported graph has its mode baked in and refuses eval()
        module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
    modules = dict(module.named_modules())
    missing = [name for name in cam_layers if name not in modules]
    if missing:
        raise ModelLoadError(f"model {cfg.name!r}: CAM layers not found: {', '.join(missing)}")
    if cam_layer and cam_layer not in cam_layers:
        cam_layers = tuple(cam_layers) + (cam_layer,)
    declared = dict(cfg.cam_layouts or {})
    stray = [name for name in declared if name not in cam_layers]
    declared = {**{n: lay for n, lay in known_layouts.items() if n in cam_layers}, **declared}
    if stray:
        raise ModelLoadError(f"model {cfg.name!r}: cam_layouts names {', '.join(stray)}, which are not among its "
                             f"CAM layers ({', '.join(cam_layers) or 'none'}); add them to cam_layers")
    num_classes, shapes = _probe_num_classes(module, spec, device, cfg, {n: modules[n] for n in cam_layers})
    layouts = _cam_layouts(cfg, spec, shapes, declared)
    if labels and len(labels) != num_classes:
        raise ModelLoadError(f"model {cfg.name!r}: {len(labels)} labels for {num_classes} classes")
    references = _reference_set(cfg, spec)
    return LoadedModel(name=cfg.name, module=module, spec=spec, num_classes=num_classes, version=version,
                       device=device, cam_layers=tuple(cam_layers), default_cam_layer=cam_layer,
                       cam_layouts=layouts, labels=tuple(labels), _modules={n: modules[n] for n in cam_layers},
                       reference_set=None if references is None else references.to(device))


def _reference_set(cfg: ModelConfig, spec: InputSpec) -> torch.Tensor | None:
    """The configured reference set (the demo's own when none is configured), model space, CPU."""
    from workers import reference_sets

    if cfg.reference_set:
        return reference_sets.load_reference_set(cfg.reference_set, spec, cfg.name)
    return reference_sets.demo_reference_set(cfg.seed, spec) if cfg.source == "demo" else None


def _probe_num_classes(module: nn.Module, spec: InputSpec, device: torch.device, cfg: ModelConfig,
                       layers: dict[str, nn.Module]) -> tuple[int, dict[str, object]]:
    """One tiny forward: checks the model runs on its input spec, reads the class count, checks that
    every CAM layer is really called (its forward hook fires) in the model's forward, and returns each
    layer's first output shape (None where the output is not a tensor)."""
    fired: dict[str, object] = {}

    def record(name: str, output) -> None:
        fired.setdefault(name, tuple(output.shape) if isinstance(output, torch.Tensor) else None)

    handles = [layer.register_forward_hook(lambda _m, _a, out, name=name: record(name, out))
               for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            out = module(torch.zeros((1,) + spec.shape, device=device))
    except Exception as exc:  # any failure here means the config and the model disagree
        raise ModelLoadError(f"model {cfg.name!r} fails on a {spec.shape} input: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    silent = [name for name in layers if name not in fired]
    if silent:
        raise ModelLoadError(f"model {cfg.name!r}: CAM layers {', '.join(silent)} are never called as modules in "
                             f"the {cfg.source} model's forward, so CAM methods cannot observe them; choose "
                             "layers the forward calls, or remove them from cam_layers")
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelLoadError(f"model {cfg.name!r} must return logits (N, classes), got {getattr(out, 'shape', out)}")
    if cfg.num_classes and out.shape[1] != cfg.num_classes:
        raise ModelLoadError(f"model {cfg.name!r}: config says {cfg.num_classes} classes, model gives {out.shape[1]}")
    return int(out.shape[1]), fired


def _cam_layouts(cfg: ModelConfig, spec: InputSpec, shapes: dict[str, object],
                 declared: dict[str, str]) -> dict[str, str]:
    """Every CAM layer's layout: declared ones checked against the layer's output, the others detected.

    A CAM map reduced over the wrong axes is a plausible-looking wrong answer, so a layer whose
    output does not show the declared layout, or shows no channels-first layout when none is
    declared, refuses the model at load with what to configure, instead of at the first request.
    """
    size = (spec.height, spec.width)
    layouts: dict[str, str] = {}
    for name, shape in shapes.items():
        if shape is None:
            raise ModelLoadError(f"model {cfg.name!r}: CAM layer {name!r} does not return a tensor; choose a layer "
                                 "that does")
        layout = declared.get(name)
        try:
            to_nchw(torch.empty(shape, device="meta"), name, layout, size)
        except InvalidArgument as exc:
            raise ModelLoadError(f"model {cfg.name!r}: {exc.violations[0].description}") from None
        layouts[name] = layout or "nchw"
    return layouts


class ModelRegistry:
    """The configured models by name; loads each on first use, once."""

    def __init__(self, configs: list[ModelConfig], default: str = "", device: str | torch.device = "cpu",
                 cache_dir: pathlib.Path | None = None):
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ModelLoadError(f"duplicate model names in config: {names}")
        if not configs:
            raise ModelLoadError("no models configured")
        self.configs = {c.name: c for c in configs}
        self.default = default or configs[0].name
        if self.default not in self.configs:
            raise ModelNotFound(self.default, names)
        self.device = torch.device(device)
        self.cache_dir = cache_dir
        self._loaded: dict[str, LoadedModel] = {}

    def config(self, name: str = "") -> ModelConfig:
        name = name or self.default
        if name not in self.configs:
            raise ModelNotFound(name, list(self.configs))
        return self.configs[name]

    def get(self, name: str = "") -> LoadedModel:
        cfg = self.config(name)
        if cfg.name not in self._loaded:
            log.info("loading model %s (%s) on %s", cfg.name, cfg.source, self.device)
            self._loaded[cfg.name] = load_model(cfg, self.device, self.cache_dir)
        return self._loaded[cfg.name]

    def names(self) -> list[str]:
        return list(self.configs)


def describe(model: LoadedModel, is_default: bool = False) -> ModelDescription:
    spec = model.spec
    return ModelDescription(
        name=model.name, version=model.version, channels=spec.channels, height=spec.height, width=spec.width,
        mean=tuple(spec.mean), std=tuple(spec.std), resize=spec.resize, crop_fraction=spec.crop_fraction,
        num_classes=model.num_classes, labels=model.labels,
        cam_layers=model.cam_layers, default_cam_layer=model.default_cam_layer,
        online_methods=model.online_methods, offline_methods=model.offline_methods, is_default=is_default,
        modality=model.modality, text=model.text.info() if model.text is not None else None,
        has_reference_set=model.reference_set is not None,
        cam_layouts=tuple(model.cam_layouts.get(n, "nchw") for n in model.cam_layers))
