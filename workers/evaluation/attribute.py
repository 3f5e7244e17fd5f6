"""`Attribute` callables over the service's kernels: (model, inputs, targets) -> maps `# (N, H, W)`.

The checks that re-run a method (randomization, stability, class discrimination) take such a
callable, so they work with any model the caller hands them, including the randomized copies.
These adapters call the kernels the way workers/pipeline.py does, with the request limits lifted
(an evaluation is an offline job: its sizes are the caller's), and reduce the channels with the
service's default `abs_max`.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from workers.batching import FoldBudget
from workers.kernels.cam import CamRequest, explain_cam
from workers.kernels.gradients import GradientLimits, GradientRequest, explain_gradients
from workers.kernels.hooks import LayerTaps
from workers.postprocess import reduce_channels

_NO_LIMITS = GradientLimits(max_samples=2**31, max_steps=2**31, max_items=2**31)


def gradient_attribute(method: str, *, reduction: str = "abs_max", budget: FoldBudget = FoldBudget(),
                       **params) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """A gradient-family method (vanilla, smoothgrad, integrated_gradients, ...) with `params` of
    `GradientRequest` (samples, steps, rule, baselines, seed, ...), reduced over channels."""
    def attribute(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        request = GradientRequest(inputs=inputs, targets=targets.long(), method=method, **params)
        result = explain_gradients(model, [request], budget, _NO_LIMITS)[0]
        return reduce_channels(result.attributions, reduction)  # (N, H, W)

    attribute.__name__ = method
    return attribute


def cam_attribute(layer: str, variant: str = "grad_cam", *,
                  budget: FoldBudget = FoldBudget()) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """A CAM variant at `layer`, upsampled to the input size. Taps are opened on the model it is
    given for the call and closed after it, so it works on randomized copies too."""
    def attribute(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        with LayerTaps(model, [layer]) as taps:
            result = explain_cam(model, taps, [CamRequest(inputs, targets.long(), layer, (variant,))], budget)[0]
        return result.maps[variant]  # (N, H, W)

    attribute.__name__ = f"{variant}@{layer}"
    return attribute

