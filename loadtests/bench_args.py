"""The options of `attribution bench kernels` (loadtests/kernel_bench.py, loadtests/bench_cam.py).

Kept apart from the benches, which import torch: the CLI builds its parser from
these without loading anything heavy.
"""
from __future__ import annotations

import argparse

from workers.methods import GRADIENT_METHODS

DEFAULT_METHODS = ("smoothgrad", "integrated_gradients", "vanilla")
ALL_METHODS = GRADIENT_METHODS
CAM_LAYERS = {"resnet18": "layer4", "demo": "block4"}  # random-init models the CAM bench runs, and their layer
FOLD_REQUESTS = 32  # batch-1 requests in the CAM fold row


def kernel_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options; adds --json OUT too unless the parser already has it."""
    parser.add_argument("--model", choices=("resnet18", "resnet50", "demo"), default="resnet18")
    parser.add_argument("--size", type=int, default=112, help="input height and width (px)")
    parser.add_argument("--batch", type=int, default=4, help="items per request")
    parser.add_argument("--samples", type=int, default=32, help="noisy copies per item")
    parser.add_argument("--steps", type=int, default=32, help="IG steps per item")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(ALL_METHODS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default=None, help="cuda when present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-captum", action="store_true", help="skip the Captum comparisons")
    parser.add_argument("--fixed-chunks", action="store_true",
                        help="chunks from the memory cap alone (the service measures a cost curve by default)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    if "--json" not in parser._option_string_actions:  # the CLI may own --json
        parser.add_argument("--json", default=None, metavar="OUT", help="write the report here")


def cam_arguments(parser: argparse.ArgumentParser) -> None:
    """CAM bench options (prefixed --cam-, so they merge into kernel_bench's parser)."""
    add = parser.add_argument
    add("--cam-model", choices=sorted(CAM_LAYERS), default="resnet18", help="random-init model to bench")
    add("--cam-size", type=int, default=112, help="input height and width (px)")
    add("--cam-batch", type=int, default=8, help="images per Grad-CAM-family request")
    add("--cam-perturbation-batch", type=int, default=1, help="images per Score-CAM / occlusion request")
    add("--cam-patch", type=int, default=16, help="occlusion patch size (px)")
    add("--cam-stride", type=int, default=8, help="occlusion stride (px)")
    add("--cam-rise-masks", type=int, default=256, help="RISE masks per item")
    add("--cam-xrai-steps", type=int, default=16, help="XRAI IG steps per baseline")
    add("--cam-repeats", type=int, default=5, help="timed runs per contender (median)")
    add("--cam-fold-requests", type=int, default=FOLD_REQUESTS, help="batch-1 requests in the fold row")
    add("--cam-skip", default="", help="comma-separated rows to skip (e.g. score_cam,occlusion,rise,xrai)")
    shared = {"--device": dict(default=None, help="cuda when present, else cpu"),
              "--seed": dict(type=int, default=0), "--threads": dict(type=int, default=None),
              "--json": dict(default=None, metavar="OUT", help="write the report here"),
              "--quiet": dict(action="store_true", help="do not print the table")}
    for flag, kw in shared.items():  # kernel_bench may own these already
        if flag not in parser._option_string_actions:
            add(flag, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kernel_arguments(parser)
    cam_arguments(parser)
    parser.add_argument("--no-cam", action="store_true", help="skip the CAM / Score-CAM / occlusion rows")
