"""Stability of maps under small input changes the model should not care about.

Definition (the "robustness" property of Alvarez-Melis & Jaakkola 2018, "On the Robustness of
Interpretability Methods", measured by rank correlation as in Adebayo et al. 2018): for each
augmentation a the caller names, the Spearman rank correlation between the map of x and the map
of a(x), both for the same target, with the augmented map moved back into x's frame (a shift is
undone and only the overlap compared). 1 = the same ranking; low = the map changes under a change
the caller considers irrelevant. Augmentations, in the inputs' own (model) space:
    noise(fraction):  Gaussian noise, std = fraction * (max - min) of each item (seeded);
    shift(pixels):    translation by (dy, dx) px, edges replicated;
    brightness(delta): delta added to every value.
A low score is a warning, not a verdict: if the model's prediction itself moves, an honest map
moves too (`StabilityResult.prediction_kept` says how often the top-1 class survived).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.errors import InvalidArgument
from workers.evaluation.aggregate import MetricResult, metric
from workers.evaluation.randomization import Attribute
from workers.evaluation.similarity import spearman


@dataclass(frozen=True)
class Augmentation:
    """A named input change: kind in noise / shift / brightness, and its size.

    noise: `amount` = fraction of each item's range; shift: `offset` = (dy, dx) px; brightness: `amount` added.
    """

    kind: str
    amount: float = 0.0
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTATIONS:
            raise InvalidArgument.field("augmentation", f"must be one of {', '.join(AUGMENTATIONS)}, got {self.kind!r}")


def noise(fraction: float = 0.05) -> Augmentation:
    return Augmentation("noise", amount=fraction)


def shift(dy: int = 2, dx: int = 2) -> Augmentation:
    return Augmentation("shift", offset=(dy, dx))


def brightness(delta: float = 0.1) -> Augmentation:
    return Augmentation("brightness", amount=delta)


AUGMENTATIONS: dict[str, Callable[[], Augmentation]] = {"noise": noise, "shift": shift, "brightness": brightness}


@dataclass
class StabilityResult:
    """One augmentation's stability over N items: rank correlation per item, and how often the top-1 class held."""

    augmentation: Augmentation
    spearman: MetricResult
    prediction_kept: MetricResult


def augment(inputs: Tensor, aug: Augmentation, seed: int = 0) -> Tensor:
    """`inputs` `# (N, C, H, W)` changed by `aug`."""
    if aug.kind == "noise":
        gen = torch.Generator().manual_seed(int(seed))
        span = (inputs.flatten(1).amax(dim=1) - inputs.flatten(1).amin(dim=1)).view(-1, 1, 1, 1)
        return inputs + aug.amount * span * torch.randn(inputs.shape, generator=gen).to(inputs)
    if aug.kind == "brightness":
        return inputs + aug.amount
    return _shift(inputs, *aug.offset)


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Move the content of `x` `# (N, C, H, W)` by (dy, dx) px, replicating the edge it leaves."""
    height, width = x.shape[-2:]
    if abs(dy) >= height or abs(dx) >= width:
        raise InvalidArgument.field("shift", f"offset {(dy, dx)} leaves nothing of a {height}x{width} image")
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + height, left:left + width]


def overlap(maps: Tensor, moved: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """The region both maps `# (N, H, W)` see, in each one's frame: moved[y + dy, x + dx] ~ maps[y, x]."""
    height, width = maps.shape[-2:]
    ys, ye = max(0, -dy), height - max(0, dy)
    xs, xe = max(0, -dx), width - max(0, dx)
    return maps[:, ys:ye, xs:xe], moved[:, ys + dy:ye + dy, xs + dx:xe + dx]


def stability(model: nn.Module, inputs: Tensor, targets: Tensor, attribute: Attribute,
              augmentations: Mapping[str, Augmentation] | list[str], *, seed: int = 0,
              maps: Tensor | None = None) -> dict[str, StabilityResult]:
    """Stability of `attribute`'s maps under each augmentation (by name: built-in defaults, or name -> Augmentation).

    maps: the maps of the unchanged inputs `# (N, H, W)` when the caller already has them.
    """
    if isinstance(augmentations, (list, tuple)):
        unknown = [name for name in augmentations if name not in AUGMENTATIONS]
        if unknown:
            raise InvalidArgument.field("augmentations", f"unknown {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        augmentations = {name: AUGMENTATIONS[name]() for name in augmentations}
    base = (maps if maps is not None else attribute(model, inputs, targets)).detach().float().cpu()
    with torch.inference_mode():
        predicted = model(inputs).argmax(dim=1)
    out = {}
    for index, (name, aug) in enumerate(augmentations.items()):
        changed = augment(inputs, aug, seed + index)
        moved = attribute(model, changed, targets).detach().float().cpu()
        a, b = overlap(base, moved, *aug.offset) if aug.kind == "shift" else (base, moved)
        with torch.inference_mode():
            kept = (model(changed).argmax(dim=1) == predicted).float()
        out[name] = StabilityResult(aug, metric(f"stability_{name}", spearman(a, b), seed=seed),
                                    metric(f"prediction_kept_{name}", kept, seed=seed))
    return out
