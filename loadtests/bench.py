"""`attribution bench kernels`: the gradient family and the CAM/perturbation family in one run.

Gradient rows come from loadtests/kernel_bench.py, CAM, Score-CAM and occlusion
rows from loadtests/bench_cam.py (their options are prefixed --cam-); both go
into one JSON `results` list. `--no-cam` skips the second half.
"""
from __future__ import annotations

import argparse
import json

import torch

from loadtests import bench_cam, kernel_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kernel_bench.add_arguments(parser)
    bench_cam.add_arguments(parser)
    parser.add_argument("--no-cam", action="store_true", help="skip the CAM / Score-CAM / occlusion rows")


def run(args: argparse.Namespace) -> dict:
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
