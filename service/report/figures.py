"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (files only, no display, no pyplot
state shared between threads):

    curves(method)          deletion / insertion curves of one method beside the random order's
    sanity(method, maps)    one randomization run's maps: rows = steps (trained first), columns = items
    examples(result)        the example inputs and every method's example maps over them
    cost(result)            seconds per method, with the total's forward / backward rows and ratio to the floor
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from service._proto import attribution_pb2 as pb
from service.client_messages import array_from_tensor
from service.report.summary import metric_name, ordered_methods, ratio_to_floor

DPI = 80
_METHOD_COLOUR = "#c0392b"
_RANDOM_COLOUR = "#7f8c8d"


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes (no metadata that changes between runs)."""
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return out.getvalue()


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def curves(method: pb.MethodEvaluation) -> bytes | None:
    """One panel per curve of `method` (deletion / insertion under each baseline): the method's mean target
    probability against the fraction of units changed, the random order's dashed; None without curves."""
    if not method.curves:
        return None
    figure = Figure(figsize=(3.6 * len(method.curves), 3.0), layout="constrained")
    for i, curve in enumerate(method.curves):
        ax = figure.add_subplot(1, len(method.curves), i + 1)
        x = np.asarray(curve.fractions, dtype=np.float64)
        ours, chance = np.asarray(curve.scores, np.float64), np.asarray(curve.random_scores, np.float64)
        ax.plot(x, ours, color=_METHOD_COLOUR, linewidth=2, label=f"{_short(method.label, 24)}")
        if chance.size == x.size:
            ax.plot(x, chance, color=_RANDOM_COLOUR, linestyle="--", linewidth=1.5, label="random order")
            ax.fill_between(x, ours, chance, color=_METHOD_COLOUR, alpha=0.12)
        areas = ""
        if x.size > 1:
            areas = f"\nAUC {np.trapezoid(ours, x):.3f}"
            if chance.size == x.size:
                areas += f" vs random {np.trapezoid(chance, x):.3f}"
        baseline = f" ({curve.baseline})" if curve.baseline else ""
        ax.set_title(f"{metric_name(curve.metric)}{baseline}{areas}", fontsize=9)
        ax.set_xlabel("fraction of units changed", fontsize=8)
        ax.set_ylabel("target probability", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    figure.suptitle(method.label, fontsize=10)
    return png(figure)


def _map_grid(figure: Figure, rows: Sequence[np.ndarray | None], row_titles: Sequence[str],
              column_titles: Sequence[str], cmap: str = "inferno") -> None:
    """Images in a rows x columns grid; a row entry is (items, H, W) maps, (items, H, W, 3) pictures or None."""
    columns = max(1, len(column_titles))
    for r, (images, title) in enumerate(zip(rows, row_titles)):
        for c in range(columns):
            ax = figure.add_subplot(len(rows), columns, r * columns + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if images is not None and c < len(images):
                picture = images[c]
                if picture.ndim == 2:
                    ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                else:
                    ax.imshow(np.clip(picture, 0.0, 1.0), interpolation="nearest")
            if r == 0:
                ax.set_title(_short(column_titles[c]), fontsize=7)
            if c == 0:
                ax.set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")


def sanity(method: pb.MethodEvaluation, run: pb.RandomizationMaps, item_names: Sequence[str] = ()) -> bytes | None:
    """One randomization run's maps before and after each step (rows: "trained", then each step with the
    mean Spearman correlation to the trained maps; columns: items); None when the run carries no maps."""
    maps = array_from_tensor(run.maps).astype(np.float32) if run.maps.shape else None
    if maps is None or maps.ndim != 4 or maps.shape[0] == 0 or maps.shape[1] == 0:
        return None
    steps, items = maps.shape[:2]
    names = list(run.steps) + [f"step {i}" for i in range(len(run.steps), steps)]
    rho = list(run.spearman)
    titles = [f"{_short(names[s], 22)}\n\u03c1 {rho[s]:.2f}" if s < len(rho) and math.isfinite(rho[s])
              else _short(names[s], 22) for s in range(steps)]
    figure = Figure(figsize=(1.25 * items + 1.6, 1.25 * steps + 0.6), layout="constrained")
    _map_grid(figure, list(maps), titles, _item_titles(item_names, items))
    figure.suptitle(f"{method.label}: {run.mode} randomization", fontsize=9)
    return png(figure)


def _item_titles(item_names: Sequence[str], items: int) -> list[str]:
    names = [str(n).replace("\\", "/").rsplit("/", 1)[-1] for n in item_names]
    return [names[i] if i < len(names) and names[i] else f"item {i}" for i in range(items)]


def _pictures(tensor: pb.Tensor) -> np.ndarray | None:
    """example_inputs `[items, C, H, W]` as `(items, H, W, 3)` floats in [0, 1] (grey repeated); None if unset."""
    if not tensor.shape:
        return None
    values = array_from_tensor(tensor).astype(np.float32)
    if tensor.dtype == pb.UINT8:
        values = values / 255.0
    if values.ndim != 4 or values.shape[1] not in (1, 3):
        return None
    values = np.transpose(values, (0, 2, 3, 1))
    return np.repeat(values, 3, axis=3) if values.shape[3] == 1 else values


def examples(result: pb.EvaluationResult, item_names: Sequence[str] = ()) -> bytes | None:
    """The example inputs (top row) and each method's example maps (a row each, in ranking order);
    None when the result carries no example maps."""
    methods = [m for m in ordered_methods(result) if m.example_maps.shape]
    if not methods:
        return None
    pictures = _pictures(result.example_inputs)
    rows: list[np.ndarray | None] = [pictures] if pictures is not None else []
    titles = ["input"] if pictures is not None else []
    for method in methods:
        rows.append(array_from_tensor(method.example_maps).astype(np.float32))
        titles.append(_short(method.label, 22))
    items = max(len(r) for r in rows if r is not None)
    figure = Figure(figsize=(1.25 * items + 1.6, 1.25 * len(rows) + 0.4), layout="constrained")
    _map_grid(figure, rows, titles, _item_titles(item_names, items))
    return png(figure)


def cost(result: pb.EvaluationResult) -> bytes:
    """Seconds per method (horizontal bars, ranking order), titled with the evaluation's wall time, its
    forward and backward rows and its ratio to the measured floor of the same passes."""
    methods = ordered_methods(result)
    figure = Figure(figsize=(6.0, 0.45 * max(1, len(methods)) + 1.3), layout="constrained")
    ax = figure.add_subplot(1, 1, 1)
    labels = [_short(m.label, 28) for m in methods]
    seconds = [m.seconds for m in methods]
    positions = np.arange(len(methods))
    ax.barh(positions, seconds, color="#2e86c1")
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    for y, s in zip(positions, seconds):
        ax.text(s, y, f" {s:.2f} s", va="center", fontsize=7)
    ax.set_xlabel("seconds (maps and metrics)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ratio = ratio_to_floor(result)
    floor = f", {ratio:.1f}\u00d7 the floor ({result.floor_seconds:.2f} s)" if ratio else ""
    ax.set_title(f"total {result.seconds:.2f} s{floor}\n{result.forward_rows:,} forward rows, "
                 f"{result.backward_rows:,} backward rows", fontsize=9)
    ax.margins(x=0.25)
    return png(figure)
