"""Cached layer taps: one forward hook per (model, layer), idle unless a call captures.

pytorch-grad-cam registers hooks per explainer object and removes them when that
object dies, so the hook count follows garbage collection and two explainers on one
model see each other's activations. Here a `LayerTap` is registered once, when a
replica loads the model, and reused by every request. Its hook does nothing unless
the *calling context* has opened a capture: capture state lives in a
`contextvars.ContextVar` (one value per thread and per asyncio task), never on the
tap, so concurrent forwards on one model never see each other's activations.

There are no backward hooks. A capture opened with ``require_grad=True`` makes the
hook return ``out.detach().requires_grad_(True)`` in place of the layer output: the
rest of the forward depends on that leaf, so ``torch.autograd.grad(score, act)``
runs the backward from the logits to the layer and stops there (the inputs and the
parameters do not require grad), instead of running all the way to the input.
"""
from __future__ import annotations

import contextvars
import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

from workers.errors import InvalidArgument, LayerNotFound

# tap key -> the capture the current context opened on that tap. Immutable dicts are
# swapped in and out (set/reset), so a context never mutates a value another context
# may hold after `copy_context()`.
_ACTIVE: contextvars.ContextVar[Mapping[int, "Capture"]] = contextvars.ContextVar(
    "layer_tap_captures", default={})
_KEYS = itertools.count()


class Capture:
    """What one call saw at one layer: the first output of the layer in the forward.

    `activation` is `(B, K, h, w)` for a convolutional layer. With `require_grad`
    it is the leaf the rest of the forward was built on, so gradients can be taken
    with respect to it.
    """

    __slots__ = ("require_grad", "activation")

    def __init__(self, require_grad: bool):
        self.require_grad = require_grad
        self.activation: Tensor | None = None


class LayerTap:
    """One forward hook on one module, shared by every request on the replica."""

    def __init__(self, module: nn.Module, name: str = ""):
        self.name = name
        self._key = next(_KEYS)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output):
        cap = _ACTIVE.get().get(self._key)
        if cap is None or cap.activation is not None:
            # Idle (no capture in this context) or the module ran twice in one
            # forward: the first output is the layer's activation, later calls pass.
            return None
        if not isinstance(output, Tensor):
            raise InvalidArgument.field(
                "layer", f"layer {self.name!r} returns {type(output).__name__}, not a tensor")
        if cap.require_grad:
            # A fresh leaf replaces the output, so the backward stops here.
            output = output.detach().requires_grad_(True)
            cap.activation = output
            return output
        cap.activation = output.detach()
        return None

    @contextmanager
    def capture(self, *, require_grad: bool = False) -> Iterator[Capture]:
        """Capture this layer's output for forwards run inside the block, in this context only."""
        cap = Capture(require_grad)
        token = _ACTIVE.set({**_ACTIVE.get(), self._key: cap})
        try:
            yield cap
        finally:
            _ACTIVE.reset(token)

    def remove(self) -> None:
        self._handle.remove()


class LayerTaps(Mapping[str, LayerTap]):
    """The taps of one model: one `LayerTap` per CAM-able layer, by module name.

    Built once when a replica loads the model; `close()` removes every hook.
    """

    def __init__(self, model: nn.Module, layer_names: Iterable[str], model_name: str = "model"):
        self.model_name = model_name
        modules = dict(model.named_modules())
        names = list(dict.fromkeys(layer_names))
        missing = [n for n in names if n not in modules]
        if missing:
            known = [n for n in modules if n]
            raise LayerNotFound(model_name, missing[0], known)
        self._taps = {n: LayerTap(modules[n], n) for n in names}

    def __getitem__(self, layer: str) -> LayerTap:
        try:
            return self._taps[layer]
        except KeyError:
            raise LayerNotFound(self.model_name, layer, list(self._taps)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)

    def close(self) -> None:
        for tap in self._taps.values():
            tap.remove()

    def __enter__(self) -> "LayerTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hook_count(model: nn.Module) -> int:
    """Hooks of every kind registered on every module of `model` (for leak checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())
