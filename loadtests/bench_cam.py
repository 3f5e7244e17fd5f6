"""CAM and perturbation bench: our kernels against their floor and their peer, side by side in one run.

On a random-init ResNet-18 (fixed seed, eval, frozen; `--cam-model demo` for smoke runs) at
`--cam-size` px, layer4, it times,
interleaved after a warm-up (`kernel_bench.measure`; ratios are medians of per-repeat ratios):

    grad_cam, grad_cam_plus_plus, layer_cam, hires_cam, xgrad_cam   ours: explain_cam (one
        forward, backward stopped at layer4); floor: one full forward + backward-to-input over
        the same batch (target ratio <= 0.6); peer: pytorch-grad-cam (hooks registered per
        call, as its `with` use).
    eigen_cam    ours: explain_cam, which runs the forward alone; floor: one plain inference
        forward over the same batch (target <= 1.25: the per-image SVD on top); peer:
        pytorch-grad-cam EigenCAM.
    score_cam    ours: score_cam; floor: plain inference forwards over the same N*K masked
        inputs in the same chunks (target <= 1.10); peer: pytorch-grad-cam ScoreCAM with its
        batch_size set to our chunk size.
    ablation_cam ours: ablation_cam; floor: plain inference forwards over the same N*K ablated
        rows in the same chunks (target <= 1.10); peer: pytorch-grad-cam AblationCAM with its
        batch_size set to our chunk size (it swaps the layer for its cached output, so its rows
        skip the layer's own compute; ours rerun it).
    occlusion    ours: occlusion; floor: plain inference forwards over the same N*P occluded
        inputs in the same chunks (target <= 1.10); peer: Captum Occlusion with
        perturbations_per_eval giving the same rows per forward.
    rise, xrai   loadtests/bench_perturbation.py (each against the floor of the rows it runs).
    fold_32_batch1_grad_cam   32 batch-1 Grad-CAM requests folded into one call, against the
        same 32 run one by one (floor) and pytorch-grad-cam one by one (peer); per request.

    python -m loadtests.bench_cam --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
from typing import Callable

import torch
from torch import nn

from loadtests.bench_args import CAM_LAYERS, FOLD_REQUESTS  # noqa: F401
from loadtests.bench_args import cam_arguments as add_arguments  # noqa: F401  (python -m)
from loadtests.bench_perturbation import bench_rise, bench_xrai
from loadtests.kernel_bench import build_model, machine_info, measure, paired_ratio
from workers.batching import FoldBudget, iter_chunks, rows_per_chunk
from workers.kernels.cam import CAM_VARIANTS, GRADIENT_FREE_VARIANTS, CamRequest, explain_cam
from workers.kernels.hooks import LayerTaps
from workers.kernels.perturbation import ablation_cam, occlusion, score_cam

# The CAM layer per model: ResNet's last stage; the demo net (small, for smoke runs) its own.
LAYERS = CAM_LAYERS
TARGETS = {"cam": 0.6, "cam_forward_only": 1.25, "perturbation": 1.10}


def _pytorch_grad_cam(name: str):
    import pytorch_grad_cam
    peers = {"grad_cam": "GradCAM", "grad_cam_plus_plus": "GradCAMPlusPlus", "layer_cam": "LayerCAM",
             "hires_cam": "HiResCAM", "xgrad_cam": "XGradCAM", "eigen_cam": "EigenCAM", "score_cam": "ScoreCAM",
             "ablation_cam": "AblationCAM"}
    return getattr(pytorch_grad_cam, peers[name])


def _peer_cam(variant: str, model: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor,
              batch_size: int | None = None) -> Callable[[], object]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cls, targets = _pytorch_grad_cam(variant), [ClassifierOutputTarget(int(i)) for i in t]
    module = dict(model.named_modules())[layer]

    def run() -> object:
        # Its hooks live as long as the object: built per call, as `with` use does, so they
        # never slow down the other contenders. tqdm's bars (ScoreCAM) go to a sink.
        with cls(model, [module]) as cam, contextlib.redirect_stderr(io.StringIO()):
            if batch_size is not None:
                cam.batch_size = batch_size
            return cam(x.detach().requires_grad_(True), targets)
    return run


def _backward_floor(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> Callable[[], object]:
    rows = rows_per_chunk(model, tuple(x.shape[1:]), FoldBudget(), device=x.device, dtype=x.dtype)

    def run() -> None:
        for chunk in iter_chunks(x.shape[0], rows):
            leaf = x[chunk].detach().requires_grad_(True)
            logits = model(leaf)
            torch.autograd.grad(logits.gather(1, t[chunk, None]).sum(), leaf)
    return run


def _inference_floor(model: nn.Module, x: torch.Tensor, total_rows: int) -> tuple[Callable[[], object], int]:
    """Plain inference forwards over `total_rows` rows, chunked as the kernels chunk them."""
    rows = rows_per_chunk(model, tuple(x.shape[1:]), FoldBudget(), device=x.device, dtype=x.dtype,
                          backward=False)
    block = x[:1].expand(min(rows, total_rows), *x.shape[1:]).contiguous()  # (rows, C, H, W)

    def run() -> None:
        with torch.inference_mode():
            for chunk in iter_chunks(total_rows, rows):
                model(block[:chunk.stop - chunk.start])
    return run, rows


def _row(method: str, times: dict[str, list[float]], target: float, **extra) -> dict:
    row = {"method": method, "seconds": statistics.median(times["ours"]),
           "floor_seconds": statistics.median(times["floor"]),
           "ratio_to_floor": paired_ratio(times["ours"], times["floor"]), "target_ratio_to_floor": target,
           "peer_seconds": statistics.median(times["peer"]),
           "ratio_to_peer": paired_ratio(times["ours"], times["peer"]), **extra}
    row["meets_target"] = row["ratio_to_floor"] <= target
    return row


def bench_cam_variant(model, taps, layer, variant, x, t, repeats) -> dict:
    ours = lambda: explain_cam(model, taps, [CamRequest(x, t, layer, (variant,))])  # noqa: E731
    forward_only = variant in GRADIENT_FREE_VARIANTS
    floor = _inference_floor(model, x, x.shape[0])[0] if forward_only else _backward_floor(model, x, t)
    times = measure({"ours": ours, "floor": floor, "peer": _peer_cam(variant, model, layer, x, t)},
                    repeats, x.device)
    return _row(variant, times, TARGETS["cam_forward_only" if forward_only else "cam"], rows=int(x.shape[0]),
                peer="pytorch-grad-cam")


def bench_channel_perturbation(method: str, model, taps, layer, x, t, repeats) -> dict:
    """Score-CAM or Ablation-CAM over every channel: N*K inference rows."""
    with torch.inference_mode(), taps[layer].capture() as cap:
        model(x[:1])
    rows = x.shape[0] * taps[layer].to_nchw(cap.activation, tuple(x.shape[-2:])).shape[1]  # N * K
    floor, chunk = _inference_floor(model, x, rows)
    kernel = score_cam if method == "score_cam" else ablation_cam
    ours = lambda: kernel(model, taps, x, t, layer)  # noqa: E731
    times = measure({"ours": ours, "floor": floor, "peer": _peer_cam(method, model, layer, x, t, chunk)},
                    repeats, x.device)
    return _row(method, times, TARGETS["perturbation"], rows=rows, chunk_rows=chunk, peer="pytorch-grad-cam")



def bench_occlusion(model, x, t, patch, stride, repeats) -> dict:
    from captum.attr import Occlusion
    per_axis = -(-(x.shape[-1] - patch) // stride) + 1
    occluded = x.shape[0] * per_axis ** 2  # N * P
    floor, chunk = _inference_floor(model, x, occluded)
    ours = lambda: occlusion(model, x, t, patch_size=patch, stride=stride)  # noqa: E731
    window, strides = (x.shape[1], patch, patch), (x.shape[1], stride, stride)
    per_eval = max(1, chunk // x.shape[0])  # Captum forwards per_eval * N rows at once

    def peer() -> object:
        return Occlusion(model).attribute(x, sliding_window_shapes=window, strides=strides, baselines=0.0,
                                          target=t, perturbations_per_eval=per_eval)
    times = measure({"ours": ours, "floor": floor, "peer": peer}, repeats, x.device)
    return _row("occlusion", times, TARGETS["perturbation"], rows=occluded, chunk_rows=chunk,
                peer="captum")


def bench_fold(model, taps, layer, x, t, repeats) -> dict:
    reqs = [CamRequest(x[i:i + 1], t[i:i + 1], layer) for i in range(x.shape[0])]
    n = len(reqs)
    peers = [_peer_cam("grad_cam", model, layer, r.inputs, r.targets) for r in reqs]
    times = measure({"ours": lambda: explain_cam(model, taps, reqs),
                     "floor": lambda: [explain_cam(model, taps, [r]) for r in reqs],
                     "peer": lambda: [p() for p in peers]}, repeats, x.device)
    times = {k: [s / n for s in v] for k, v in times.items()}  # seconds per request
    row = _row(f"fold_{n}_batch1_grad_cam", times, 1.0, requests=n, peer="pytorch-grad-cam one by one")
    row.update(one_by_one_seconds=row["floor_seconds"], ratio_folded_to_one_by_one=row["ratio_to_floor"])
    return row


def cam_rows(args: argparse.Namespace) -> list[dict]:
    """The bench's result rows (keys: method, seconds, floor_seconds, ratio_to_floor, peer_seconds,
    ratio_to_peer, plus per-row context)."""
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed, repeats, skip = getattr(args, "seed", 0), args.cam_repeats, set(args.cam_skip.split(","))
    model, classes = build_model(args.cam_model, seed, device)
    layer = LAYERS[args.cam_model]
    gen = torch.Generator().manual_seed(seed)
    n = max(args.cam_batch, args.cam_perturbation_batch, args.cam_fold_requests)
    x = torch.randn((n, 3, args.cam_size, args.cam_size), generator=gen).to(device)
    t = torch.randint(0, classes, (n,), generator=gen).to(device)
    xb, tb = x[:args.cam_batch], t[:args.cam_batch]
    xp, tp = x[:args.cam_perturbation_batch], t[:args.cam_perturbation_batch]
    rows = []
    with LayerTaps(model, [layer], model_name=args.cam_model) as taps:
        rows += [bench_cam_variant(model, taps, layer, v, xb, tb, repeats) for v in CAM_VARIANTS if v not in skip]
        rows += [bench_channel_perturbation(m, model, taps, layer, xp, tp, repeats)
                 for m in ("score_cam", "ablation_cam") if m not in skip]
        if "occlusion" not in skip:
            rows.append(bench_occlusion(model, xp, tp, args.cam_patch, args.cam_stride, repeats))
        if "rise" not in skip:
            rows.append(bench_rise(model, xp, tp, args.cam_rise_masks, repeats))
        if "xrai" not in skip:
            rows.append(bench_xrai(model, xp, tp, args.cam_xrai_steps, repeats))
        if "fold" not in skip:
            rows.append(bench_fold(model, taps, layer, x[:args.cam_fold_requests],
                                   t[:args.cam_fold_requests], repeats))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<28}{'ours s':>10}{'floor s':>10}{'/floor':>8}{'target':>8}{'peer s':>10}"
             f"{'/peer':>8}  peer"]
    def cell(value, spec: str) -> str:
        return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])

    for r in rows:
        lines.append(f"{r['method']:<28}{r['seconds']:>10.4f}{r['floor_seconds']:>10.4f}"
                     f"{r['ratio_to_floor']:>8.3f}{cell(r['target_ratio_to_floor'], '8.2f')}"
                     f"{cell(r['peer_seconds'], '10.4f')}{cell(r['ratio_to_peer'], '8.3f')}  {r['peer']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_cam", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        machine = machine_info(device)  # inside, so it reports the threads the run used
        rows = cam_rows(args)
    finally:
        torch.set_num_threads(threads)
    config = {k: v for k, v in vars(args).items() if k.startswith("cam_") or k in ("seed", "device")}
    report = {"machine": machine, "config": config, "results": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
    if not args.quiet:
        print(format_table(rows))
    return report


if __name__ == "__main__":
    main()
