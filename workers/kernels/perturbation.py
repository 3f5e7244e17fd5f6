"""Perturbation attributions: Score-CAM, Ablation-CAM and occlusion, as batched masked forwards.

Both spend their time in inference forwards over many perturbed copies of the
inputs, so both build those copies chunk by chunk (the chunk sized by the memory
budget with `backward=False`), run them under `torch.inference_mode`, report
progress as a fraction after every chunk and check `cancelled()` between chunks.
Everything stays on the inputs' device.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.errors import Cancelled, InvalidArgument
from workers.kernels.cam import check_batch, check_targets, upsample_map
from workers.kernels.hooks import LayerTap, LayerTaps

Progress = Callable[[float], None] | None
IsCancelled = Callable[[], bool] | None

# Mask min-max guard, the value pytorch-grad-cam's ScoreCAM uses.
_MASK_EPS = 1e-8


class _Steps:
    """Progress over `total` rows and the cancellation check between chunks."""

    def __init__(self, what: str, total: int, progress: Progress, cancelled: IsCancelled):
        self.what, self.total, self.done = what, total, 0
        self._progress, self._cancelled = progress, cancelled

    def check(self) -> None:
        if self._cancelled is not None and self._cancelled():
            raise Cancelled(f"{self.what} cancelled after {self.done} of {self.total} forwards")

    def advance(self, rows: int) -> None:
        self.done += rows
        if self._progress is not None:
            # Exactly 1.0 at the end, never above it on the way.
            self._progress(1.0 if self.done >= self.total else self.done / self.total)


def _target_scores(model: nn.Module, x: Tensor, targets: Tensor, *,
                   check: Tensor | None = None) -> Tensor:
    """Target logits `(B,)` of one inference chunk, float32. `check`: all of the call's
    targets, validated against the output width before any gather (once per call, on
    the first chunk: it costs a device sync)."""
    logits = model(x)                                                    # (B, classes)
    if check is not None:
        check_targets(check, logits.shape[1])
    return logits.gather(1, targets[:, None])[:, 0].float()


def _base_scores(model: nn.Module, inputs: Tensor, targets: Tensor, rows: int) -> Tensor:
    return torch.cat([_target_scores(model, inputs[c], targets[c],
                                     check=targets if c.start == 0 else None)
                      for c in iter_chunks(inputs.shape[0], rows)])     # (N,)


def _int_param(value, field: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgument.field(field, f"must be an integer in {bound}, got {value!r}")
    return value


# ---------------------------------------------------------------- Score-CAM

def score_cam(model: nn.Module, taps: LayerTaps, inputs: Tensor, targets: Tensor, layer: str, *,
              top_k_channels: int = 0, budget: FoldBudget = FoldBudget(),
              progress: Progress = None, cancelled: IsCancelled = None) -> Tensor:
    """Score-CAM (Wang et al., 2020, arXiv:1910.01279) maps `(N, H, W)` float32, ReLU'd.

    Each channel of the layer's activation `(N, K, h, w)` is upsampled to the input
    size (bilinear, corners aligned as pytorch-grad-cam's `UpsamplingBilinear2d`) and
    min-max normalized into a mask; the masked inputs `x * mask` are scored in
    inference forwards and the channel weights are the softmax over channels of the
    target logits, as pytorch-grad-cam's ScoreCAM. The map is the ReLU of the weighted
    sum of activations, upsampled like the other CAMs. `top_k_channels > 0` keeps only
    the k channels of highest activation energy (sum of squares), per image: K*N
    forwards become k*N; the softmax then runs over the kept channels.
    """
    tap = taps[layer]
    check_batch(inputs, targets)
    _int_param(top_k_channels, "score_cam.top_k_channels", 0)
    rows = rows_per_chunk(model, tuple(inputs.shape[1:]), budget, device=inputs.device,
                          dtype=inputs.dtype, backward=False)
    with torch.inference_mode():
        act = _activations(model, tap, inputs, targets, rows)            # (N, K, h, w)
        act = _select_channels(act.float(), top_k_channels)              # (N, k, h, w)
        weights = _score_cam_weights(model, inputs, targets, act, rows,
                                     _Steps("score_cam", act.shape[0] * act.shape[1],
                                            progress, cancelled))        # (N, k)
    # Outside inference mode, so callers get ordinary tensors they may edit in place.
    native = F.relu((weights[:, :, None, None] * act).sum(dim=1))       # (N, h, w)
    return upsample_map(native, tuple(inputs.shape[-2:]))               # (N, H, W)


def _activations(model: nn.Module, tap: LayerTap, inputs: Tensor, targets: Tensor,
                 rows: int) -> Tensor:
    return _activations_and_scores(model, tap, inputs, targets, rows)[0]


def _activations_and_scores(model: nn.Module, tap: LayerTap, inputs: Tensor, targets: Tensor,
                            rows: int) -> tuple[Tensor, Tensor]:
    """The layer's activations `(N, K, h, w)` (channels first, whatever its layout) and the
    target logits `(N,)` float32 of the inputs, from the same forwards."""
    parts, scores = [], []
    for chunk in iter_chunks(inputs.shape[0], rows):
        with tap.capture() as cap:  # one capture per forward: it keeps the first output
            scores.append(_target_scores(model, inputs[chunk], targets[chunk],
                                         check=targets if chunk.start == 0 else None))
        if cap.activation is None:
            raise InvalidArgument.field("layer", f"layer {tap.name!r} is not run by the model's forward")
        parts.append(tap.to_nchw(cap.activation, tuple(inputs.shape[-2:])))  # (B, K, h, w)
    return torch.cat(parts), torch.cat(scores)                           # (N, K, h, w), (N,)


def top_channels(act: Tensor, k: int) -> Tensor:
    """Indices `(N, k)` of the k channels of highest activation energy (Σ A² over the layer's
    locations) of each image of `act` `(N, K, h, w)`, strongest first; every channel, in
    order, when k is 0 or >= K. Score-CAM and Ablation-CAM keep the same channels."""
    n, channels = act.shape[:2]
    if k == 0 or k >= channels:
        return torch.arange(channels, device=act.device).expand(n, channels)
    return act.pow(2).sum(dim=(2, 3)).topk(k, dim=1).indices             # (N, k)


def _select_channels(act: Tensor, k: int) -> Tensor:
    """The k channels of highest energy per image `(N, k, h, w)`; all when k is 0 or >= K."""
    if k == 0 or k >= act.shape[1]:
        return act
    idx = top_channels(act, k)                                           # (N, k)
    return act.gather(1, idx[:, :, None, None].expand(-1, -1, *act.shape[2:]))


def _score_cam_weights(model: nn.Module, inputs: Tensor, targets: Tensor, act: Tensor,
                       rows: int, steps: _Steps) -> Tensor:
    n, k = act.shape[:2]
    flat = act.reshape(n * k, 1, *act.shape[2:])                         # (N*k, 1, h, w)
    scores = torch.empty(n * k, device=inputs.device)
    for chunk in iter_chunks(n * k, rows):
        steps.check()
        image = torch.arange(chunk.start, chunk.stop, device=inputs.device) // k
        masks = F.interpolate(flat[chunk], size=tuple(inputs.shape[-2:]), mode="bilinear",
                              align_corners=True)                        # (B, 1, H, W)
        low = masks.amin(dim=(2, 3), keepdim=True)
        high = masks.amax(dim=(2, 3), keepdim=True)
        masks = (masks - low) / (high - low + _MASK_EPS)
        masked = inputs[image] * masks.to(inputs.dtype)                  # (B, C, H, W)
        scores[chunk] = _target_scores(model, masked, targets[image])
        steps.advance(chunk.stop - chunk.start)
    return torch.softmax(scores.view(n, k), dim=1)                       # (N, k)


# ---------------------------------------------------------------- Ablation-CAM

def ablation_cam(model: nn.Module, taps: LayerTaps, inputs: Tensor, targets: Tensor, layer: str, *,
                 top_k_channels: int = 0, budget: FoldBudget = FoldBudget(),
                 progress: Progress = None, cancelled: IsCancelled = None) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020) maps `(N, H, W)` float32, ReLU'd.

    The weight of channel k is the relative drop of the target logit y when channel k of
    the layer's output is set to zero: w_k = (y - y_k) / y (y = 0 divides by 1, the drop
    itself). The map is ReLU(Σ w_k A_k), upsampled like the other CAMs. Every (image,
    channel) ablation is one row: the rows of all images are folded into the batch
    dimension, many per inference chunk, the channel zeroed at the layer by the tap's
    edit (`LayerTap.capture(edit=...)`) along the layer's channel axis, whatever its
    layout. `top_k_channels > 0` ablates only the k channels of highest activation
    energy per image (`top_channels`, as Score-CAM keeps); the others weigh 0. Cost:
    one forward per item for y and the activations, then one per ablated channel.

    pytorch-grad-cam's AblationCAM zeroes too where the layer's smallest value is 0 (a
    post-ReLU layer), but on a layer with negative values it sets the channel to
    (its batch's minimum - 1e7) instead; here the channel is always zeroed, as the paper.
    """
    tap = taps[layer]
    check_batch(inputs, targets)
    _int_param(top_k_channels, "score_cam.top_k_channels", 0)
    rows = rows_per_chunk(model, tuple(inputs.shape[1:]), budget, device=inputs.device,
                          dtype=inputs.dtype, backward=False)
    with torch.inference_mode():
        act, base = _activations_and_scores(model, tap, inputs, targets, rows)  # (N, K, h, w), (N,)
        channels = top_channels(act, top_k_channels)                     # (N, k)
        ablated = _ablated_scores(model, tap, inputs, targets, channels, act.shape[1], rows,
                                  _Steps("ablation_cam", channels.numel(), progress, cancelled))  # (N, k)
    # Outside inference mode, so callers get ordinary tensors they may edit in place.
    act = act.float()
    scale = torch.where(base != 0, base, torch.ones_like(base))[:, None]  # (N, 1)
    weights = torch.zeros(act.shape[:2], device=act.device).scatter_(
        1, channels, (base[:, None] - ablated) / scale)                  # (N, K)
    native = F.relu((weights[:, :, None, None] * act).sum(dim=1))       # (N, h, w)
    return upsample_map(native, tuple(inputs.shape[-2:]))               # (N, H, W)


def _ablated_scores(model: nn.Module, tap: LayerTap, inputs: Tensor, targets: Tensor, channels: Tensor,
                    width: int, rows: int, steps: _Steps) -> Tensor:
    """Target logits `(N, k)` with channel `channels[i, j]` of image i zeroed at the layer.

    Row r of the fold is image r // k with its (r % k)-th kept channel ablated."""
    n, k = channels.shape
    flat = channels.reshape(-1)                                          # (N*k,)
    scores = torch.empty(n * k, device=inputs.device)
    for chunk in iter_chunks(n * k, rows):
        steps.check()
        image = torch.arange(chunk.start, chunk.stop, device=inputs.device) // k
        drop = torch.zeros(chunk.stop - chunk.start, width, dtype=torch.bool, device=inputs.device)
        drop[torch.arange(drop.shape[0], device=inputs.device), flat[chunk]] = True  # (B, K)

        def ablate(out: Tensor, drop: Tensor = drop) -> Tensor:
            if out.shape[tap.channel_axis] != width:
                raise InvalidArgument.field("layer", f"layer {tap.name!r} changed its channel count between "
                                                     f"forwards ({width}, then {out.shape[tap.channel_axis]})")
            shape = [drop.shape[0]] + [1] * (out.dim() - 1)
            shape[tap.channel_axis] = width
            return out.masked_fill(drop.view(shape), 0)

        with tap.capture(edit=ablate):
            scores[chunk] = _target_scores(model, inputs[image], targets[image])
        steps.advance(chunk.stop - chunk.start)
    return scores.view(n, k)


# ---------------------------------------------------------------- occlusion

def occlusion(model: nn.Module, inputs: Tensor, targets: Tensor, *, patch_size: int = 8,
              stride: int | None = None, baseline_value: float = 0.0,
              budget: FoldBudget = FoldBudget(), progress: Progress = None,
              cancelled: IsCancelled = None) -> Tensor:
    """Occlusion (Zeiler & Fergus, 2014, arXiv:1311.2901) maps `(N, H, W)` float32.

    A `patch_size` square (all channels) set to `baseline_value` slides from the
    top-left corner by `stride` (default `patch_size // 2`) until each axis is
    covered, the last patch cut off at the border; a pixel's value is the mean drop
    of the target logit over the patches covering it. This is Captum's `Occlusion`
    with `sliding_window_shapes=(C, p, p)`, `strides=(C, s, s)`, `baselines=value`;
    Captum returns `(N, C, H, W)` with C identical planes, this returns one plane.
    Unlike Captum (stride 1 by default) the default stride is half a patch.
    """
    check_batch(inputs, targets)
    height, width = inputs.shape[-2:]
    p = _int_param(patch_size, "occlusion.patch_size", 1, min(height, width))
    s = _int_param(max(1, p // 2) if stride is None else stride, "occlusion.stride", 1, p)
    if isinstance(baseline_value, bool) or not isinstance(baseline_value, (int, float)) \
            or not math.isfinite(baseline_value):
        raise InvalidArgument.field("occlusion.baseline_value", "must be a finite number")
    cover_y = _cover(_starts(height, p, s, inputs.device), p, height)   # (Py, H)
    cover_x = _cover(_starts(width, p, s, inputs.device), p, width)     # (Px, W)
    rows = rows_per_chunk(model, tuple(inputs.shape[1:]), budget, device=inputs.device,
                          dtype=inputs.dtype, backward=False)
    with torch.inference_mode():
        base = _base_scores(model, inputs, targets, rows)                # (N,)
        drops = _occlusion_drops(model, inputs, targets, base, (cover_y, cover_x),
                                 float(baseline_value), rows,
                                 _Steps("occlusion", inputs.shape[0] * cover_y.shape[0]
                                        * cover_x.shape[0], progress, cancelled))  # (N, Py, Px)
    # Outside inference mode, so callers get an ordinary tensor they may edit in place.
    # Patches are separable (rows x columns), so spreading each patch's drop over the
    # pixels it covers, and counting the patches over each pixel, are two small matmuls.
    cover_y, cover_x = cover_y.float(), cover_x.float()
    total = torch.einsum("ph,npq,qw->nhw", cover_y, drops, cover_x)     # (N, H, W)
    count = cover_y.sum(0)[:, None] * cover_x.sum(0)[None, :]           # (H, W), >= 1
    return total / count


def _starts(length: int, p: int, s: int, device: torch.device) -> Tensor:
    """Patch starts along one axis, Captum's rule: ceil((L - p) / s) + 1 positions."""
    return torch.arange(math.ceil((length - p) / s) + 1, device=device) * s


def _cover(starts: Tensor, p: int, length: int) -> Tensor:
    """`(P, L)` bool: True where the patch starting at `starts[i]` covers position j."""
    pos = torch.arange(length, device=starts.device)
    return (pos >= starts[:, None]) & (pos < starts[:, None] + p)


def _occlusion_drops(model: nn.Module, inputs: Tensor, targets: Tensor, base: Tensor,
                     covers: tuple[Tensor, Tensor], value: float, rows: int,
                     steps: _Steps) -> Tensor:
    """Drop of the target logit, base - occluded, for every patch `(N, Py, Px)`."""
    cover_y, cover_x = covers                                            # (Py, H), (Px, W)
    n, per_image = inputs.shape[0], cover_y.shape[0] * cover_x.shape[0]
    drops = torch.empty(n * per_image, device=inputs.device)
    for chunk in iter_chunks(n * per_image, rows):
        steps.check()
        r = torch.arange(chunk.start, chunk.stop, device=inputs.device)
        image, patch = r // per_image, r % per_image
        ys, xs = cover_y[patch // cover_x.shape[0]], cover_x[patch % cover_x.shape[0]]
        window = ys[:, :, None] & xs[:, None, :]                         # (B, H, W)
        # The gather is a fresh copy, so filling it in place is safe (and 5x cheaper
        # than a where with a float mask: this runs once per masked row).
        occluded = inputs[image].masked_fill_(window[:, None], value)    # (B, C, H, W)
        drops[chunk] = base[image] - _target_scores(model, occluded, targets[image])
        steps.advance(chunk.stop - chunk.start)
    return drops.view(n, cover_y.shape[0], cover_x.shape[0])
