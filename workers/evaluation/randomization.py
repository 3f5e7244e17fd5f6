"""Model-randomization sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", section 3).

Definition. An explanation that explains the MODEL must change when the model's learned weights
are destroyed. The check re-initializes layers and compares the maps of the trained model with
the maps of the randomized one on the same inputs and targets:
    cascading:   the top layer (nearest the output) first, then each next layer down in turn,
                 keeping the layers above randomized; one randomized model per step;
    independent: one layer at a time, every other layer trained.
Similarity per item, between |map| of the trained and of the randomized model (the paper's
absolute-value comparison; `absolute=False` compares signed maps):
    Spearman rank correlation (ties averaged; a constant map correlates 0) and
    SSIM (maps min-max normalized, Gaussian 11 x 11 window; see workers/evaluation/similarity.py).

Data randomization (Adebayo et al. 2018, section 4): the same comparison between the trained model
and a model of the same architecture the CALLER trained on shuffled labels (`data_randomization_check`);
one step, judged like the cascade's last.

Verdict. A method FAILS when its maps survive randomization: the mean Spearman correlation of
    cascading:   the fully randomized model (the last step, every listed layer re-initialized),
    independent: the layer whose randomization changes the maps most (the lowest mean),
stays above `threshold` (default SPEARMAN_THRESHOLD = 0.5). Every step is also flagged on its own
(`Step.flagged`) so a report can show where a method stops depending on the weights. The threshold
is a convention, not a statistic: in Adebayo et al.'s figures the methods that depend on the model
fall to |rho| ~ 0.0-0.3 once the cascade reaches the lower layers, while guided backpropagation and
edge detectors stay near 0.6-1.0. Passing does NOT prove a map faithful: it proves only that the
map depends on the weights at all.

Cost. The randomized models are built once per check, not per method or item: one deep copy of
the model, re-initialized layer by layer in place (cascading), or with each layer restored after
its step (independent); every method is run on each randomized model before the next is built.
Hooks registered on the trained model (e.g. the service's LayerTaps) are not carried into the
copy: an `Attribute` callable sets up what it needs on the model it is given.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from workers.errors import InvalidArgument
from workers.evaluation.aggregate import MetricResult, metric
from workers.evaluation.similarity import spearman, ssim

MODES = ("cascading", "independent")
SPEARMAN_THRESHOLD = 0.5

# (model, inputs (N, C, H, W), targets (N,)) -> maps (N, H, W)
Attribute = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class Step:
    """One randomized model: `layers` re-initialized; per-item similarities to the trained maps."""

    layers: tuple[str, ...]
    spearman: MetricResult
    ssim: MetricResult
    flagged: bool  # mean Spearman above the threshold: the maps did not change enough


@dataclass
class RandomizationResult:
    """One method's check: its steps in order, the verdict and the threshold it was judged by."""

    method: str
    mode: str
    steps: list[Step]
    passed: bool
    threshold: float
    trained_maps: Tensor  # (N, H, W) on the host
    randomized_maps: list[Tensor]  # (N, H, W) per step, on the host (the report's before/after figure)

    @property
    def curve(self) -> np.ndarray:
        """Mean Spearman correlation per step `# (L,)`, for plotting against the layers."""
        return np.array([step.spearman.aggregate.mean for step in self.steps])


def parametrized_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, in registration order (input to output
    for the usual nets): the layers a check re-initializes, bottom first."""
    return [name for name, module in model.named_modules()
            if name and any(True for _ in module.parameters(recurse=False))]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Fresh weights for `module`'s own parameters, a function of `seed` only.

    `reset_parameters()` where the module has one (PyTorch's default initializer for the layer
    kind, as Adebayo et al. re-use the layer's initializer), run on a forked, seeded global RNG;
    otherwise each parameter is redrawn from a normal with the trained parameter's std.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        for param in module.parameters(recurse=False):
            scale = float(param.std()) if param.numel() > 1 else 1.0
            param.copy_(torch.randn(param.shape, dtype=param.dtype) * scale)


def _strip_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(module, name, None)
            if hooks is not None:
                hooks.clear()


def randomization_check(model: nn.Module, inputs: Tensor, targets: Tensor, methods: Mapping[str, Attribute], *,
                        mode: str = "cascading", layers: Sequence[str] | None = None,
                        threshold: float = SPEARMAN_THRESHOLD, absolute: bool = True,
                        seed: int = 0) -> dict[str, RandomizationResult]:
    """Run the check for every method in `methods` on the same randomized models.

    inputs `# (N, C, H, W)` on the model's device; targets `# (N,)`, kept fixed for the randomized
    models (the trained model's classes, as in the paper). layers: module names in bottom-to-top
    order (default `parametrized_layers(model)`); the cascade runs them top first. The model
    itself is never modified.
    """
    if mode not in MODES:
        raise InvalidArgument.field("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if not methods:
        raise InvalidArgument.field("methods", "name at least one attribution method")
    names = list(layers) if layers is not None else parametrized_layers(model)
    known = dict(model.named_modules())
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise InvalidArgument.field("layers", f"unknown layers {unknown}" if unknown else "the model has no parameters")
    prepared = {m: _prepare(f(model, inputs, targets), absolute) for m, f in methods.items()}
    copy_ = copy.deepcopy(model)
    _strip_hooks(copy_)
    modules = dict(copy_.named_modules())
    per_method: dict[str, list[tuple[tuple[str, ...], Tensor]]] = {m: [] for m in methods}
    top_down = list(reversed(names))
    for index, layer in enumerate(top_down):
        module = modules[layer]
        saved = None if mode == "cascading" else copy.deepcopy(module.state_dict())
        reinitialize(module, seed + index)
        randomized = tuple(top_down[:index + 1]) if mode == "cascading" else (layer,)
        for name, attribute in methods.items():
            per_method[name].append((randomized, _prepare(attribute(copy_, inputs, targets), absolute)))
        if saved is not None:
            module.load_state_dict(saved)
    return {name: _verdict(name, mode, prepared[name], per_method[name], threshold, seed) for name in methods}


def data_randomization_check(model: nn.Module, shuffled: nn.Module, inputs: Tensor, targets: Tensor,
                             methods: Mapping[str, Attribute], *, threshold: float = SPEARMAN_THRESHOLD,
                             absolute: bool = True, seed: int = 0) -> dict[str, RandomizationResult]:
    """The data-randomization test: maps of `model` against maps of `shuffled` (trained by the caller on
    permuted labels), same inputs and targets; fails above `threshold` like the cascade's last step."""
    if not methods:
        raise InvalidArgument.field("methods", "name at least one attribution method")
    results = {}
    for name, attribute in methods.items():
        trained = _prepare(attribute(model, inputs, targets), absolute)
        randomized = [(("<labels shuffled>",), _prepare(attribute(shuffled, inputs, targets), absolute))]
        results[name] = _verdict(name, "data", trained, randomized, threshold, seed)
    return results


def _prepare(maps: Tensor, absolute: bool) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        raise InvalidArgument.field("maps", "an attribution callable must return maps shaped (N, H, W)")
    maps = maps.detach().float().cpu()
    return maps.abs() if absolute else maps


def _verdict(method: str, mode: str, trained: Tensor, randomized: list[tuple[tuple[str, ...], Tensor]],
             threshold: float, seed: int) -> RandomizationResult:
    steps = []
    for layers, maps in randomized:
        rho = metric("randomization_spearman", spearman(trained, maps), seed=seed)
        steps.append(Step(layers, rho, metric("randomization_ssim", ssim(trained, maps), seed=seed),
                          flagged=bool(rho.aggregate.mean > threshold)))
    means = [step.spearman.aggregate.mean for step in steps]
    decisive = min(means) if mode == "independent" else means[-1]
    return RandomizationResult(method, mode, steps, passed=bool(decisive <= threshold), threshold=threshold,
                               trained_maps=trained, randomized_maps=[maps for _, maps in randomized])
