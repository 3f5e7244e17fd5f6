"""Class activation maps from one pass to the layer: Grad-CAM and its online relatives.

- Grad-CAM (Selvaraju et al., 2017, arXiv:1610.02391): channel weights are the
  spatial mean of the gradient of the target logit.
- Grad-CAM++ (Chattopadhay et al., 2018, arXiv:1710.11063): channel weights from the
  closed-form second/third-order terms (eq. 19) obtained with an exponential score.
- Layer-CAM (Jiang et al., 2021, IEEE TIP 30:5875): element-wise ReLU'd gradients
  weight each activation location.
- HiResCAM (Draelos & Carin, 2020, arXiv:2011.08891): the element-wise product of
  gradient and activation, summed over channels (no spatial averaging of the gradient).
- XGrad-CAM (Fu et al., 2020, arXiv:2008.02312): channel weights
  Σ(A·g) / ΣA over the layer's locations (the activation-normalized gradient).
- EigenCAM (Muhammad & Yeasin, 2020, arXiv:2008.00299): the projection of the
  activations, centred per channel, on their first principal component. It reads no
  gradient and no class: a pass that only asks for EigenCAM runs the forward alone.
  The sign of a principal component is arbitrary; the rule here is pytorch-grad-cam's
  sign correction (`get_2d_projection_with_sign_correction`): the projection is
  flipped when its most negative value is larger in magnitude than its most positive
  one, so the strongest response is positive (and survives the ReLU). pytorch-grad-cam's
  `EigenCAM` itself keeps the SVD's sign, whichever LAPACK returns.

All of them need only (activations, gradients) at the layer, so requests for any of
them on one layer fold into one forward and one backward that stops at the layer
(see `hooks.LayerTap`). Maps are float32 `(N, H, W)`, ReLU'd, upsampled bilinearly
(half-pixel centres, like Captum's `LayerAttribution.interpolate(..., "bilinear")`
and cv2's resize in pytorch-grad-cam) and *not* normalized: normalization is a
presentation choice made when the response is encoded.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.errors import InvalidArgument
from workers.kernels.hooks import LayerTap, LayerTaps
from workers.kernels.ranking import class_probabilities, predicted_classes

CAM_VARIANTS = ("grad_cam", "grad_cam_plus_plus", "layer_cam", "hires_cam", "xgrad_cam", "eigen_cam")
# Variants that read the activations alone: a pass asking only for these runs no backward.
GRADIENT_FREE_VARIANTS = frozenset({"eigen_cam"})

# Grad-CAM++ and XGrad-CAM denominator guards; the values pytorch-grad-cam uses, so maps agree.
_GRADCAM_PP_EPS = 1e-6
_XGRAD_EPS = 1e-7


@dataclass(frozen=True)
class CamRequest:
    """One CAM request: `inputs` `(N, C, H, W)` in model space on the model's device."""

    inputs: Tensor
    targets: Tensor | None   # (N,) int64 class indices; None: each image's top class in this forward
                             # (ranked as workers.kernels.ranking: ties go to the lowest index)
    layer: str
    variants: tuple[str, ...] = ("grad_cam",)


@dataclass
class CamResult:
    """Per variant: `maps` `(N, H, W)` at input size, `native` `(N, h, w)` at the layer's.

    The pass runs the whole model, so its outputs come back too: `logits`
    `(N, classes)` float32 and the `targets` `(N,)` explained (the predicted
    classes where the request left them to the model). A caller that needs the
    predictions needs no forward of its own.
    """

    maps: dict[str, Tensor] = field(default_factory=dict)
    native: dict[str, Tensor] = field(default_factory=dict)
    rows: int = 0            # batching cost: one forward+backward row per image
    logits: Tensor | None = None
    targets: Tensor | None = None


# ---------------------------------------------------------------- variants
# Each takes activations and gradients `(B, K, h, w)` (float32; the gradients None when
# the pass ran no backward, for the gradient-free variants) and returns the un-ReLU'd
# map `(B, h, w)`.

def _grad_cam(act: Tensor, grad: Tensor) -> Tensor:
    weights = grad.mean(dim=(2, 3), keepdim=True)                       # (B, K, 1, 1)
    return (weights * act).sum(dim=1)


def _grad_cam_plus_plus(act: Tensor, grad: Tensor) -> Tensor:
    # With score S = exp(Y) the 2nd/3rd derivatives of S are exp(Y)·g², exp(Y)·g³, so
    # alpha (eq. 19) needs only first-order gradients g; exp(Y) cancels in alpha and
    # is a per-image scale on the weights, dropped (as pytorch-grad-cam does) since
    # it cannot change the map's shape and overflows for large logits.
    #
    # alpha's denominator g²·(2 + ΣA·g) passes through zero where the signed activation
    # sum is near -2/g: float32 cancellation there moved maps by up to 5e-3 on a trained
    # model. The weights are evaluated in float64 (a (B, K, h, w) elementwise cost, small
    # next to the pass), then the map in float32 like the other variants.
    act64, grad64 = act.double(), grad.double()
    g2 = grad64.pow(2)
    g3 = g2 * grad64
    act_sum = act64.sum(dim=(2, 3), keepdim=True)                        # (B, K, 1, 1)
    alpha = g2 / (2 * g2 + act_sum * g3 + _GRADCAM_PP_EPS)
    alpha = torch.where(grad64 != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(grad64) * alpha).sum(dim=(2, 3), keepdim=True)     # (B, K, 1, 1)
    return (weights * act64).sum(dim=1).float()


def _layer_cam(act: Tensor, grad: Tensor) -> Tensor:
    return (F.relu(grad) * act).sum(dim=1)


def _hires_cam(act: Tensor, grad: Tensor) -> Tensor:
    return (grad * act).sum(dim=1)


def _xgrad_cam(act: Tensor, grad: Tensor) -> Tensor:
    # The denominator ΣA is a signed sum on layers with negative activations: weights in
    # float64 (a (B, K, h, w) elementwise cost), the map in float32, as Grad-CAM++.
    act64, grad64 = act.double(), grad.double()
    act_sum = act64.sum(dim=(2, 3), keepdim=True)                        # (B, K, 1, 1)
    weights = (grad64 * act64).sum(dim=(2, 3), keepdim=True) / (act_sum + _XGRAD_EPS)
    return (weights * act64).sum(dim=1).float()


def _eigen_cam(act: Tensor, _grad: Tensor | None) -> Tensor:
    return eigen_projection(act)


def eigen_projection(act: Tensor) -> Tensor:
    """Signed projection `(B, h, w)` of each image's activations `(B, K, h, w)` on their first principal
    component (locations are the samples, channels the features, centred per channel), with the sign
    rule of the module docstring. Computed in float64, returned float32.

    Only the first component is needed, so it comes from the eigendecomposition of the smaller Gram
    matrix: with M the centred `(h*w, K)` data, M·v1 = σ1·u1 where u1 is the top eigenvector of M·Mᵀ
    `(h*w, h*w)` (eigenvalue σ1²), or v1 that of Mᵀ·M `(K, K)` when the channels are fewer."""
    b, _, h, w = act.shape
    m = act.double().flatten(2).transpose(1, 2)                          # (B, h*w, K)
    m = m - m.mean(dim=1, keepdim=True)
    if m.shape[1] <= m.shape[2]:
        values, vectors = torch.linalg.eigh(m @ m.transpose(1, 2))        # ascending, (B, h*w, h*w)
        proj = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()    # (B, h*w)
    else:
        _, vectors = torch.linalg.eigh(m.transpose(1, 2) @ m)            # (B, K, K)
        proj = (m @ vectors[:, :, -1:])[:, :, 0]                         # (B, h*w)
    flip = proj.amin(dim=1).abs() > proj.amax(dim=1).abs()
    proj = torch.where(flip[:, None], -proj, proj)
    return proj.view(b, h, w).float()


_VARIANT_FNS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "grad_cam": _grad_cam,
    "grad_cam_plus_plus": _grad_cam_plus_plus,
    "layer_cam": _layer_cam,
    "hires_cam": _hires_cam,
    "xgrad_cam": _xgrad_cam,
    "eigen_cam": _eigen_cam,
}


# ---------------------------------------------------------------- validation

def check_batch(inputs: Tensor, targets: Tensor | None) -> None:
    """Typed errors unless `inputs` is a finite `(N, C, H, W)` batch and `targets` `(N,)` int64 or None."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        raise InvalidArgument.field("inputs", "must be a floating tensor (N, C, H, W)")
    if inputs.shape[0] == 0:
        raise InvalidArgument.field("inputs", "must hold at least one image")
    if not bool(torch.isfinite(inputs).all()):
        raise InvalidArgument.field("inputs", "must be finite (no NaN or Inf)")
    n = inputs.shape[0]
    if targets is None:
        return
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.shape != (n,):
        raise InvalidArgument.field("target", f"must be an int64 tensor of shape ({n},)")
    if n and int(targets.min()) < 0:  # before the pass, where -1 means "predicted"
        raise InvalidArgument.field("target", "class indices must be >= 0")


def check_targets(targets: Tensor, num_classes: int) -> None:
    """Typed error unless every target indexes a class (before any gather: an
    out-of-range index is a device-side assert on CUDA, not an exception)."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise InvalidArgument.field("target", f"class indices must lie in [0, {num_classes})")


def _validate_structure(req: CamRequest, taps: LayerTaps) -> None:
    taps[req.layer]  # raises LayerNotFound with the known layers
    check_batch(req.inputs, req.targets)
    if not req.variants:
        raise InvalidArgument.field("cam.variants", "name at least one variant")
    for v in req.variants:
        if v not in _VARIANT_FNS:
            raise InvalidArgument.field(
                "cam.variants", f"unknown variant {v!r}; choose from {', '.join(CAM_VARIANTS)}")
    if len(set(req.variants)) != len(req.variants):
        raise InvalidArgument.field("cam.variants", "each variant may appear once")


def validate_cam_request(req: CamRequest, taps: LayerTaps, num_classes: int) -> None:
    """Raise `InvalidArgument` / `LayerNotFound` unless `req` can be explained."""
    _validate_structure(req, taps)
    if req.targets is not None:
        check_targets(req.targets, num_classes)


# ---------------------------------------------------------------- compute

def explain_cam(model: nn.Module, taps: LayerTaps, requests: list[CamRequest],
                budget: FoldBudget = FoldBudget()) -> list[CamResult]:
    """CAM maps for every request, one forward + one truncated backward per row
    (the forward alone where a layer's fold asks only for gradient-free variants).

    Requests on the same layer (and with the same image shape, dtype and device) are
    folded: their inputs are concatenated `(sum N, C, H, W)`, chunked to `budget`,
    and every variant any of them asked for is computed from the same activations
    and gradients. Results come back per request, in order, identical to running
    each request alone.
    """
    for req in requests:
        _validate_structure(req, taps)
    results = [CamResult(rows=int(r.inputs.shape[0])) for r in requests]
    # Out of inference mode even if the caller is in it: the folded copies made here are then
    # ordinary tensors that autograd may save (an inference tensor cannot be saved for backward).
    with torch.inference_mode(False):
        for members in _group_by_layer(requests).values():
            _explain_group(model, taps[requests[members[0]].layer],
                           [requests[i] for i in members], [results[i] for i in members], budget)
    return results


def _group_by_layer(requests: list[CamRequest]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.layer, tuple(r.inputs.shape[1:]), r.inputs.dtype, r.inputs.device)
        groups.setdefault(key, []).append(i)
    return groups


def _explain_group(model: nn.Module, tap: LayerTap, reqs: list[CamRequest],
                   results: list[CamResult], budget: FoldBudget) -> None:
    variants = tuple(v for v in CAM_VARIANTS if any(v in r.variants for r in reqs))
    backward = any(v not in GRADIENT_FREE_VARIANTS for v in variants)
    # Detached: an input that requires grad would make autograd record the forward up to
    # the layer, which the backward never visits.
    inputs = torch.cat([r.inputs.detach() for r in reqs])                # (sum N, C, H, W)
    targets = torch.cat([_predicted_rows(r) if r.targets is None else r.targets.to(inputs.device)
                         for r in reqs])                                 # (sum N,)
    size = tuple(inputs.shape[-2:])
    rows = rows_per_chunk(model, tuple(inputs.shape[1:]), budget, device=inputs.device,
                          dtype=inputs.dtype, backward=backward)
    native: dict[str, list[Tensor]] = {v: [] for v in variants}
    outputs: dict[str, list[Tensor]] = {"logits": [], "targets": []}
    for chunk in iter_chunks(inputs.shape[0], rows):
        act, grad, logits, explained = _activation_and_gradient(model, tap, inputs[chunk], targets[chunk],
                                                                backward)
        for v in variants:
            native[v].append(F.relu(_VARIANT_FNS[v](act, grad)))         # (B, h, w)
        outputs["logits"].append(logits)
        outputs["targets"].append(explained)
    _split_back(reqs, results, {v: torch.cat(m) for v, m in native.items()}, size,
                {k: torch.cat(m) for k, m in outputs.items()})


def _predicted_rows(req: CamRequest) -> Tensor:
    """-1 per image: its class is left to the model, its top class in the pass (`ranking.predicted_classes`)."""
    return torch.full((req.inputs.shape[0],), -1, dtype=torch.long, device=req.inputs.device)


def _activation_and_gradient(model: nn.Module, tap: LayerTap, x: Tensor, targets: Tensor,
                             backward: bool = True) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Layer activation and d(target logit)/d(activation), both float32 `(B, K, h, w)`
    whatever the layer's layout, then the logits `(B, classes)` float32 and the classes
    explained `(B,)` (`targets`, with -1 replaced by the row's predicted class).
    `backward` False: the forward alone, under no_grad, and the gradient is None."""
    # enable_grad: the caller may have disabled it. The graph spans only the layer to the
    # logits: the tap's leaf is the one tensor requiring grad.
    with torch.set_grad_enabled(backward):
        with tap.capture(require_grad=backward) as cap:
            logits = model(x)                                            # (B, classes)
        act = cap.activation
        if act is None:
            raise InvalidArgument.field("layer", f"layer {tap.name!r} is not run by the model's forward")
        if logits.dim() != 2:
            raise InvalidArgument.field("target", f"model output is {tuple(logits.shape)}, not (N, classes)")
        given = targets >= 0
        check_targets(targets[given], logits.shape[1])
        # Ranked on the probabilities the response reports, by the rule every method uses.
        targets = torch.where(given, targets, predicted_classes(class_probabilities(logits.detach())))
        grad = None
        if backward:
            score = logits.gather(1, targets[:, None]).sum()  # images are independent: one backward
            (grad,) = torch.autograd.grad(score, act, allow_unused=True)
            if grad is None:
                raise InvalidArgument.field("layer", f"layer {tap.name!r} does not reach the model's output")
    size = tuple(x.shape[-2:])
    act = tap.to_nchw(act.detach(), size).float()                        # (B, K, h, w)
    grad = None if grad is None else tap.to_nchw(grad, size).float()
    return act, grad, logits.detach().float(), targets


def _split_back(reqs: list[CamRequest], results: list[CamResult],
                native: dict[str, Tensor], size: tuple[int, int], outputs: dict[str, Tensor]) -> None:
    start = 0
    for req, res in zip(reqs, results):
        stop = start + req.inputs.shape[0]
        res.logits, res.targets = outputs["logits"][start:stop], outputs["targets"][start:stop]
        for v in req.variants:
            nat = native[v][start:stop]                                  # (N, h, w)
            res.native[v] = nat
            res.maps[v] = upsample_map(nat, size)
        start = stop


def upsample_map(native: Tensor, size: tuple[int, int]) -> Tensor:
    """`(N, h, w)` -> `(N, H, W)` bilinear with half-pixel centres (align_corners=False)."""
    return F.interpolate(native[:, None], size=size, mode="bilinear",
                         align_corners=False)[:, 0]                      # (N, H, W)
