"""Stages shared by the online pipeline (workers/pipeline.py) and offline jobs (workers/offline.py).

What a worker holds per model (`WorkerContext`, created once per model by
`ContextCache`), the targets a request explains, the finiteness check, and how
an item's answer is assembled: one definition each, so both paths answer and
fail the same way.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from workers.batching import FoldBudget
from workers.config import Limits
from workers.errors import InvalidArgument
from workers.kernels.gradients import GradientLimits
from workers.kernels.hooks import LayerTaps
from workers.kernels.ranking import predicted_classes, top_classes
from workers.models import LoadedModel, ModelRegistry, describe
from workers.spec import AttributionMap, ItemExplanation, ModelDescription, TargetSpec

TOP_PREDICTIONS = 5


def kernel_limits(limits: Limits, max_rows: int | None = None) -> GradientLimits:
    """The kernels' caps from the server's limits: rows (items x targets), samples, steps.

    `max_rows` replaces `limits.max_items` where work arrives in chunks of its own size (offline jobs).
    """
    return GradientLimits(max_samples=limits.max_samples, max_steps=limits.max_steps,
                          max_items=max_rows or limits.max_items)


@dataclass
class WorkerContext:
    """What a replica holds for one model: the model, its taps and its budget."""

    model: LoadedModel
    taps: LayerTaps
    budget: FoldBudget = field(default_factory=FoldBudget)
    limits: GradientLimits = field(default_factory=GradientLimits)
    dropped: int = 0  # requests dropped after the batch started (deadline passed, caller gone)
    rows_skipped: int = 0  # folded rows of such requests never computed (left out of later chunks)
    fold_checks: int = 0   # times a running fold asked whether its requests were still wanted (between chunks)

    @classmethod
    def create(cls, model: LoadedModel, budget: FoldBudget | None = None,
               limits: Limits | None = None, max_rows: int | None = None) -> "WorkerContext":
        taps = LayerTaps(model.module, model.cam_layers, model_name=model.name, layouts=model.cam_layouts)
        return cls(model, taps, budget or FoldBudget(), kernel_limits(limits or Limits(), max_rows))


class ContextCache:
    """One WorkerContext per model of a registry, created on first use; safe from any thread."""

    def __init__(self, registry: ModelRegistry, budget: FoldBudget | None = None, limits: Limits | None = None,
                 max_rows: int | None = None):
        self.registry, self.budget = registry, budget or FoldBudget()
        self.limits, self.max_rows = limits or Limits(), max_rows
        self._contexts: dict[str, WorkerContext] = {}
        self._lock = threading.Lock()

    def get(self, name: str = "") -> WorkerContext:
        with self._lock:  # two first calls for a model must not load it twice
            model = self.registry.get(name)
            if model.name not in self._contexts:
                self._contexts[model.name] = WorkerContext.create(model, self.budget, self.limits, self.max_rows)
            return self._contexts[model.name]

    def describe(self) -> list[ModelDescription]:
        return [describe(self.get(name).model, name == self.registry.default) for name in self.registry.names()]

    def close(self) -> None:
        with self._lock:
            for ctx in self._contexts.values():
                ctx.taps.close()
            self._contexts.clear()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device through pinned memory, so the copy overlaps with queued work."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def resolve_targets(target: TargetSpec, probs: torch.Tensor | None, num_classes: int, n: int,
                    device: torch.device) -> tuple[torch.Tensor, int]:
    """The class explained per row `# (N*k,)` (best first per item for top-k) and k, checked against the model.

    `probs` `# (N, classes)` may be None for given indices (nothing was predicted). Predicted classes are
    ranked by `ranking.top_classes` (ties to the lowest index), as the CAM pass and `build_items` rank them.
    """
    if target.kind == "top_k":
        k = min(target.k, num_classes)
        return top_classes(probs, k)[1].reshape(-1), k
    if target.kind == "indices":
        if len(target.indices) not in (1, n):
            raise InvalidArgument.field("target.class_indices", f"give one index or one per item ({n})")
        idx = torch.tensor(target.indices, dtype=torch.long, device=device)
        targets = idx.expand(n) if idx.numel() == 1 else idx
        if bool(((targets < 0) | (targets >= num_classes)).any()):
            raise InvalidArgument.field("target", f"class indices must be in [0, {num_classes})")
        return targets, 1
    return predicted_classes(probs), 1


def check_finite(probs: torch.Tensor, maps: dict[str, torch.Tensor], rows_per_item: int) -> None:
    """Refuses items whose model output or maps are NaN/Inf: finite inputs the model cannot take.

    probs: `# (N, classes)`; maps: method -> `# (N*k, ...)`, k = rows_per_item.
    """
    bad_out = (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()
    if bad_out:
        raise InvalidArgument.field("inputs", f"the model's output is NaN or Inf for items {bad_out[:8]}: the values "
                                              "are finite but too large for the model in float32; MODEL-space "
                                              "inputs must be normalized as ModelInfo.input_spec says (typically "
                                              "a few units), or send pixels with space PIXELS")
    bad_maps: set[int] = set()
    for values in maps.values():
        rows = (~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)).nonzero().flatten()
        bad_maps.update((rows // rows_per_item).tolist())
    if bad_maps:
        raise InvalidArgument.field("inputs", f"the attribution maps of items {sorted(bad_maps)[:8]} overflow float32 "
                                              "(NaN or Inf gradients): the inputs drive the model far outside its "
                                              "normal range; MODEL-space inputs must be normalized as "
                                              "ModelInfo.input_spec says")


def build_items(probs: torch.Tensor, targets: torch.Tensor, k: int, maps: dict[str, torch.Tensor],
                native: dict[str, torch.Tensor] | None = None,
                completeness: torch.Tensor | None = None,
                completeness_absolute: torch.Tensor | None = None) -> list[ItemExplanation]:
    """Per item: its top predictions and, per explained row (k per item) and per method, its map.

    probs `# (N, classes)`, targets `# (N*k,)`, maps method -> `# (N*k, ...)`, completeness (relative)
    and completeness_absolute `# (N*k,)` (IG only).
    """
    n, native = probs.shape[0], native or {}
    values, indices = top_classes(probs, min(TOP_PREDICTIONS, probs.shape[1]))
    best_classes, best_scores = indices.cpu().tolist(), values.cpu().tolist()
    rows = torch.arange(n, device=probs.device).repeat_interleave(k)
    classes, scores = targets.cpu().tolist(), probs[rows, targets].cpu().tolist()
    errors = None if completeness is None else completeness.tolist()
    gaps = None if completeness_absolute is None else completeness_absolute.tolist()
    return [ItemExplanation(best_classes[i], best_scores[i], [
        AttributionMap(method=method, target=classes[r], target_score=scores[r], map=values[r],
                       native=native[method][r] if method in native else None,
                       completeness_error=None if errors is None else errors[r],
                       completeness_error_absolute=None if gaps is None else gaps[r])
        for r in range(i * k, (i + 1) * k) for method, values in maps.items()]) for i in range(n)]
