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
      - name: demo-shuffled            # the demo trained on shuffled labels: EvaluationRequest.shuffled_labels_model
        source: demo                   # of a DATA_RANDOMIZATION evaluation of `demo`
        shuffled_labels: true
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

from workers.errors import InvalidArgument
from workers.schema import build, check, refuse_unknown
from workers.model_config import (  # noqa: F401  (re-exported: a model entry's names)
    AUTOSCALING_KEYS, CAM_LAYOUTS, CAM_SOURCES, RESIZE_POLICIES, SOURCES, InputSpec, ModelConfig, check_resources,
    model_config_from_dict, model_to_dict, no_cam_on_torchscript)
from workers.tracing import TracingConfig

if TYPE_CHECKING:
    from workers.batching import FoldBudget

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
