"""A gradient-family request as the kernels take it: its fields, the server's caps, its cost and its checks.

`workers/kernels/gradients.py` folds and runs these; everything here is the request itself, so the
checks a request must pass live next to the fields they read, and every refusal is a field-level
`InvalidArgument` naming what to fix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.errors import InvalidArgument
from workers.kernels.path_rows import MAX_BLUR_IG_SIGMA, check_max_sigma
from workers.methods import GRADIENT_METHODS, NOISE_METHODS, per_item_rows
from workers.spec import PER_ITEM_BASELINE_METHODS

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gauss_legendre")
METHODS = GRADIENT_METHODS  # the gradient family of the method table
# The methods whose path starts at `baselines` (None = zeros).
BASELINE_METHODS = PER_ITEM_BASELINE_METHODS
# A request's reference set (Expected Gradients) may hold at most this many baselines.
MAX_REFERENCES = 4096


@dataclass(frozen=True)
class GradientRequest:
    """One attribution request: N items, one method, its parameters.

    inputs: `# (N, C, H, W)` model-space input on the model's device.
    targets: `# (N,)` int64 class per item.
    samples / noise_fraction: noise family; noise std is noise_fraction * (max - min) of each item.
    steps / rule / baselines: IG; baselines `# (N, C, H, W)` (see baselines.make_baseline), None = zeros.
    seed: seeds the request's own generator (noise, Expected Gradients' draws). absolute: vanilla only, |grad|.
    references / samples / noise_stdev: Expected Gradients; references `# (R, C, H, W)` model space, the
        baselines it draws from; noise_stdev > 0 (a fraction of each item's range) makes it GradientSHAP.
    steps / max_sigma: Blur IG, the path from a blur of max_sigma pixels to the input.
    steps / fraction / baselines: Guided IG; the fraction of features moved first at each step.
    """

    inputs: Tensor
    targets: Tensor
    method: str
    samples: int = 32
    noise_fraction: float = 0.15
    steps: int = 32
    rule: str = "gauss_legendre"
    baselines: Tensor | None = None
    seed: int = 0
    absolute: bool = False
    references: Tensor | None = None
    noise_stdev: float = 0.0
    max_sigma: float = 20.0
    fraction: float = 0.1


@dataclass
class GradientLimits:
    """Server caps per request: noisy copies and baseline draws, path steps, items."""

    max_samples: int = 256
    max_steps: int = 512
    max_items: int = 64


def request_cost(req: GradientRequest) -> int:
    """Rows `req` folds into: N * samples (noise family, Expected Gradients), N * steps (IG, Blur IG,
    Guided IG: one step's N rows at a time), N (vanilla)."""
    return int(req.inputs.shape[0]) * per_item_rows(req.method, int(req.samples), int(req.steps))


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field, description)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_gradient_request(req: GradientRequest, num_classes: int, limits: GradientLimits) -> None:
    """Raise InvalidArgument naming the first bad field of `req`."""
    if req.method not in METHODS:
        raise _bad("method", f"unknown gradient method {req.method!r}; choose one of {', '.join(METHODS)}")
    x = req.inputs
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise _bad("inputs", "must be a non-empty floating tensor shaped (N, C, H, W)")
    if x.shape[0] > limits.max_items:
        raise _bad("inputs", f"{x.shape[0]} items exceed the limit of {limits.max_items}")
    if not bool(torch.isfinite(x).all()):
        raise _bad("inputs", "contains NaN or Inf")
    _validate_targets(req.targets, int(x.shape[0]), num_classes)
    if not _is_int(req.seed) or not 0 <= req.seed < 2**64:
        raise _bad("seed", f"must be an integer in [0, 2^64), got {req.seed!r}")
    if req.method in NOISE_METHODS:
        _validate_noise(req, limits)
    elif req.method == "integrated_gradients":
        _validate_integrated(req, limits)
    elif req.method == "expected_gradients":
        _validate_expected(req, limits)
    elif req.method == "blur_ig":
        _validate_steps(req, limits, "blur_ig.steps", 1)
        if not check_max_sigma(req.max_sigma):
            raise _bad("blur_ig.max_sigma", f"must be in (0, {MAX_BLUR_IG_SIGMA:g}] pixels, got {req.max_sigma!r}")
    elif req.method == "guided_ig":
        _validate_steps(req, limits, "guided_ig.steps", 2)
        if not _is_number(req.fraction) or not 0.0 < req.fraction <= 1.0:
            raise _bad("guided_ig.fraction", f"must be in (0, 1], got {req.fraction!r}")
        _validate_baselines(req, "guided_ig.baseline")


def _validate_targets(targets: Tensor, n: int, num_classes: int) -> None:
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise _bad("target", "must be an integer tensor with one class per item")
    if tuple(targets.shape) != (n,):
        raise _bad("target", f"needs one class per item: shape ({n},), got {tuple(targets.shape)}")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise _bad("target", f"class indices must be in [0, {num_classes}), got {low}..{high}")


def _validate_noise(req: GradientRequest, limits: GradientLimits) -> None:
    if not _is_int(req.samples) or not 1 <= req.samples <= limits.max_samples:
        raise _bad("noise.samples", f"must be in [1, {limits.max_samples}], got {req.samples!r}")
    fraction = req.noise_fraction
    if not _is_number(fraction) or not 0.0 <= fraction <= 1.0:
        raise _bad("noise.noise_fraction", f"must be in [0, 1], got {fraction!r}")


def _validate_steps(req: GradientRequest, limits: GradientLimits, field: str, least: int) -> None:
    if not _is_int(req.steps) or not least <= req.steps <= limits.max_steps:
        raise _bad(field, f"must be in [{least}, {limits.max_steps}], got {req.steps!r}")


def _validate_integrated(req: GradientRequest, limits: GradientLimits) -> None:
    if req.rule not in RULES:
        raise _bad("integrated_gradients.rule", f"unknown rule {req.rule!r}; choose one of {', '.join(RULES)}")
    _validate_steps(req, limits, "integrated_gradients.steps", 1)
    if req.rule == "riemann_trapezoid" and req.steps < 2:
        raise _bad("integrated_gradients.steps", "riemann_trapezoid needs at least 2 steps")
    _validate_baselines(req, "integrated_gradients.baseline")


def _validate_baselines(req: GradientRequest, field: str) -> None:
    b = req.baselines
    if b is None:
        return
    if not isinstance(b, Tensor) or tuple(b.shape) != tuple(req.inputs.shape) or not b.is_floating_point():
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise _bad(field, f"must be shaped like the inputs {tuple(req.inputs.shape)}, got {shape}")
    if b.device != req.inputs.device or not bool(torch.isfinite(b).all()):
        raise _bad(field, "must be finite and on the inputs' device")


def _validate_expected(req: GradientRequest, limits: GradientLimits) -> None:
    if not _is_int(req.samples) or not 1 <= req.samples <= limits.max_samples:
        raise _bad("expected_gradients.samples", f"must be in [1, {limits.max_samples}], got {req.samples!r}")
    if not _is_number(req.noise_stdev) or not 0.0 <= req.noise_stdev <= 1.0:
        raise _bad("expected_gradients.noise_stdev", f"must be in [0, 1], got {req.noise_stdev!r}")
    refs, field = req.references, "expected_gradients.reference"
    if refs is None:
        raise _bad(field, "this model has no reference set; send the baselines to draw from as a CUSTOM reference "
                          "(tensors shaped like the inputs)")
    item = tuple(req.inputs.shape[1:])
    if not isinstance(refs, Tensor) or refs.dim() != 4 or tuple(refs.shape[1:]) != item or refs.shape[0] == 0:
        shape = tuple(refs.shape) if isinstance(refs, Tensor) else type(refs).__name__
        raise _bad(f"{field}.tensor", f"must be shaped (R, *{item}) with R >= 1, got {shape}")
    if refs.shape[0] > MAX_REFERENCES:
        raise _bad(f"{field}.tensor", f"has {refs.shape[0]} baselines; at most {MAX_REFERENCES}")
    if not refs.is_floating_point() or refs.device != req.inputs.device or not bool(torch.isfinite(refs).all()):
        raise _bad(f"{field}.tensor", "must be finite floating values on the inputs' device")
