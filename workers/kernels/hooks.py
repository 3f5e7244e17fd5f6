"""Cached layer taps: one forward hook per (model, layer), idle unless a call captures.

pytorch-grad-cam registers hooks per explainer object and removes them when that
object dies, so the hook count follows garbage collection and two explainers on one
model see each other's activations. Here a `LayerTap` is registered once, when a
replica loads the model, and reused by every request. Its hook does nothing unless
the *calling context* has opened a capture: capture state lives in a
`contextvars.ContextVar` (one value per thread and per asyncio task), never on the
tap, so concurrent forwards on one model never see each other's activations.

There are no backward hooks. A capture opened with ``require_grad=True`` keeps
``out.detach().requires_grad_(True)`` as the activation and returns a clone of that
leaf in place of the layer output: the rest of the forward depends on the leaf, so
``torch.autograd.grad(score, act)`` runs the backward from the logits to the layer
and stops there (the inputs and the parameters do not require grad), instead of
running all the way to the input.

The module output the rest of the forward sees is always a copy, never the captured
tensor itself: torchvision's DenseNet runs ``F.relu(features, inplace=True)`` right
after its ``features`` block, which on the leaf itself is an autograd error and on a
shared tensor would turn the captured activation into the post-ReLU one. The copy
takes the in-place edit; the clone's backward is the identity, so the gradient at
the leaf is the gradient at the layer's output.

A capture may also *edit* the output the rest of the forward sees (`capture(edit=fn)`):
Ablation-CAM zeroes one channel per row that way, the captured activation staying the
layer's own output.

A layer's output need not be `(N, C, H, W)`: channels-last maps `(N, H, W, C)` and
transformer tokens `(N, 1 + h*w, C)` are CAM-able once their layout is known
(`LAYOUTS`); the kernels turn captured tensors into `(N, C, h, w)` with `to_nchw`.
"""
from __future__ import annotations

import contextvars
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

from workers.config import CAM_LAYOUTS as LAYOUTS
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

    __slots__ = ("require_grad", "edit", "activation")

    def __init__(self, require_grad: bool, edit: Callable[[Tensor], Tensor] | None = None):
        self.require_grad = require_grad
        self.edit = edit
        self.activation: Tensor | None = None


class LayerTap:
    """One forward hook on one module, shared by every request on the replica."""

    def __init__(self, module: nn.Module, name: str = "", layout: str | None = None):
        if layout is not None and layout not in LAYOUTS:
            raise InvalidArgument.field("cam_layouts", f"layer {name!r}: unknown layout {layout!r}; "
                                                       f"choose one of {', '.join(LAYOUTS)}")
        self.name = name
        self.layout = layout  # None: not declared, read as nchw where the shape says so
        self._key = next(_KEYS)
        self._handle = module.register_forward_hook(self._hook)

    def to_nchw(self, t: Tensor, size: tuple[int, int]) -> Tensor:
        """`t`, this layer's output (or its gradient), as `(N, C, h, w)` for an input of `size`."""
        return to_nchw(t, self.name, self.layout, size)

    @property
    def channel_axis(self) -> int:
        """The channel axis of this layer's raw output: 1 (nchw, or undeclared), -1 (nhwc, tokens)."""
        return -1 if self.layout in ("nhwc", "tokens") else 1

    def _hook(self, module: nn.Module, args: tuple, output):
        cap = _ACTIVE.get().get(self._key)
        if cap is None or cap.activation is not None:
            # Idle (no capture in this context) or the module ran twice in one
            # forward: the first output is the layer's activation, later calls pass.
            return None
        if not isinstance(output, Tensor):
            raise InvalidArgument.field(
                "layer", f"layer {self.name!r} returns {type(output).__name__}, not a tensor")
        if cap.edit is not None:
            # The captured tensor stays the layer's output; the forward goes on with the edit.
            cap.activation = output.detach()
            return cap.edit(output)
        if cap.require_grad:
            # A fresh leaf, so the backward stops here; the forward goes on with a copy of
            # it, so an in-place edit downstream touches neither the leaf nor the capture.
            leaf = output.detach().requires_grad_(True)
            cap.activation = leaf
            return leaf.clone()
        # The forward goes on with a copy: the captured tensor stays the layer's output.
        cap.activation = output.detach()
        return output.clone()

    @contextmanager
    def capture(self, *, require_grad: bool = False,
                edit: Callable[[Tensor], Tensor] | None = None) -> Iterator[Capture]:
        """Capture this layer's output for forwards run inside the block, in this context only.

        `edit`: the rest of the forward sees `edit(output)` instead of a copy of the output; it
        must return a new tensor (never edit its argument in place). Not with `require_grad`."""
        if edit is not None and require_grad:
            raise ValueError("a capture either edits the output or takes gradients, not both")
        cap = Capture(require_grad, edit)
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

    def __init__(self, model: nn.Module, layer_names: Iterable[str], model_name: str = "model",
                 layouts: Mapping[str, str] | None = None):
        self.model_name = model_name
        layouts = layouts or {}
        modules = dict(model.named_modules())
        names = list(dict.fromkeys(layer_names))
        missing = [n for n in names if n not in modules]
        if missing:
            known = [n for n in modules if n]
            raise LayerNotFound(model_name, missing[0], known)
        self._taps = {n: LayerTap(modules[n], n, layouts.get(n)) for n in names}

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


def to_nchw(t: Tensor, layer: str, layout: str | None, size: tuple[int, int]) -> Tensor:
    """A captured activation or its gradient as `(N, C, h, w)`, from `layout`.

    `size` is the input's (H, W): a token layer's patch grid is the one with the
    input's aspect ratio. `layout` None (not declared) is read as nchw only where
    the shape says so (`detect_layout`). A tensor that does not fit its layout is
    refused naming the layer and the setting to change, never reduced over the
    wrong axes.
    """
    if layout == "tokens":
        grid = token_grid(t.shape[1], size) if t.dim() == 3 else None
        if grid is None:
            raise _bad_layout(layer, layout, t.shape, "(N, 1 + h*w, C): a class token, then an h x w patch grid "
                                                      "with the input's aspect ratio")
        patches = t[:, 1:]                                               # (N, h*w, C), class token dropped
        return patches.reshape(t.shape[0], *grid, t.shape[2]).permute(0, 3, 1, 2)
    if layout is None:
        problem = layout_problem(layer, tuple(t.shape), size)
        if problem:
            raise InvalidArgument.field("layer", problem)
        return t
    if t.dim() != 4:
        raise _bad_layout(layer, layout, t.shape, "a 4-d feature map")
    return t if layout == "nchw" else t.permute(0, 3, 1, 2)


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) patch grid of `tokens` = 1 + h*w tokens for an input of `size`; None if none fits."""
    patches = tokens - 1
    if patches < 1:
        return None
    height, width = size
    h = max(1, round(math.sqrt(patches * height / width)))
    w = patches // h
    return (h, w) if h * w == patches else None


def detect_layout(shape: tuple[int, ...], size: tuple[int, int]) -> str | None:
    """The layout a layer output of `shape` shows for an input of `size`, or None.

    A 4-d output is channels-first when its last two axes scale like the input's
    sides (stride and rounding aside), channels-last when the middle two do and
    the last two do not; where both fit, PyTorch's convention (nchw) is taken.
    Token outputs cannot be told from other 3-d outputs: they are declared.
    """
    if len(shape) != 4:
        return None
    if _spatial(shape[2], shape[3], size):
        return "nchw"
    if _spatial(shape[1], shape[2], size):
        return "nhwc"
    return None


def layout_problem(layer: str, shape: tuple[int, ...], size: tuple[int, int]) -> str:
    """Why an undeclared layer of output `shape` cannot be read as nchw ("" when it can)."""
    found = detect_layout(shape, size)
    if found == "nchw":
        return ""
    hint = {"nhwc": "it looks channels-last (N, H, W, C): declare nhwc",
            None: "its layout cannot be told from the shape: declare nchw, nhwc or tokens"}[found]
    return (f"layer {layer!r} gives a {shape} output for a {size[0]}x{size[1]} input, not a channels-first "
            f"(N, C, H, W) feature map; {hint} for it in the model's cam_layouts, or choose another layer")


def _spatial(h: int, w: int, size: tuple[int, int]) -> bool:
    """Whether (h, w) can be a feature map of an input of `size`: no larger, the same stride on both sides
    up to one cell of rounding."""
    height, width = size
    return h <= height and w <= width and abs(h / height - w / width) <= 1 / min(height, width) + 1e-9


def _bad_layout(layer: str, layout: str, shape, wanted: str) -> InvalidArgument:
    return InvalidArgument.field(
        "layer", f"layer {layer!r} gives a {tuple(shape)} output, which is not {layout} ({wanted}); declare its "
                 f"layout in the model's cam_layouts ({' | '.join(LAYOUTS)}) or choose another layer")


def hook_count(model: nn.Module) -> int:
    """Hooks of every kind registered on every module of `model` (for leak checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())
