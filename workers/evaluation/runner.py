"""The evaluated methods run exactly as the service runs them, on the trained model or any copy of it.

`MethodRunner.maps(module, inputs, targets)` answers every method's maps `# (N, H, W)` for one model,
inputs and targets: the online methods of each chunk of items go through the online pipeline as one
batch (`workers.pipeline.explain_batch`: every gradient method in one folded `explain_gradients` call,
every CAM method in one `explain_cam` pass per layer), the offline-only ones through the offline path
(`workers.offline.run_offline`). The last answer is kept, so the checks of workers/evaluation/ that ask
for one method at a time (`attribute(label)`, an `Attribute` callable) get all of them from one
folded call. A module other than the trained one (a randomized copy, the shuffled-labels model) gets
a context of its own: its own layer taps and the trained model's chunk size (same architecture).

`RowCounter` counts the forward rows every model of the evaluation ran on the evaluating thread, and
of those the rows that recorded a graph for a backward pass: the evaluation's cost in passes.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.errors import AttributionError, Cancelled
from workers.evaluation.jobspec import EvalMethod
from workers.kernels.gradients import GradientLimits
from workers.kernels.hooks import LayerTaps
from workers.offline import run_offline
from workers.pipeline import explain_batch
from workers.spec import (OFFLINE_ONLY_METHODS, ExplainSpec, OutputSpec, TargetSpec, params_for_items,
                          request_cost)
from workers.stages import WorkerContext

# An evaluation's sizes were checked by the front door (jobs.evaluation.max_items); the kernels' own
# per-request caps would refuse its folded chunks.
_NO_LIMITS = GradientLimits(max_samples=2**31, max_steps=2**31, max_items=2**31)
_OUTPUT = OutputSpec(reduction="abs_max", normalization="none")


class RowCounter:
    """Forward rows run by the hooked models on one thread; `backward` those run with autograd recording."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self._owner = threading.get_ident()
        self._handles: list = []

    def watch(self, module: nn.Module) -> None:
        def count(_module, args) -> None:
            if threading.get_ident() != self._owner or not args or not isinstance(args[0], Tensor):
                return
            rows = int(args[0].shape[0]) if args[0].dim() > 0 else 1
            self.forward += rows
            if torch.is_grad_enabled():
                self.backward += rows

        self._handles.append(module.register_forward_pre_hook(count))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class MethodRunner:
    """Every evaluated method on any model of the trained one's architecture; see the module docstring.

    ctx: the trained model's worker context. cancelled: read between chunks (raises `Cancelled`).
    seconds: per label, the wall time its maps took (a folded call's time is shared by row cost).
    """

    def __init__(self, ctx: WorkerContext, methods: Sequence[EvalMethod], counter: RowCounter, *,
                 items_per_chunk: int = 8, cancelled: Callable[[], bool] | None = None):
        self.ctx, self.methods, self.counter = ctx, list(methods), counter
        self.items_per_chunk = max(1, items_per_chunk)
        self.cancelled = cancelled or (lambda: False)
        self.seconds: dict[str, float] = {m.label: 0.0 for m in self.methods}
        self.completeness: dict[str, Tensor] = {}  # label -> (N,) of the last trained-model call
        trained = dataclasses.replace(ctx, limits=_NO_LIMITS)
        self._contexts: dict[int, WorkerContext] = {id(ctx.model.module): trained}
        self._owned: list[WorkerContext] = []
        self._last: tuple[tuple, dict[str, Tensor]] | None = None
        counter.watch(ctx.model.module)

    # ------------------------------------------------------------ models --

    def context(self, module: nn.Module) -> WorkerContext:
        """The context `module` runs in: the trained one's, or a new one with taps on `module`."""
        found = self._contexts.get(id(module))
        if found is not None:
            return found
        base = self.ctx
        model = dataclasses.replace(base.model, module=module, _modules=dict(module.named_modules()))
        taps = LayerTaps(module, model.cam_layers, model_name=model.name, layouts=model.cam_layouts)
        ctx = WorkerContext(model, taps, self._copy_budget(), _NO_LIMITS)
        self._contexts[id(module)] = ctx
        self._owned.append(ctx)
        self.counter.watch(module)
        return ctx

    def _copy_budget(self) -> FoldBudget:
        """The trained model's chunk size, fixed: a copy of the same net costs the same per row, and
        measuring each copy's curve again would cost seconds."""
        model, budget = self.ctx.model, self.ctx.budget
        row = (model.spec.channels, model.spec.height, model.spec.width)
        rows = rows_per_chunk(model.module, row, budget, device=model.device, backward=True)  # measured if asked
        return FoldBudget(max_rows=max(1, rows))

    def close(self) -> None:
        for ctx in self._owned:
            ctx.taps.close()
        self._owned.clear()
        self._last = None

    # -------------------------------------------------------------- maps --

    def maps(self, module: nn.Module, inputs: Tensor, targets: Tensor,
             items: Tensor | None = None) -> dict[str, Tensor]:
        """Every method's maps `# (N, H, W)` float32 on the host for `inputs` `# (N, C, H, W)` and
        `targets` `# (N,)` on `module`; the same objects asked again get the same answer. `items` `# (N,)`:
        each row's item (rows that repeat items, e.g. one per class), which picks per-item baselines."""
        # The weights' version counters: a copy re-initialized in place between two calls is another model.
        key = (module, inputs, targets, tuple(p._version for p in module.parameters()))
        if self._last is not None and all(a is b for a, b in zip(self._last[0][:3], key[:3])) \
                and self._last[0][3] == key[3]:
            return self._last[1]
        ctx = self.context(module)
        host_inputs = inputs.detach().to("cpu", torch.float32)
        classes = tuple(int(t) for t in targets.detach().cpu().tolist())
        out: dict[str, list[Tensor]] = {m.label: [] for m in self.methods}
        errors: dict[str, list[Tensor]] = {m.label: [] for m in self.methods}
        online = [m for m in self.methods if m.method not in OFFLINE_ONLY_METHODS]
        offline = [m for m in self.methods if m.method in OFFLINE_ONLY_METHODS]
        for chunk in iter_chunks(host_inputs.shape[0], self.items_per_chunk):
            self._check()
            x, t = host_inputs[chunk], classes[chunk]
            if online:
                started = time.perf_counter()
                index = chunk if items is None else items[chunk]
                specs = [self._spec(m, x, t, index) for m in online]
                outcomes = explain_batch(ctx, specs)
                self._share(online, specs, time.perf_counter() - started)
                for m, outcome in zip(online, outcomes):
                    if isinstance(outcome, AttributionError):
                        raise outcome
                    _collect(outcome.items, m, out, errors)
            for m in offline:
                started = time.perf_counter()
                result = run_offline(ctx, self._spec(m, x, t, chunk if items is None else items[chunk]),
                                     items_per_chunk=len(t),
                                     cancelled=self.cancelled)
                self.seconds[m.label] += time.perf_counter() - started
                _collect(result.items, m, out, errors)
        maps = {label: torch.cat(parts) for label, parts in out.items()}
        if ctx is self._contexts[id(self.ctx.model.module)]:
            self.completeness = {label: torch.cat(parts) for label, parts in errors.items() if parts}
        self._last = (key, maps)
        return maps

    def attribute(self, label: str) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
        """The `Attribute` callable of one method, answered from the folded call of all of them."""
        def attribute(module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
            return self.maps(module, inputs, targets)[label]

        attribute.__name__ = label
        return attribute

    def attributes(self) -> dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
        return {m.label: self.attribute(m.label) for m in self.methods}

    def _spec(self, method: EvalMethod, x: Tensor, targets: tuple[int, ...], index) -> ExplainSpec:
        params = params_for_items(method.method, method.params, index)
        return ExplainSpec(model=self.ctx.model.name, method=method.method, inputs=x, request_id=method.label,
                           target=TargetSpec(kind="indices", indices=targets), params=params, output=_OUTPUT,
                           seed=method.seed)

    def _share(self, methods: Sequence[EvalMethod], specs: Sequence[ExplainSpec], seconds: float) -> None:
        """A folded call's time, shared by the methods in proportion to their rows."""
        costs = [max(1, request_cost(s.method, s.items, 1, s.params.samples, s.params.steps)) for s in specs]
        total = sum(costs)
        for m, cost in zip(methods, costs):
            self.seconds[m.label] += seconds * cost / total

    def _check(self) -> None:
        if self.cancelled():
            raise Cancelled("the evaluation was cancelled")


def _collect(items, method: EvalMethod, out: Mapping[str, list], errors: Mapping[str, list]) -> None:
    """The maps of `method` (its own, not a CAM variant's) from a result's items, and IG's completeness."""
    maps, gaps = [], []
    for item in items:
        own = next(a for a in item.attributions if a.method == method.method)
        maps.append(own.map.float())  # (H, W): reduced over channels, or a single-plane map
        if own.completeness_error is not None:
            gaps.append(float(own.completeness_error))
    out[method.label].append(torch.stack(maps))
    if gaps and len(gaps) == len(items):
        errors[method.label].append(torch.tensor(gaps, dtype=torch.float64))
