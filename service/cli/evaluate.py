"""`attribution evaluate IMAGE... --methods grad_cam,integrated_gradients --metrics deletion,insertion -o DIR`.

Submits one evaluation job (SubmitJobRequest.evaluation) that scores the methods on the images, follows it
with a progress bar, fetches its EvaluationResult, writes the report into DIR (evaluation.json, figures,
index.html: service/report/) and prints the ranking. Against a running server (`--server HOST:PORT`) or
in-process (`--local`: the same front door and job queue on a loopback port, no Ray), through the same
gRPC calls either way. `--demo N` evaluates N generated watermark images of the embedded demo model with
their watermark boxes (so the localisation metrics run too); `--dataset NAME` a data set the server was
configured with. Exit status: 0; 2 for a usage error (a request the server refuses as INVALID_ARGUMENT
included); 1 when a call fails; 3 when the job ends FAILED or CANCELLED; 130 on Ctrl-C (a server's job goes on).
"""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from service.cli import add_tls_arguments, local

DEFAULT_METHODS = "grad_cam,integrated_gradients,smoothgrad"
# flag -> the method parameter it sets, on every method that takes it
_PARAM_FLAGS = {"--layer": "layer", "--steps": "steps", "--rule": "rule", "--baseline": "baseline",
                "--samples": "samples", "--noise-fraction": "noise_fraction",
                "--top-k-channels": "top_k_channels", "--patch-size": "patch_size", "--stride": "stride"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", type=pathlib.Path, help="PNG/JPEG files, or folders of them")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="HOST:PORT of a running service")
    where.add_argument("--local", action="store_true", help="run in-process on the configured models (no Ray)")
    parser.add_argument("--config", help="config file for --local (default: the demo model)")
    parser.add_argument("--demo", type=int, default=0, metavar="N",
                        help="evaluate N generated demo images, with their watermark boxes")
    parser.add_argument("--dataset", default="", help="a data set the server was configured with, instead of files")
    parser.add_argument("-o", "--output", type=pathlib.Path, help="directory for the report (created if missing)")
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated methods to compare; METHOD@LAYER picks a CAM layer "
                             f"(default {DEFAULT_METHODS})")
    parser.add_argument("--metrics", default="",
                        help="comma-separated metrics, e.g. deletion,insertion,model_randomization,pointing_game "
                             "(default: every metric the inputs allow)")
    parser.add_argument("--target", type=int, nargs="+", help="class index, one for all or one per item "
                                                              "(default: the predicted class)")
    parser.add_argument("--boxes", type=pathlib.Path, metavar="FILE",
                        help="JSON: item name -> [top, left, bottom, right] in the model input's pixels "
                             "(localisation metrics)")
    parser.add_argument("--shuffled-model", default="",
                        help="a served model trained on shuffled labels (data randomization)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every random draw of the evaluation")
    method = parser.add_argument_group("method parameters (each applies to the methods that take it)")
    method.add_argument("--layer", help="CAM layer (default: the model's)")
    method.add_argument("--steps", type=int, help="Integrated Gradients: steps")
    method.add_argument("--rule", help="Integrated Gradients: riemann_* or gauss_legendre")
    method.add_argument("--baseline", help="Integrated Gradients: zero, black, blurred, uniform_noise, dataset_mean")
    method.add_argument("--samples", type=int, help="SmoothGrad family: noisy copies")
    method.add_argument("--noise-fraction", type=float, help="SmoothGrad family: noise std / input range")
    method.add_argument("--top-k-channels", type=int, help="Score-CAM channels kept")
    method.add_argument("--patch-size", type=int, help="occlusion patch")
    method.add_argument("--stride", type=int, help="occlusion stride")
    options = parser.add_argument_group("evaluation options (0 or unset: the server's default)")
    options.add_argument("--curve-steps", type=int, default=0, help="points on each deletion / insertion curve")
    options.add_argument("--curve-patch", type=int, default=0, help="deletion / insertion unit side, pixels")
    options.add_argument("--curve-baselines", default="", help="comma-separated: zero, blur, mean")
    options.add_argument("--randomization-modes", default="", help="comma-separated: cascading, independent")
    options.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples of each interval")
    options.add_argument("--confidence", type=float, help="interval confidence, e.g. 0.95")
    parser.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first")
    parser.add_argument("--json", action="store_true", help="print the report's summary as JSON, not a table")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (the watch has none)")
    parser.add_argument("--token", help="bearer token")
    add_tls_arguments(parser, ca_help="PEM root certificates: use TLS (with --server)")


def run(args: argparse.Namespace) -> int:
    from service.cli import CliError, tls_options
    from service.cli.evaluate_watch import evaluate

    sources = bool(args.images or args.demo) + bool(args.dataset)
    if sources != 1:
        raise CliError("give image files (or folders of them), --demo N, or --dataset NAME"
                       if not sources else "--dataset names the server's items: give no files or --demo with it")
    if not args.server and not args.local:
        raise CliError("give --server HOST:PORT or --local")
    if args.output is None:
        raise CliError("give -o DIR: the directory the report is written to")
    if args.output.exists() and not args.output.is_dir():
        raise CliError(f"-o {args.output}: a file is there; give a directory")
    if args.demo < 0:
        raise CliError("--demo N takes a positive number of images")
    tls_options(args)  # --cert without --key is refused before any work
    method_entries(args), _lists(args)  # names and flags checked before any image is read or made
    names, pictures, boxes = _inputs(args)
    return evaluate(args, evaluation_request(args, pictures, _regions(args, names, boxes)), names)


def _names(flag: str, text: str, known: list[str]) -> list[str]:
    """Comma-separated names, each checked against `known` (with a suggestion for a near miss)."""
    from service.cli import CliError, suggest

    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in known:
            hint = suggest(name, known)
            raise CliError(f"{flag}: {name!r} is not known{f' ({hint[2:]})' if hint else ''}; one of: "
                           f"{', '.join(known)}")
    return names


def method_entries(args: argparse.Namespace) -> list:
    """The methods of --methods (METHOD or METHOD@LAYER) as `build_evaluation` takes them ({"method": name,
    **params}), each method-parameter flag given to the methods that take it; a flag no method takes is refused."""
    from service._proto import attribution_pb2 as pb
    from service.cli import CliError, suggest
    from service.client import enum_names
    from service.client_messages import method_keywords

    given = {flag: getattr(args, key) for flag, key in _PARAM_FLAGS.items() if getattr(args, key) is not None}
    known = enum_names(pb.Method) + ["vanilla"]
    entries, used, seen = [], set(), set()
    for part in [p.strip() for p in args.methods.split(",") if p.strip()] or [""]:
        name, _, layer = part.partition("@")
        name = name.strip().lower()
        if name not in known:
            hint = suggest(name, known) if name else ""
            raise CliError(f"--methods: {name or part!r} is not a method{f' ({hint[2:]})' if hint else ''}; "
                           f"one of: {', '.join(enum_names(pb.Method))}")
        keywords = method_keywords(name)
        if layer and "layer" not in keywords:
            raise CliError(f"--methods: {part!r}: {name} has no layer (METHOD@LAYER is for CAM methods)")
        params = {key: value for flag, value in given.items() if (key := _PARAM_FLAGS[flag]) in keywords}
        used.update(flag for flag in given if _PARAM_FLAGS[flag] in keywords)
        if layer:
            params["layer"] = layer.strip()
        if (part.lower(), tuple(sorted(params.items()))) in seen:
            raise CliError(f"--methods: {part!r} is listed twice")
        seen.add((part.lower(), tuple(sorted(params.items()))))
        entries.append({"method": name, **params})
    unused = sorted(set(given) - used)
    if unused:
        raise CliError(f"{', '.join(unused)}: none of the methods ({args.methods}) takes it")
    return entries


def _lists(args: argparse.Namespace) -> dict[str, list[str]]:
    """The comma-separated name lists of the command line, each name checked."""
    from service._proto import attribution_pb2 as pb
    from service.client import enum_names

    return {"metrics": _names("--metrics", args.metrics, enum_names(pb.Metric)),
            "baselines": _names("--curve-baselines", args.curve_baselines, ["zero", "blur", "mean"]),
            "randomization_modes": _names("--randomization-modes", args.randomization_modes,
                                          ["cascading", "independent"])}


def evaluation_request(args: argparse.Namespace, pictures: list[bytes], regions: list[tuple[int, int, int, int]]):
    """The EvaluationRequest of the command line: `pictures` (encoded images; none with --dataset), one box per
    item in `regions` (or none), the methods of `method_entries`, the metrics and the evaluation options."""
    from service.cli import CliError
    from service.client import build_evaluation

    lists = _lists(args)
    options: dict[str, Any] = {"curve_steps": args.curve_steps, "patch_size": args.curve_patch,
                               "bootstrap_samples": args.bootstrap, "seed": args.seed,
                               "baselines": lists["baselines"], "randomization_modes": lists["randomization_modes"]}
    if args.confidence is not None:
        options["confidence"] = args.confidence
    try:
        return build_evaluation(images=pictures or None, dataset=args.dataset, model=args.model,
                                methods=method_entries(args), target=args.target, metrics=lists["metrics"],
                                boxes=regions or None, shuffled_labels_model=args.shuffled_model, **options)
    except (ValueError, TypeError) as exc:  # an unknown --rule or --baseline name, a parameter out of type
        raise CliError(str(exc)) from None


def _inputs(args: argparse.Namespace) -> tuple[list[str], list[bytes], dict[str, tuple[int, int, int, int]]]:
    """Item names, encoded images and the demo items' watermark boxes (by name): files as given, folders as
    their images (sorted), then the demo images."""
    from service.cli import CliError

    files = local.image_files(args.images)
    try:
        pictures = [p.read_bytes() for p in files]
    except OSError as exc:
        raise CliError(f"{exc.filename}: cannot read it ({exc.strerror})") from None
    names = [str(p)[-256:] for p in files]
    boxes: dict[str, tuple[int, int, int, int]] = {}
    if args.demo:
        import torch
        from torchvision.io import encode_png

        from workers.demo import make_watermark_dataset

        batch = make_watermark_dataset(args.demo, seed=args.seed + 1000)
        for i in range(args.demo):
            name = f"demo-{i:03d}.png"
            names.append(name)
            pictures.append(encode_png((batch.images[i] * 255).round().to(torch.uint8)).numpy().tobytes())
            boxes[name] = tuple(int(v) for v in batch.boxes[i])
    return names, pictures, boxes


def _regions(args: argparse.Namespace, names: list[str],
             demo_boxes: dict[str, tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """One box per item (the demo's, then --boxes by item name or file name), or none at all."""
    from service.cli import CliError

    boxes = dict(_read_boxes(args.boxes)) if args.boxes else {}
    found = []
    for name in names:
        box = demo_boxes.get(name) or boxes.get(name) or boxes.get(pathlib.PurePath(name).name)
        found.append(box)
    missing = [n for n, b in zip(names, found) if b is None]
    if args.boxes and missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CliError(f"--boxes {args.boxes}: no box for {shown} (give one per item, by its path or file name)")
    return [] if missing else found  # type: ignore[return-value]


def _read_boxes(path: pathlib.Path) -> dict[str, tuple[int, int, int, int]]:
    """--boxes FILE: {"name": [top, left, bottom, right], ...}, bottom and right exclusive."""
    from service.cli import CliError

    try:
        raw: Any = json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"--boxes {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"--boxes {path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CliError(f"--boxes {path}: must be a JSON object of item name -> [top, left, bottom, right]")
    boxes = {}
    for name, box in raw.items():
        ok = (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and v >= 0 for v in box)
              and box[0] < box[2] and box[1] < box[3])
        if not ok:
            raise CliError(f"--boxes {path}: {name!r}: {json.dumps(box)} is not [top, left, bottom, right] "
                           "with whole pixels, top < bottom and left < right")
        boxes[name] = tuple(box)
    return boxes
