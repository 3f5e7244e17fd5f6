"""A `models:` entry of the config: where a model comes from, its input, CAM layers and their layouts,
replicas and resources (`ModelConfig`), parsed from and written back to plain dicts.

workers/config.py holds the rest of the worker side of the config (batching, offline jobs, the app) and
re-exports these names.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

from workers.affinity import check_cores
from workers.errors import InvalidArgument
from workers.schema import build, check
from workers.text.config import MODALITIES, TextConfig

SOURCES = ("demo", "torchvision", "torchscript", "export")
# The sources whose modules take forward hooks, which every CAM method needs (a TorchScript module does not).
CAM_SOURCES = ("demo", "torchvision", "export")


def no_cam_on_torchscript(cam_layers: tuple[str, ...]) -> str:
    """Why a TorchScript model cannot have CAM layers: said by the config check and by the loader alike."""
    return (f"CAM layers {', '.join(cam_layers)} were configured, but a TorchScript module cannot carry the forward "
            "hooks CAM methods need; load it as source torchvision (a state_dict or safetensors file) or export "
            "(torch.export), which support CAM, or remove cam_layer/cam_layers to serve the gradient methods only")
# How a CAM layer's output is laid out: channels-first (N, C, H, W), channels-last (N, H, W, C), or
# transformer tokens (N, 1 + h*w, C) with a leading class token over the input's patch grid.
CAM_LAYOUTS = ("nchw", "nhwc", "tokens")
# The Ray Serve autoscaling settings a model may set (ray.serve.config.AutoscalingConfig).
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s", "look_back_period_s", "metrics_interval_s",
                    "upscaling_factor", "downscaling_factor")


def check_resources(resources: Any, where: str) -> None:
    """Custom Ray resources: names to non-negative amounts; CPUs and GPUs have their own keys."""
    if resources is None:
        return
    check(isinstance(resources, dict), where, 'must be a mapping of resource names to amounts, e.g. {"a100": 1}')
    for name, amount in resources.items():
        check(isinstance(name, str) and bool(name), where, f"resource names must be strings, got {name!r}")
        check(name not in ("CPU", "GPU", "memory", "object_store_memory"), f"{where}.{name}",
              "is Ray's own; use num_cpus / num_gpus")
        check(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0,
              f"{where}.{name}", f"must be a number >= 0, got {amount!r}")


RESIZE_POLICIES = ("stretch", "center_crop", "letterbox")


@dataclass(frozen=True)
class InputSpec:
    """What the model consumes: (C, H, W) and the pixel-space mean/std it was trained with.

    `resize` is how an encoded image (PNG/JPEG) of any size becomes H x W: `stretch` scales each
    side to fit (aspect ratio not kept); `center_crop` scales the image so that it covers
    (H, W) / `crop_fraction` and keeps the centre H x W (torchvision's classification transforms:
    224 from a 256 shorter side at 0.875); `letterbox` scales it to fit inside H x W, aspect kept,
    and pads the rest with the model's mean (zero once normalized). Each answer says which region
    of the image the model's input covers (`ItemResult.geometry`), so maps map back to the photo.
    """

    channels: int = 3
    height: int = 224
    width: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: str = "stretch"
    crop_fraction: float = 0.875

    def __post_init__(self):
        check(1 <= self.channels <= 4, "input.channels", "must be 1..4")
        check(8 <= self.height <= 4096 and 8 <= self.width <= 4096, "input", "height and width must be 8..4096")
        check(len(self.mean) == self.channels and len(self.std) == self.channels,
               "input", "mean and std need one value per channel")
        check(all(s > 0 for s in self.std), "input.std", "must be positive")
        check(self.resize in RESIZE_POLICIES, "input.resize",
              f"{self.resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
        check(0.1 <= self.crop_fraction <= 1.0, "input.crop_fraction", "must be 0.1..1 (torchvision's is 0.875)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class ModelConfig:
    """One model the service can explain."""

    name: str
    source: str
    arch: str = ""                 # torchvision builder (vit_b_16) or model class (VisionTransformer)
    # Keyword arguments for the builder or class, e.g. {"aux_logits": False} or a VisionTransformer's sizes. ViT's
    # image_size and MaxViT's input_size default to the input's.
    arch_options: dict | None = None
    path: str = ""                 # weights file, TorchScript file or torch.export file
    num_classes: int = 0           # 0: read from the model's output
    input: InputSpec = field(default_factory=InputSpec)
    cam_layer: str = ""            # default CAM layer; "" = the architecture's usual one
    cam_layers: tuple[str, ...] = ()
    # Layer -> one of CAM_LAYOUTS. A layer not named here is checked when the model loads: it must show a
    # channels-first output; anything else is refused, naming this setting.
    cam_layouts: dict | None = None
    labels: tuple[str, ...] = ()
    # Expected Gradients' reference set (workers/reference_sets.py): a tensor file or a folder of images;
    # "" = none (the demo model builds its own).
    reference_set: str = ""
    replicas: int = 1              # online replicas (one per GPU where there are GPUs)
    num_gpus: float = 0.0          # per replica
    num_cpus: float = 1.0          # per replica; also torch's intra-op thread count
    cpu_affinity: tuple[int, ...] = ()  # cores each replica pins itself to; () = no pinning (Linux)
    seed: int = 0                  # demo only: data and training seed
    # Demo only (image): train on shuffled labels, the model of the data-randomization test
    # (EvaluationRequest.shuffled_labels_model); cached apart from the ordinary demo.
    shuffled_labels: bool = False
    # Ray Serve autoscaling of the online replicas instead of a fixed `replicas`; keys as AUTOSCALING_KEYS.
    autoscaling: dict | None = None
    # Custom Ray resources each replica needs, e.g. {"a100": 1}: the replicas go only to nodes started with
    # them (`ray start --resources '{"a100": 4}'`), which is how models are placed by node type.
    resources: dict | None = None
    # "image" or "text"; a text model's embedding, vocabulary and tokenizer (workers/text/config.py).
    modality: str = "image"
    text: TextConfig | None = None

    def __post_init__(self):
        self._check_text()
        check(bool(self.name) and len(self.name) <= 64 and self.name.replace("-", "").replace("_", "").isalnum(),
               "models.name", f"{self.name!r} must be 1..64 letters, digits, '-' or '_'")
        check(self.source in SOURCES, f"models[{self.name}].source", f"must be one of {', '.join(SOURCES)}")
        check(self.source != "torchvision" or bool(self.arch), f"models[{self.name}].arch",
               "torchvision models need an architecture name")
        check(self.source in ("demo", "torchvision") or bool(self.path), f"models[{self.name}].path",
               "torchscript and export models need a file path")
        check(self.source in CAM_SOURCES or not (self.cam_layer or self.cam_layers), f"models[{self.name}].cam_layers",
              no_cam_on_torchscript(self.cam_layers or (self.cam_layer,)))
        check(not self.shuffled_labels or self.source == "demo", f"models[{self.name}].shuffled_labels",
              "trains the demo model on shuffled labels (source: demo); train your own model on permuted labels "
              "and serve it under another name for other architectures")
        check(self.replicas >= 0 and self.num_gpus >= 0 and self.num_cpus > 0, f"models[{self.name}]",
               "replicas and num_gpus must be >= 0, num_cpus > 0")
        check_resources(self.resources, f"models[{self.name}].resources")
        suffix = pathlib.PurePath(self.reference_set).suffix.lower()
        check(not suffix or suffix in (".npy", ".pt", ".pth", ".safetensors"), f"models[{self.name}].reference_set",
              f"{self.reference_set!r}: give a .npy, .pt, .pth or .safetensors file of images, or a folder of images")
        check(self.arch_options is None or (self.source == "torchvision" and isinstance(self.arch_options, dict)
                                            and all(isinstance(k, str) for k in self.arch_options)),
              f"models[{self.name}].arch_options", "must be a mapping of keyword names to values, torchvision only")
        if self.cam_layouts is not None:
            where = f"models[{self.name}].cam_layouts"
            check(isinstance(self.cam_layouts, dict), where, "must be a mapping of layer names to layouts")
            check(self.source in CAM_SOURCES, where, no_cam_on_torchscript(tuple(self.cam_layouts)))
            for layer, layout in self.cam_layouts.items():
                check(layout in CAM_LAYOUTS, f"{where}.{layer}",
                      f"{layout!r} is not a layout; choose one of {', '.join(CAM_LAYOUTS)}")
        if self.autoscaling is not None:
            where = f"models[{self.name}].autoscaling"
            check(isinstance(self.autoscaling, dict), where, "must be a mapping")
            unknown = set(self.autoscaling) - set(AUTOSCALING_KEYS)
            check(not unknown, where, f"unknown keys: {', '.join(sorted(unknown))}; known: "
                                       f"{', '.join(AUTOSCALING_KEYS)}")
            low, high = self.autoscaling.get("min_replicas", 1), self.autoscaling.get("max_replicas", 1)
            check(isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1,
                   where, "needs 0 <= min_replicas <= max_replicas, max_replicas >= 1")
            target = self.autoscaling.get("target_ongoing_requests", 2)
            check(isinstance(target, (int, float)) and target > 0, f"{where}.target_ongoing_requests",
                   "must be > 0")


    def _check_text(self) -> None:
        where = f"models[{self.name}]"
        check(self.modality in MODALITIES, f"{where}.modality", f"must be one of {', '.join(MODALITIES)}")
        if self.modality != "text":
            check(self.text is None, f"{where}.text", "is read only for models with modality: text")
            return
        check(self.source in ("demo", "torchscript"), f"{where}.source",
              "text models load as demo (the built-in text demo) or torchscript (a scripted module)")
        check(not (self.cam_layer or self.cam_layers or self.cam_layouts), f"{where}.cam_layers",
              "text models have no CAM layers; their attributions are taken at text.embedding")
        check(not self.shuffled_labels, f"{where}.shuffled_labels", "is for the image demo only")


def model_config_from_dict(raw: dict[str, Any], path: str = "models[]") -> ModelConfig:
    """One `models:` entry; `weights` is an alias of `path`, `labels` a list or a file of one label per line."""
    check(isinstance(raw, dict), path, "must be a mapping with at least name and source")
    raw = dict(raw)
    if "weights" in raw:
        check("path" not in raw, path, "give weights or path, not both")
        raw["path"] = raw.pop("weights")
    name = raw.get("name")
    where = f"models[{name}]" if isinstance(name, str) and name else path
    labels = raw.get("labels")
    if isinstance(labels, str):
        try:
            lines = pathlib.Path(labels).read_text().splitlines()
        except OSError as exc:
            raise InvalidArgument.field(f"{where}.labels", f"cannot read {labels!r}: {exc.strerror}") from None
        raw["labels"] = tuple(line.strip() for line in lines if line.strip())
    elif labels is not None:
        check(isinstance(labels, (list, tuple)), f"{where}.labels", "must be a list or a file path")
        raw["labels"] = tuple(str(v) for v in labels)
    if "cpu_affinity" in raw:
        check(isinstance(raw["cpu_affinity"], (list, tuple)), f"{where}.cpu_affinity", "must be a list of core numbers")
        try:
            raw["cpu_affinity"] = check_cores(raw["cpu_affinity"], f"{where}.cpu_affinity")
        except ValueError as exc:
            raise InvalidArgument.field(f"{where}.cpu_affinity", str(exc).split(": ", 1)[1]) from None
    return build(ModelConfig, raw, where)


def model_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that differ from the defaults: what a config file would say."""
    out: dict[str, Any] = {"name": cfg.name, "source": cfg.source}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name not in out and value != default:
            out[f.name] = dataclasses.asdict(value) if f.name in ("input", "text") else (
                list(value) if isinstance(value, tuple) else value)
    if "input" in out:
        out["input"]["mean"], out["input"]["std"] = list(cfg.input.mean), list(cfg.input.std)
    return out
