"""Kernel bench: our gradient kernels against their floor and against Captum, side by side in one run.

For each method it times, interleaved and after a warm-up:
    ours          explain_gradients() with the automatic memory budget (no hand-set chunk size)
    floor         one plain forward + backward-to-input over exactly the same folded rows, chunked
                  the same way: the arithmetic's cost
    floor_1chunk  the same in one chunk of all rows (on CPU the default budget splits big folds:
                  smaller chunks run faster there, see workers/batching.py)
    captum        Captum with its defaults (Saliency, NoiseTunnel(Saliency), IntegratedGradients,
                  GradientShap for Expected Gradients; none for Blur IG and Guided IG)
    captum_tuned  the same with the best of a few internal_batch_size / nt_samples_batch_size values
and, for vanilla, smoothgrad and guided_ig, 8 batch-1 requests folded into one call against the same 8 run one
by one. Ratios are medians of per-repeat ratios, so a load swing on a shared host hits both sides.

    python -m loadtests.kernel_bench --json out.json     (or: attribution bench kernels --json out.json)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision
from torch import nn

from loadtests.bench_args import ALL_METHODS
from loadtests.bench_args import kernel_arguments as add_arguments  # noqa: F401  (python -m)
from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.kernels.gradients import (NOISE_METHODS, GradientLimits, GradientRequest, explain_gradients,
                                       fold_rows, request_cost)

FOLD_REQUESTS = 8
NO_CAPTUM = ("blur_ig", "guided_ig")  # Captum has no Blur IG or Guided IG
LIMITS = GradientLimits(max_samples=4096, max_steps=4096, max_items=4096)


def build_model(name: str, seed: int, device: torch.device) -> tuple[nn.Module, int]:
    """A random-init model (weights do not change the cost), eval, frozen: as the registry loads it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "demo":
            from workers.demo import DemoNet
            model, classes = DemoNet(), 4
        else:
            model, classes = getattr(torchvision.models, name)(num_classes=1000), 1000
    return model.to(device).eval().requires_grad_(False), classes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per variant per repeat, interleaved (order rotated each repeat) after one warm-up each."""
    for fn in variants.values():
        fn()
    names, times = list(variants), {name: [] for name in variants}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(_timed(variants[name], device))
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def floor_fn(model: nn.Module, req: GradientRequest, budget: FoldBudget) -> tuple[Callable[[], object], int]:
    """One plain forward + backward-to-input over the request's folded rows, chunked as the kernel would.

    Guided IG runs its rows as `steps` folds of the N items, one after another: its floor is that.
    """
    if req.method == "guided_ig":
        rows, targets, repeats = req.inputs, req.targets, req.steps
    else:
        (rows, targets, _), repeats = fold_rows([req]), 1  # (R, C, H, W), (R,)
    size = rows_per_chunk(model, tuple(rows.shape[1:]), budget, device=rows.device, dtype=rows.dtype)

    def run() -> None:
        for _ in range(repeats):
            for chunk in iter_chunks(rows.shape[0], size):
                leaf = rows[chunk].detach().requires_grad_(True)
                logits = model(leaf)
                torch.autograd.grad(logits.gather(1, targets[chunk].unsqueeze(1)).sum(), leaf)

    return run, repeats * -(-rows.shape[0] // size)


def captum_fns(model: nn.Module, req: GradientRequest) -> tuple[Callable[[], object], dict[str, Callable[[], object]]]:
    """Captum with defaults, and candidates for the hand-tuned batch size (name -> callable)."""
    from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Saliency

    x, t = req.inputs, req.targets
    if req.method == "expected_gradients":  # Captum's GradientShap draws as many rows, with no batch parameter
        shap = GradientShap(model)
        return (lambda: shap.attribute(x, baselines=req.references, n_samples=req.samples, stdevs=0.0, target=t)), {}
    if req.method == "vanilla":
        return (lambda: Saliency(model).attribute(x, target=t, abs=req.absolute)), {}
    if req.method in NOISE_METHODS:
        # Captum's stdevs is one number per input tensor: our per-item stds' mean.
        std = float((x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).mean() * req.noise_fraction)
        tunnel = NoiseTunnel(Saliency(model))

        def noise(batch: int | None) -> Callable[[], object]:
            return lambda: tunnel.attribute(x, nt_type=req.method, nt_samples=req.samples, stdevs=std,
                                            nt_samples_batch_size=batch, target=t, abs=False)

        candidates = sorted({max(1, req.samples // 4), max(1, req.samples // 2)})
        return noise(None), {f"nt_samples_batch_size={b}": noise(b) for b in candidates}
    ig = IntegratedGradients(model)
    rows = x.shape[0] * req.steps

    def integrated(batch: int | None) -> Callable[[], object]:
        return lambda: ig.attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=req.steps,
                                    method="gausslegendre", internal_batch_size=batch)

    candidates = sorted({max(x.shape[0], rows // 4), max(x.shape[0], rows // 2)})
    return integrated(None), {f"internal_batch_size={b}": integrated(b) for b in candidates}


def bench_method(model: nn.Module, classes: int, method: str, x: torch.Tensor, t: torch.Tensor,
                 args: argparse.Namespace) -> dict:
    device, budget = x.device, FoldBudget(measure=not args.fixed_chunks)
    references = None
    if method == "expected_gradients":  # a reference set of 16 images like the inputs
        references = torch.randn((16, *x.shape[1:]), generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    req = GradientRequest(x, t, method, samples=args.samples, steps=args.steps, seed=args.seed, references=references)
    ours = lambda: explain_gradients(model, [req], budget, LIMITS, classes)  # noqa: E731
    floor, chunks = floor_fn(model, req, budget)
    floor_one_chunk, _ = floor_fn(model, req, FoldBudget(max_rows=request_cost(req)))
    variants = {"ours": ours, "floor": floor, "floor_one_chunk": floor_one_chunk}
    tuned: dict[str, Callable[[], object]] = {}
    with_captum = not args.no_captum and method not in NO_CAPTUM
    if with_captum:
        variants["captum"], tuned = captum_fns(model, req)
        variants.update(tuned)
    times = measure(variants, args.repeats, device)
    row = {"method": method, "rows": request_cost(req), "chunks": chunks,
           "seconds": statistics.median(times["ours"]), "floor_seconds": statistics.median(times["floor"]),
           "ratio_to_floor": paired_ratio(times["ours"], times["floor"]),
           "floor_one_chunk_seconds": statistics.median(times["floor_one_chunk"]),
           "ratio_to_floor_one_chunk": paired_ratio(times["ours"], times["floor_one_chunk"])}
    if with_captum:
        best = min(tuned, key=lambda name: statistics.median(times[name])) if tuned else "captum"
        row.update(captum_seconds=statistics.median(times["captum"]),
                   ratio_to_captum=paired_ratio(times["ours"], times["captum"]),
                   captum_tuned_seconds=statistics.median(times[best]),
                   ratio_to_captum_tuned=paired_ratio(times["ours"], times[best]),
                   captum_tuned=best if tuned else "defaults (no batch parameter)")
    return row


def bench_fold(model: nn.Module, classes: int, method: str, x: torch.Tensor, t: torch.Tensor,
               args: argparse.Namespace) -> dict:
    """8 batch-1 requests folded into one call against the same 8 run one by one; the fold also with
    chunks from the memory cap alone, to show what the measured chunk size does."""
    requests = [GradientRequest(x[i:i + 1], t[i:i + 1], method, samples=args.samples, steps=args.steps,
                                seed=args.seed + i) for i in range(FOLD_REQUESTS)]
    budget, cap = FoldBudget(measure=not args.fixed_chunks), FoldBudget()
    folded = lambda: explain_gradients(model, requests, budget, LIMITS, classes)  # noqa: E731
    folded_cap = lambda: explain_gradients(model, requests, cap, LIMITS, classes)  # noqa: E731
    alone = lambda: [explain_gradients(model, [r], budget, LIMITS, classes) for r in requests]  # noqa: E731
    times = measure({"folded": folded, "folded_cap_chunks": folded_cap, "one_by_one": alone}, args.repeats,
                    x.device)
    per_request = {name: statistics.median(ts) / FOLD_REQUESTS for name, ts in times.items()}
    rows = sum(request_cost(r) for r in requests)
    return {"method": f"fold_{FOLD_REQUESTS}_batch1_{method}", "requests": FOLD_REQUESTS, "rows": rows,
            "chunk_rows": rows_per_chunk(model, tuple(x.shape[1:]), budget, device=x.device, dtype=x.dtype),
            "cap_chunk_rows": rows_per_chunk(model, tuple(x.shape[1:]), cap, device=x.device, dtype=x.dtype),
            "seconds": per_request["folded"], "one_by_one_seconds": per_request["one_by_one"],
            "cap_chunks_seconds": per_request["folded_cap_chunks"],
            "ratio_folded_to_one_by_one": paired_ratio(times["folded"], times["one_by_one"]),
            "ratio_folded_to_cap_chunks": paired_ratio(times["folded"], times["folded_cap_chunks"])}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def run(args: argparse.Namespace) -> dict:
    """Run the bench described by `args` (see add_arguments); return the report, print its table."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a caller's process (a test session, the CLI) keeps its own


def _run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    model, classes = build_model(args.model, args.seed, device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn((max(args.batch, FOLD_REQUESTS), 3, args.size, args.size), generator=gen).to(device)
    t = torch.randint(0, classes, (x.shape[0],), generator=gen).to(device)
    results = [bench_method(model, classes, m, x[:args.batch], t[:args.batch], args) for m in methods]
    results += [bench_fold(model, classes, m, x, t, args) for m in ("vanilla", "smoothgrad", "guided_ig")
                if m in methods]
    config = {key: getattr(args, key) for key in ("model", "size", "batch", "samples", "steps", "repeats", "seed")}
    report = {"machine": machine_info(device), "config": {**config, "methods": methods}, "results": results}
    if getattr(args, "json", None):
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
    if not getattr(args, "quiet", False):
        print(format_table(report))
    return report


def format_table(report: dict) -> str:
    def cell(value, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    header = f"{'method':<28}{'rows':>6}{'chunks':>7}{'ours s':>9}{'floor s':>9}{'/floor':>8}{'/1chunk':>8}" \
             f"{'captum s':>10}{'/captum':>9}{'tuned s':>9}{'/tuned':>8}"
    lines = [f"machine: {json.dumps(report['machine'])}", f"config: {json.dumps(report['config'])}", header]
    for r in report["results"]:
        if "one_by_one_seconds" in r:
            lines.append(f"{r['method']:<28}{r['rows']:>6}{'':>7}{r['seconds']:>9.3f}  per request folded; "
                         f"{r['one_by_one_seconds']:.3f} s one by one; folded/one-by-one "
                         f"{r['ratio_folded_to_one_by_one']:.3f}; chunks of {r['chunk_rows']} rows vs the cap's "
                         f"{r['cap_chunk_rows']}: {r['ratio_folded_to_cap_chunks']:.3f}")
            continue
        lines.append(f"{r['method']:<28}{r['rows']:>6}{r['chunks']:>7}{r['seconds']:>9.3f}{r['floor_seconds']:>9.3f}"
                     f"{r['ratio_to_floor']:>8.3f}{r['ratio_to_floor_one_chunk']:>8.3f}"
                     f"{cell(r.get('captum_seconds'), '10.3f'):>10}"
                     f"{cell(r.get('ratio_to_captum'), '9.3f'):>9}{cell(r.get('captum_tuned_seconds'), '9.3f'):>9}"
                     f"{cell(r.get('ratio_to_captum_tuned'), '8.3f'):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m loadtests.kernel_bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
