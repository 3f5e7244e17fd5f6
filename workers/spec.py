"""The typed request and result that cross from the front door to the workers.

`service/validation.py` turns a wire request into an `ExplainSpec` (every limit
checked there); the workers run it and answer an `ExplainResult`. Both are plain
picklable dataclasses of CPU tensors, so they travel through Ray unchanged; their
tensor fields are pickled as NumPy arrays (`TensorFields`), which Ray carries as
out-of-band buffers, where a torch tensor's own pickling serializes its storage
through `torch.save` (about ten times the CPU, on both sides of every call).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

# The method views the workers use, all from the one table (workers/methods.py).
from workers.text.config import TextInfo
from workers.methods import (  # noqa: F401  (re-exported views)
    ALL_METHODS, CAM_METHODS, GRADIENT_METHODS, NOISE_METHODS, OFFLINE_ONLY_METHODS, per_item_rows)

_NUMPY_DTYPES = {torch.float32, torch.float16, torch.float64, torch.uint8, torch.int64, torch.int32, torch.bool}


class TensorFields:
    """Pickles the instance's CPU tensor fields as NumPy arrays and restores them as tensors.

    Restored arrays that are read-only (Ray hands out views of its object buffers) are
    copied, so a worker may write its tensors as it could before.
    """

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        names = []
        for name, value in state.items():
            if (type(value) is torch.Tensor and value.device.type == "cpu" and not value.requires_grad
                    and value.dtype in _NUMPY_DTYPES):
                state[name] = value.contiguous().numpy()
                names.append(name)
        if names:
            state["__tensor_fields__"] = tuple(names)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        for name in state.pop("__tensor_fields__", ()):
            array = state[name]
            state[name] = torch.from_numpy(array if array.flags.writeable else np.array(array))
        self.__dict__.update(state)  # frozen dataclasses too: no __setattr__ involved


REDUCTIONS = ("abs_max", "sum", "none")
NORMALIZATIONS = ("none", "max_abs", "min_max")
OUTPUT_DTYPES = ("float32", "float16", "uint8")
BASELINE_KINDS = ("zero", "black", "blurred", "uniform_noise", "dataset_mean", "custom", "pad_token")
INTEGRATION_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gauss_legendre")


@dataclass(frozen=True)
class TargetSpec:
    """Which classes to explain: `predicted` (top-1), `indices` (one or per item) or `top_k`."""

    kind: str = "predicted"
    indices: tuple[int, ...] = ()
    k: int = 1

    @property
    def per_item(self) -> int:
        """Maps per item."""
        return self.k if self.kind == "top_k" else 1


@dataclass(frozen=True)
class MethodParams(TensorFields):
    """Every method's parameters, defaults filled in; a method reads its own."""

    absolute: bool = False                 # vanilla
    samples: int = 32                      # noise family
    noise_fraction: float = 0.15
    steps: int = 32                        # integrated gradients
    rule: str = "gauss_legendre"
    baseline: str = "zero"
    blur_sigma: float = 5.0
    baseline_tensor: torch.Tensor | None = None  # custom baseline, model space (1 or N, C, H, W);
    #                                              expected gradients: the custom reference set (R, C, H, W)
    noise_stdev: float = 0.0               # expected gradients: > 0 = GradientSHAP
    max_sigma: float = 20.0                # blur IG
    fraction: float = 0.1                  # guided IG
    layer: str = ""                        # CAM family and Score-CAM; "" = the model's default
    also: tuple[str, ...] = ()             # extra CAM variants in the same pass
    top_k_channels: int = 0                # Score-CAM
    patch_size: int = 8                    # occlusion
    stride: int = 4
    baseline_value: float = 0.0
    masks: int = 4000                      # RISE
    grid: int = 7
    keep_probability: float = 0.5
    segmentation_scales: tuple[float, ...] = (50.0, 100.0, 150.0, 250.0, 500.0, 1200.0)  # XRAI (with steps)


# The methods whose CUSTOM baseline is one tensor for every item or one per item (the path's start); an
# Expected Gradients reference set, also in `baseline_tensor`, is drawn from whole and never split by item.
PER_ITEM_BASELINE_METHODS = ("integrated_gradients", "guided_ig")


def params_for_items(method: str, params: MethodParams, index) -> MethodParams:
    """`params` for a subset of a request's items (`index`: a slice, or an index tensor over the items,
    e.g. each row's item when rows repeat items): a per-item CUSTOM baseline follows its items."""
    custom = params.baseline_tensor
    if custom is None or custom.shape[0] == 1 or method not in PER_ITEM_BASELINE_METHODS:
        return params
    return dataclasses.replace(params, baseline_tensor=custom[index])


@dataclass(frozen=True)
class OutputSpec:
    reduction: str = "abs_max"
    normalization: str = "none"
    dtype: str = "float32"
    png_overlay: bool = False
    native_resolution: bool = False


def request_cost(method: str, items: int, targets_per_item: int, samples: int, steps: int) -> int:
    """Batching cost in samples: folded rows per item (noisy copies, interpolation steps, else 1),
    times items and targets. The one definition: `ExplainSpec.cost` and admission's estimate use it."""
    return items * targets_per_item * per_item_rows(method, samples, steps)


@dataclass(frozen=True)
class SourceGeometry:
    """Where a model input lies in the encoded image it was made from (proto SourceGeometry).

    The image, EXIF orientation applied, is width x height pixels; the model's input covers
    [x0, x1) x [y0, y1) of it, in those pixels (beyond the image where `resize` padded).
    """

    width: int
    height: int
    resize: str
    x0: float
    y0: float
    x1: float
    y1: float


def pixels_to_model_space(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels 0..255 `# (N, C, H, W)` -> model space float32, ((x / 255) - mean) / std per channel.

    The one definition: the front door (service/codec.py) and a worker receiving
    `ExplainSpec.pixels_u8` both use it, so their model-space tensors are bit for bit equal.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean_t) / std_t


@dataclass
class ExplainSpec(TensorFields):
    """One validated request. `inputs` is model space, float32, CPU, (N, C, H, W); for a text model,
    token ids (N, L) int64 with `attention_mask` beside them.

    When the request sent uint8 pixels, `pixels_u8` keeps them (N, C, H, W) with the model's
    `pixel_mean` / `pixel_std`: pickled for the Ray hop, the spec then carries the pixels
    instead of `inputs` (a quarter of the bytes, and under Ray's inline-argument size where
    the float32 tensor is not) and the receiving side normalizes them again with
    `pixels_to_model_space`, bit for bit the tensor the front door validated.
    """

    model: str
    method: str
    inputs: torch.Tensor
    request_id: str = ""
    target: TargetSpec = field(default_factory=TargetSpec)
    params: MethodParams = field(default_factory=MethodParams)
    output: OutputSpec = field(default_factory=OutputSpec)
    seed: int = 0
    audit: bool | None = None              # None = the server's default
    deadline: float | None = None          # time.time() after which the answer is useless
    received_at: float = field(default_factory=time.time)
    # Per item sent as an encoded image, where its model input lies in that image; () for tensors.
    geometry: tuple[SourceGeometry, ...] = ()
    # Text models: `inputs` holds token ids `# (N, L)` int64 padded with the pad id, this their mask
    # `# (N, L)` int64 (1 = a real token); None for images.
    attention_mask: torch.Tensor | None = None
    # W3C trace context ({"traceparent": ..., "tracestate": ...}) of the span the work belongs to
    # (workers/tracing.py): it crosses the Ray hop with the spec; None when the request is not traced.
    trace: dict[str, str] | None = None
    pixels_u8: torch.Tensor | None = None
    pixel_mean: tuple[float, ...] = ()
    pixel_std: tuple[float, ...] = ()

    def __getstate__(self) -> dict:
        state = TensorFields.__getstate__(self)
        pixels = self.pixels_u8
        # Only pixels that are these very inputs cross in their place (a spec copied with other inputs keeps
        # its old pixels otherwise); checking costs one normalization, far less than the bytes it saves.
        carry = (pixels is not None and bool(self.pixel_mean) and tuple(pixels.shape) == tuple(self.inputs.shape)
                 and torch.equal(pixels_to_model_space(pixels, self.pixel_mean, self.pixel_std), self.inputs))
        dropped = "inputs" if carry else "pixels_u8"  # pixels that do not match the inputs are never sent
        state[dropped] = None
        state["__tensor_fields__"] = tuple(n for n in state.get("__tensor_fields__", ()) if n != dropped)
        return state

    def __setstate__(self, state: dict) -> None:
        TensorFields.__setstate__(self, state)
        if self.inputs is None:
            self.inputs = pixels_to_model_space(self.pixels_u8, self.pixel_mean, self.pixel_std)

    @property
    def items(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def cost(self) -> int:
        """Batching cost in samples: folded rows per item, times items and targets.

        A SmoothGrad-50 item costs 50, an IG-32 item 32, a vanilla or CAM item 1.
        """
        return request_cost(self.method, self.items, self.target.per_item, self.params.samples, self.params.steps)


@dataclass
class AttributionMap(TensorFields):
    """One map: float32 CPU tensor, (H, W) or (C, H, W) at input resolution."""

    method: str
    target: int
    target_score: float
    map: torch.Tensor
    native: torch.Tensor | None = None     # CAM at the layer's resolution, (h, w)
    completeness_error: float | None = None           # IG: relative, |sum(a) - delta| / max(|delta|, 1e-6)
    completeness_error_absolute: float | None = None  # IG: |sum(a) - delta|


@dataclass
class ItemExplanation:
    predicted_classes: list[int]
    predicted_scores: list[float]
    attributions: list[AttributionMap]
    tokens: list[str] = field(default_factory=list)     # text models: the item's tokens, padding excluded
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ExplainResult:
    request_id: str
    model: str
    model_version: str
    method: str
    items: list[ItemExplanation]
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_samples: int = 0
    batch_requests: int = 0


@dataclass(frozen=True)
class ModelDescription:
    """What the front door needs to validate requests for a model and to list it."""

    name: str
    version: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    labels: tuple[str, ...]
    cam_layers: tuple[str, ...]
    default_cam_layer: str
    online_methods: tuple[str, ...]
    offline_methods: tuple[str, ...]
    is_default: bool = False
    has_reference_set: bool = False  # expected gradients can draw from the model's own reference set
    resize: str = "stretch"        # how encoded images reach height x width (workers.config.InputSpec)
    crop_fraction: float = 0.875
    default_method: str = ""       # what a request naming no method gets (an adopted recommendation); "" = none
    modality: str = "image"        # workers.methods.IMAGE or TEXT
    text: TextInfo | None = None   # text models: vocabulary, lengths, tokenizer
    cam_layouts: tuple[str, ...] = ()  # one per cam_layers entry: nchw, nhwc or tokens; () = every one nchw

    @property
    def layer_layouts(self) -> tuple[tuple[str, str], ...]:
        """(CAM layer, its layout) pairs, in cam_layers order."""
        return tuple(zip(self.cam_layers, self.cam_layouts or ("nchw",) * len(self.cam_layers)))
