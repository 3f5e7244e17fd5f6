"""Model and worker configuration: dataclasses with bounds, read once at start.

A config file (YAML or JSON) has this shape; every key is optional except a
model's name and source::

    models:
      - name: resnet18
        source: torchvision          # demo | torchvision | torchscript | export
        arch: resnet18               # torchvision only: a builder (resnet18, vit_b_16, swin_t) or a model class
        arch_options: {}             # keywords for it, e.g. {image_size: 384} or VisionTransformer's sizes
        weights: /models/r18.safetensors   # state_dict (.pt/.pth) or safetensors
        num_classes: 1000
        input: {height: 224, width: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225],
                resize: center_crop, crop_fraction: 0.875}   # how PNG/JPEG inputs reach that size
        cam_layer: layer4
        cam_layers: [layer3, layer4]
        cam_layouts: {layer4: nchw}  # per CAM layer: nchw | nhwc | tokens; undeclared layers must show nchw
        labels: /models/imagenet.txt  # one per line, or an inline list
        reference_set: /models/refs.npy  # Expected Gradients' baselines: (R, C, H, W) pixel images in [0, 1]
                                     # (.npy/.pt/.safetensors; uint8 0..255 too) or a folder of PNG/JPEG
        replicas: 1
        num_gpus: 0
        num_cpus: 1                  # per replica; also its torch thread count
        cpu_affinity: []             # cores the replicas pin themselves to (Linux); [] = none
        resources: {a100: 1}         # custom Ray resources per replica: placed on nodes that have them
        # instead of a fixed `replicas`: Ray Serve autoscaling on ongoing requests per replica
        autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8,
                      upscale_delay_s: 5, downscale_delay_s: 60}
      - name: text-demo                # example: a text classifier: token attributions at its embedding layer
        source: demo                   # demo | torchscript for text models
        modality: text
        text: {embedding: embedding, max_length: 32, pad_id: 0, tokenizer: /models/vocab.json}  # workers/text/config.py
    default_model: demo
    batching: {max_batch_samples: 256, batch_wait_timeout_s: 0.01, max_concurrent_batches: 2,
               adaptive_wait: true}   # an idle model takes a request at once, without the wait
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.affinity import check_cores
from workers.errors import InvalidArgument
from workers.schema import build, check, refuse_unknown
from workers.text.config import MODALITIES, TextConfig
from workers.tracing import TracingConfig

if TYPE_CHECKING:
    from workers.batching import FoldBudget

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


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; validation.py enforces every one.

    max_items: items (images) per request.
    max_samples: NoiseParams.samples.
    max_steps: IntegratedGradientsParams.steps.
    max_top_k: Target.top_k.
    max_image_pixels: decoded width * height per encoded image (decompression bombs).
    max_request_id_chars: ExplainRequest.request_id length.

    `max_items` counts explanations, items x targets per item (top_k), the way the
    kernels count rows: the front door refuses what a kernel would.
    """

    max_items: int = 64
    max_samples: int = 256
    max_steps: int = 512
    max_top_k: int = 10
    max_image_pixels: int = 4096 * 4096
    max_request_id_chars: int = 128

    def __post_init__(self) -> None:
        check(1 <= self.max_items <= 4096, "server.limits.max_items", "must be 1..4096")
        check(1 <= self.max_samples <= 65536, "server.limits.max_samples", "must be 1..65536")
        check(1 <= self.max_steps <= 65536, "server.limits.max_steps", "must be 1..65536")
        check(1 <= self.max_top_k <= 1000, "server.limits.max_top_k", "must be 1..1000")
        check(64 <= self.max_image_pixels <= 1 << 30, "server.limits.max_image_pixels", "must be 64..2**30")
        check(1 <= self.max_request_id_chars <= 1024, "server.limits.max_request_id_chars", "must be 1..1024")


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


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching on the online workers; changeable at runtime."""

    max_batch_samples: int = 256        # a batch's total cost in samples (SmoothGrad-50 costs 50)
    batch_wait_timeout_s: float = 0.01  # how long a partial batch waits for company
    max_concurrent_batches: int = 2     # overlaps pre/post-processing with compute
    max_ongoing_requests: int = 256     # per replica
    max_queued_requests: int = 1024     # per deployment; overflow answers RESOURCE_EXHAUSTED
    fold_max_bytes: int = 0             # memory budget per folded chunk; 0 = derived from the device
    fold_max_rows: int = 0              # cap on rows per chunk; 0 = none
    # Below those caps, the chunk size from the model's measured cost curve (workers/chunk_curve.py),
    # probed once when the replica starts; false = the caps alone.
    fold_measure: bool = True
    # A request to an idle model, after a quiet gap longer than the wait, goes at once (no wait).
    adaptive_wait: bool = True

    def __post_init__(self):
        check(1 <= self.max_batch_samples <= 1_000_000, "batching.max_batch_samples", "must be 1..1e6")
        check(0 <= self.batch_wait_timeout_s <= 10, "batching.batch_wait_timeout_s", "must be 0..10 seconds")
        check(1 <= self.max_concurrent_batches <= 64, "batching.max_concurrent_batches", "must be 1..64")
        check(self.max_ongoing_requests >= 1, "batching.max_ongoing_requests", "must be >= 1")
        check(self.max_queued_requests >= -1, "batching.max_queued_requests", "must be >= -1 (-1: unbounded)")
        check(self.fold_max_bytes >= 0 and self.fold_max_rows >= 0, "batching.fold_*", "must be >= 0")


@dataclass(frozen=True)
class OfflineConfig:
    """The offline workers: their own replicas, CPUs and concurrency.

    replicas: OfflineWorker replicas (each holds every model).
    num_cpus, num_gpus: reserved per replica; Ray never gives them to online replicas.
    max_ongoing_requests: jobs one replica runs at once (its thread pool's size too).
    items_per_chunk: items explained per step; progress and cancellation between steps.
    threads: torch intra-op threads per replica; 0 = num_cpus (at least 1).
    fold_max_bytes, fold_max_rows: the kernels' memory budget per chunk; 0 = derived from the device.
    fold_measure: below that budget, gradient folds use the chunk size of the model's measured cost
        curve (workers/chunk_curve.py); false = the budget alone.
    """

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 1
    items_per_chunk: int = 8
    threads: int = 0
    fold_max_bytes: int = 0
    fold_max_rows: int = 0
    fold_measure: bool = True
    resources: dict | None = None  # custom Ray resources per replica (as models[].resources)

    def __post_init__(self):
        checks = (("replicas", self.replicas >= 1, "must be >= 1"),
                  ("num_cpus", self.num_cpus > 0, "must be > 0"),
                  ("num_gpus", self.num_gpus >= 0, "must be >= 0"),
                  ("max_ongoing_requests", 1 <= self.max_ongoing_requests <= 64, "must be 1..64"),
                  ("items_per_chunk", 1 <= self.items_per_chunk <= 4096, "must be 1..4096"),
                  ("threads", self.threads >= 0, "must be >= 0"),
                  ("fold_max_bytes", self.fold_max_bytes >= 0 and self.fold_max_rows >= 0, "must be >= 0"))
        for name, ok, why in checks:
            check(ok, f"jobs.offline.{name}", why)
        check_resources(self.resources, "jobs.offline.resources")

    @property
    def budget(self) -> "FoldBudget":
        from workers.batching import FoldBudget  # torch: only where the kernels run

        return FoldBudget(max_bytes=self.fold_max_bytes or None, max_rows=self.fold_max_rows or None,
                          measure=self.fold_measure)


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


@dataclass(frozen=True)
class AppConfig:
    """The worker side of the one config: models, batching, device, cache."""

    models: tuple[ModelConfig, ...] = (ModelConfig(name="demo", source="demo"),)
    default_model: str = ""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # The front door's limits (`server.limits`), which the kernels enforce too; set by ServiceConfig.
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    cache_dir: str = ""            # demo model cache; "" = the user's cache directory
    tracing: TracingConfig = field(default_factory=TracingConfig)  # the front door's and the replicas'

    def __post_init__(self):
        names = [m.name for m in self.models]
        if not names:
            raise InvalidArgument.field("models", "configure at least one model")
        if len(set(names)) != len(names):
            raise InvalidArgument.field("models", f"model names must be unique: {names}")
        if self.default_model and self.default_model not in names:
            raise InvalidArgument.field("default_model", f"{self.default_model!r} is not among {names}")

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "AppConfig":
        """The worker sections of a config (models, default_model, batching, device, cache_dir)."""
        raw = dict(raw or {})
        refuse_unknown(cls, raw, "")
        check("limits" not in raw, "limits", "belongs in the server section: server.limits")
        models = raw.pop("models", None)
        if models is not None:
            check(isinstance(models, list), "models", "must be a list of models")
            models = tuple(model_config_from_dict(m, f"models[{i}]") for i, m in enumerate(models))
        config = build(cls, raw, "")
        return config if models is None else dataclasses.replace(config, models=models)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise InvalidArgument.field("model", f"unknown model {name!r}")


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


def load_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a YAML or JSON config file into a plain dict."""
    text = pathlib.Path(path).read_text()
    if str(path).endswith(".json"):
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from None
