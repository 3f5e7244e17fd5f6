"""`attribution bench kernels`: the gradient family and the CAM/perturbation family in one run.

Gradient rows come from loadtests/kernel_bench.py, CAM, Score-CAM and occlusion
rows from loadtests/bench_cam.py (their options are prefixed --cam-); both go
into one JSON `results` list. `--no-cam` skips the second half.
"""
from __future__ import annotations

import argparse
import json

from loadtests.bench_args import add_arguments  # noqa: F401  (the CLI's view of this bench)


def run(args: argparse.Namespace) -> dict:
    import torch

    from loadtests import bench_cam, kernel_bench

    out, args.json = args.json, None  # written once, with both halves
    report = kernel_bench.run(args)
    if not args.no_cam:
        threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            rows = bench_cam.cam_rows(args)
        finally:
            torch.set_num_threads(threads)
        report["results"] += rows
        report["config"]["cam"] = {k: v for k, v in vars(args).items() if k.startswith("cam_")}
        if not args.quiet:
            print(bench_cam.format_table(rows))
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return report
