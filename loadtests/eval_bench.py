"""Evaluation bench: our deletion curve against Quantus's PixelFlipping and against the forward floor.

On the demo watermark model (trained on first use into --cache), for N held-out items and one
method's maps (vanilla gradient, made tie-free so both libraries order the pixels the same way),
it times, interleaved and after a warm-up:
    ours      workers.evaluation.perturbation_curves: the method's deletion curve of --steps steps AND
              the random order's on the same items (as the metric always runs), with the measured
              forward chunk size (FoldBudget(measure=True))
    ours_auto the same with the memory budget's cap as the chunk size (FoldBudget())
    floor     plain inference forwards over exactly as many rows as ours ran, chunked as ours:
              what the passes cost with nothing around them
    quantus   quantus.PixelFlipping on the same inputs and maps for the same curve points (it perturbs the
              map broadcast over the channels, so it needs 3x the steps; batch_size = N)
and, for the randomization check (cascading, vanilla gradient), ours against its floor: one forward +
backward-to-input of N rows per model (the trained one and one per layer).
Ratios are medians of per-repeat ratios. They are a figure for the docs, not a test.

    python -m loadtests.eval_bench [--items 64] [--steps 32] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import warnings

import torch

from workers.batching import FoldBudget, iter_chunks
from workers.demo import DemoConfig, default_cache_dir, load_or_build_demo, make_watermark_dataset, to_model_space
from workers.evaluation import CurveConfig, gradient_attribute, perturbation_curves, randomization_check
from workers.evaluation.perturbation import forward_rows
from workers.evaluation.randomization import parametrized_layers


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _forward_floor(model, x: torch.Tensor, rows: int, chunk: int) -> None:
    with torch.inference_mode():
        for piece in iter_chunks(rows, chunk):
            model(x[torch.arange(piece.start, piece.stop) % x.shape[0]])


def _backward_floor(model, x: torch.Tensor, passes: int) -> None:
    for _ in range(passes):
        rows = x.clone().requires_grad_(True)
        torch.autograd.grad(model(rows).sum(), rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="curve steps; 4096 px must divide into them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=pathlib.Path, default=default_cache_dir())
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_or_build_demo(args.cache)
    config = DemoConfig()
    data = make_watermark_dataset(args.items, config.seed + 10_007, config)
    x, labels = to_model_space(data.images), data.labels
    maps = gradient_attribute("vanilla")(model, x, labels)
    maps = maps + 1e-6 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))
    curve = CurveConfig(steps=args.steps)
    rows = perturbation_curves(model, x, {"vanilla": maps}, labels, curve).rows
    measured = FoldBudget(measure=True)
    chunk = forward_rows(model, tuple(x.shape[1:]), measured, device=x.device)
    quantus = _quantus_metric(x.shape[-1] * x.shape[-2] // args.steps)
    layers = len(parametrized_layers(model))
    methods = {"vanilla": gradient_attribute("vanilla")}
    samples: dict[str, list[float]] = {"ours": [], "ours_auto": [], "floor": [], "quantus": [], "randomization": [],
                                       "randomization_floor": []}
    for repeat in range(args.repeats + 1):  # the first round warms up
        times = {
            "ours": _timed(lambda: perturbation_curves(model, x, {"vanilla": maps}, labels, curve, budget=measured)),
            "ours_auto": _timed(lambda: perturbation_curves(model, x, {"vanilla": maps}, labels, curve)),
            "floor": _timed(lambda: _forward_floor(model, x, rows, chunk)),
            "randomization": _timed(lambda: randomization_check(model, x, labels, methods)),
            "randomization_floor": _timed(lambda: _backward_floor(model, x, layers + 1)),
        }
        if quantus is not None:
            times["quantus"] = _timed(lambda: _run_quantus(quantus, model, x, labels, maps))
        if repeat:
            for name, value in times.items():
                samples[name].append(value)
    report = _report(samples, rows, args)
    report["chunk_rows"] = chunk
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _quantus_metric(pixels_per_step: int):
    try:
        import quantus
    except ImportError:
        return None
    # Quantus counts the map broadcast over 3 channels: a third of a step's pixels per its step.
    return quantus.PixelFlipping(features_in_step=pixels_per_step, normalise=False, abs=False, perturb_baseline=0.0,
                                 disable_warnings=True, display_progressbar=False)


def _run_quantus(metric, model, x: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric(model=model, x_batch=x.numpy(), y_batch=labels.numpy(), a_batch=maps.unsqueeze(1).numpy(),
               softmax=True, device="cpu", batch_size=x.shape[0])


def _median_ratio(top: list[float], bottom: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(top, bottom))


def _report(samples: dict[str, list[float]], rows: int, args) -> dict:
    report = {
        "items": args.items, "steps": args.steps, "threads": args.threads, "curve_rows": rows,
        "seconds": {name: statistics.median(values) for name, values in samples.items() if values},
        "deletion_cost_over_forward_floor": _median_ratio(samples["ours"], samples["floor"]),
        "randomization_cost_over_backward_floor": _median_ratio(samples["randomization"],
                                                                samples["randomization_floor"]),
    }
    if samples["quantus"]:
        # Quantus gives the method's curve only; ours also runs the random order, twice the rows.
        report["quantus_over_ours"] = _median_ratio(samples["quantus"], samples["ours"])
    return report


if __name__ == "__main__":
    main()
