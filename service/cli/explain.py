"""`attribution explain IMAGE...`: each image its own request, N in flight, overlays written.

Against a running server (`--server HOST:PORT`) or in-process (`--local`: the
same front door and pipeline on a loopback port, no Ray). `--demo N` explains N
generated watermark images of the embedded demo model instead of files.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
from typing import Any

from service.cli import add_tls_arguments, local, tls_options
from service.client import AsyncAttributionClient, ServiceError, build_request

_PARAM_FLAGS = ("samples", "noise_fraction", "steps", "rule", "baseline", "layer", "also", "top_k_channels",
                "patch_size", "stride", "noise_stdev", "max_sigma", "fraction")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", type=pathlib.Path, help="PNG/JPEG files, or folders of them")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="HOST:PORT of a running service")
    where.add_argument("--local", action="store_true", help="run in-process on the configured models (no Ray)")
    parser.add_argument("--config", help="config file for --local (default: the demo model)")
    parser.add_argument("--demo", type=int, default=0, metavar="N", help="explain N generated demo images")
    parser.add_argument("--text", action="append", metavar="TEXT",
                        help="text models: a text to explain (repeatable); prints each token with its score")
    parser.add_argument("--save-inputs", type=pathlib.Path, metavar="DIR",
                        help="also write every input as sent (the demo images too) here, e.g. for "
                             "`attribution audit verify --inputs DIR`")
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--method", help="e.g. grad_cam (the default for images), smoothgrad, integrated_gradients, "
                                         "expected_gradients, blur_ig, guided_ig; vanilla is the default for --text")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target", type=int, help="class index to explain (default: predicted)")
    target.add_argument("--top-k", type=int, help="explain the top-k classes")
    parser.add_argument("--samples", type=int, help="SmoothGrad family: noisy copies; Expected Gradients: baseline "
                                                    "draws")
    parser.add_argument("--noise-fraction", type=float, help="SmoothGrad family: noise std / input range")
    parser.add_argument("--steps", type=int, help="Integrated Gradients, Blur IG, Guided IG: path steps")
    parser.add_argument("--rule", help="Integrated Gradients: riemann_* or gauss_legendre")
    parser.add_argument("--baseline", help="Integrated Gradients, Guided IG: zero, black, blurred, uniform_noise, "
                                           "dataset_mean")
    parser.add_argument("--noise-stdev", type=float, help="Expected Gradients: input noise / input range "
                                                          "(> 0 = GradientSHAP)")
    parser.add_argument("--max-sigma", type=float, help="Blur IG: the path's largest blur, pixels")
    parser.add_argument("--fraction", type=float, help="Guided IG: fraction of features moved first per step")
    parser.add_argument("--layer", help="CAM layer (default: the model's)")
    parser.add_argument("--also", type=_name_list, metavar="METHODS",
                        help="CAM: further CAM variants from the same pass, comma-separated "
                             "(e.g. hires_cam,xgrad_cam,eigen_cam)")
    parser.add_argument("--top-k-channels", type=int, help="Score-CAM / Ablation-CAM channels kept")
    parser.add_argument("--patch-size", type=int, help="occlusion patch")
    parser.add_argument("--stride", type=int, help="occlusion stride")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("-o", "--output", type=pathlib.Path,
                        help="overlay PNG file (one input, one map) or directory (<stem>.<method>[.t<class>].png); "
                             "overlays are drawn at each photo's own resolution")
    look = parser.add_argument_group("overlays (with -o)")
    look.add_argument("--colormap", default="inferno", help="inferno, viridis, gray, or coolwarm (signed maps)")
    look.add_argument("--alpha", type=float, default=0.5, help="weight of the colours over the photo, 0..1")
    look.add_argument("--legend", action="store_true", help="a strip under each overlay: class, score, method")
    look.add_argument("--panel", action="store_true", help="image | map | overlay side by side")
    look.add_argument("--format", choices=("png", "html"), default="png",
                      help="html: also an index.html gallery of every overlay in the -o directory")
    parser.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    parser.add_argument("--token", help="bearer token")
    add_tls_arguments(parser, ca_help="PEM root certificates: use TLS (with --server)")




def _name_list(value: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [name.strip() for name in value.split(",") if name.strip()]


def run(args: argparse.Namespace) -> int:
    from service.cli import CliError

    if args.text:
        from service.cli.explain_text import run_text

        if args.images or args.demo:
            raise CliError("give texts (--text) or images, not both")
        return run_text(args)
    if not args.images and not args.demo:
        raise CliError("give image files (or folders of them), --demo N, or --text TEXT for a text model")
    args.method = args.method or "grad_cam"
    if not args.server and not args.local:
        raise CliError("give --server HOST:PORT or --local")
    tls_options(args)  # --cert without --key is refused before any work
    _check_names(args)
    args.style = _style(args)
    inputs = _inputs(args)
    if args.output is not None and args.output.suffix.lower() == ".png" and len(inputs) > 1:
        raise CliError(f"-o {args.output} names one overlay file, but there are {len(inputs)} inputs; "
                       "give a directory")
    if args.format == "html" and (args.output is None or args.output.suffix.lower() == ".png"):
        raise CliError("--format html writes index.html into the -o directory; give -o DIR")
    progress = {"done": 0, "total": len(inputs), "written": [], "gallery": []}
    try:
        return asyncio.run(_explain_all(args, inputs, progress))
    except KeyboardInterrupt:
        written = f"; overlays in {args.output}" if progress["written"] else ""
        print(f"attribution explain: interrupted after {progress['done']} of {progress['total']} inputs{written}",
              file=sys.stderr)
        return 130


def _check_names(args: argparse.Namespace) -> None:
    """Method, baseline and rule names checked before anything starts, with a suggestion."""
    from service._proto import attribution_pb2 as pb
    from service.cli import CliError, suggest
    from service.client import enum_names

    known = {"--method": (args.method, enum_names(pb.Method)),
             "--baseline": (args.baseline, [b for b in enum_names(pb.BaselineKind) if b != "custom"]),
             "--rule": (args.rule, enum_names(pb.IntegrationRule))}
    checks = [(flag, value, names) for flag, (value, names) in known.items()]
    checks += [("--also", value, enum_names(pb.Method)) for value in args.also or ()]
    for flag, value, names in checks:
        try:
            if value is not None:
                enum_value("--method" if flag == "--also" else flag, value)
        except ValueError:
            hint = suggest(value, names)
            raise CliError(f"{flag} {value!r} is not known{f' ({hint[2:]})' if hint else ''}; one of: "
                           f"{', '.join(names)}") from None


def enum_value(flag: str, value: str) -> int:
    from service._proto import attribution_pb2 as pb
    from service.client import enum_from_name

    return enum_from_name({"--method": pb.Method, "--baseline": pb.BaselineKind,
                           "--rule": pb.IntegrationRule}[flag], value)


def _inputs(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """(name, bytes) of every input: files as given, folders as their images (sorted), then demo images."""
    from service.cli import CliError

    files = local.image_files(args.images)
    try:
        named = [(str(p), p.read_bytes()) for p in files]
    except OSError as exc:
        raise CliError(f"{exc.filename}: cannot read it ({exc.strerror})") from None
    if args.demo:
        import torch
        from torchvision.io import encode_png

        from workers.demo import make_watermark_dataset

        batch = make_watermark_dataset(args.demo, seed=args.seed + 1000)
        for i in range(args.demo):
            pixels = (batch.images[i] * 255).round().to(torch.uint8)
            named.append((f"demo-{i:03d}.png", encode_png(pixels).numpy().tobytes()))
    return named


def _save_input(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` at `path`, or beside it under a content-hashed name when another file is there."""
    if path.exists() and path.read_bytes() != data:
        import hashlib

        path = path.with_name(f"{path.stem}.{hashlib.sha256(data).hexdigest()[:12]}{path.suffix}")
    path.write_bytes(data)


def output_stems(names: list[str]) -> list[str]:
    """A distinct file stem per input: its own stem, or stem-<nearest folder names that tell them apart>."""
    paths = [pathlib.Path(n) for n in names]
    stems = [p.stem for p in paths]
    out = list(stems)
    for stem in {s for s in stems if stems.count(s) > 1}:
        group = [i for i, s in enumerate(stems) if s == stem]
        parents = {i: [p for p in paths[i].parent.parts if p not in ("/", ".", "")] for i in group}
        named = {i: stem for i in group}
        for depth in range(1, max(len(v) for v in parents.values()) + 1):
            named = {i: "-".join([stem] + parents[i][::-1][:depth]) for i in group}
            if len(set(named.values())) == len(group):
                break
        for i in group:
            out[i] = named[i]
    seen: dict[str, int] = {}
    unique = []
    for stem in out:  # still equal (the same path given twice): number them
        seen[stem] = seen.get(stem, 0) + 1
        unique.append(stem if out.count(stem) == 1 else f"{stem}-{seen[stem]}")
    return unique


def _overlay_paths(args: argparse.Namespace, stem: str, count: int, maps: list) -> list[pathlib.Path | None]:
    """Where each map's overlay goes: `-o file.png` for one input and one map, else `<dir>/<stem>.<method>[.tN].png`."""
    if args.output is None:
        return [None] * len(maps)
    if count == 1 and len(maps) == 1 and args.output.suffix.lower() == ".png":
        return [args.output]
    base = args.output.with_suffix("") if args.output.suffix.lower() == ".png" else args.output
    if len(maps) == 1:
        return [base / f"{stem}.{maps[0].method}.png"]
    return [base / f"{stem}.{m.method}.t{m.target}.png" for m in maps]


async def _explain_all(args: argparse.Namespace, inputs: list[tuple[str, bytes]], progress: dict) -> int:
    import uuid

    if args.save_inputs is not None:
        args.save_inputs.mkdir(parents=True, exist_ok=True)
        for name, data in inputs:
            _save_input(args.save_inputs / pathlib.Path(name).name, data)
    params = {k: getattr(args, k) for k in _PARAM_FLAGS if getattr(args, k) is not None}
    stems = output_stems([name for name, _ in inputs])
    run_id = uuid.uuid4().hex[:8]  # request ids unique per run: <run>-<index>-<stem>
    failures = 0
    async with local.target(args) as address:
        tls = tls_options(args) if args.server else {}  # --local serves in-process, in plaintext
        async with AsyncAttributionClient(address, token=args.token, timeout=args.timeout, **tls) as client:
            labels = await _labels(client, args.model)
            gate = asyncio.Semaphore(max(1, args.concurrency))

            async def one(index: int, name: str, data: bytes) -> dict[str, Any]:
                request = build_request(images=[data], method=args.method, model=args.model, target=args.target,
                                        top_k=args.top_k, seed=args.seed,
                                        request_id=f"{run_id}-{index:04d}-{stems[index]}"[:128],
                                        **params)
                async with gate:
                    try:
                        result = await client.explain_request(request, timeout=args.timeout)
                    except ServiceError as exc:
                        return {"input": name, "error": exc.code().name, "message": exc.details()}
                return _report(args, name, data, result, stems[index], len(inputs), labels, progress)

            tasks = [asyncio.ensure_future(one(i, n, d)) for i, (n, d) in enumerate(inputs)]
            try:
                for finished in asyncio.as_completed(tasks):  # each line as soon as its answer is in
                    row = await finished
                    progress["done"] += 1
                    failures += "error" in row
                    if "error" in row:
                        progress["gallery"].append(_failed_entry(row))
                    print(json.dumps(row) if args.json else _line(row, progress), flush=True)
            finally:
                for task in tasks:
                    task.cancel()
                if args.format == "html" and progress["gallery"]:
                    _write_gallery(args, progress["gallery"])
    return 1 if failures else 0


def _gallery_dir(args: argparse.Namespace) -> pathlib.Path:
    return args.output.parent if args.output.suffix.lower() == ".png" else args.output


def _failed_entry(row: dict[str, Any]):
    from service import render

    return render.GalleryEntry(row["input"], "", "", error=f"{row['error']}: {row['message']}")


def _write_gallery(args: argparse.Namespace, entries: list) -> None:
    from service import render

    page = _gallery_dir(args) / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(entries, key=lambda e: (e.input, e.picture))
    page.write_text(render.gallery_html(ordered, f"attribution explain: {args.method}, {len(ordered)} overlays"))
    print(f"gallery: {page}", file=sys.stderr, flush=True)


def _style(args: argparse.Namespace):
    from service import render
    from service.cli import CliError, suggest

    try:
        return render.Style(colormap=args.colormap, alpha=args.alpha, legend=args.legend, panel=args.panel)
    except ValueError as exc:
        hint = suggest(args.colormap, render.COLORMAPS) if args.colormap not in render.COLORMAPS else ""
        raise CliError(f"{exc}{hint}") from None


async def _labels(client: AsyncAttributionClient, model: str) -> tuple[str, ...]:
    """The model's class names, when it has them (for readable lines); () when not or unknown."""
    try:
        for info in await client.models(timeout=10):
            if info.name == model or (not model and info.is_default):
                return tuple(info.class_labels)
    except ServiceError:
        pass
    return ()


def _named(index: int, labels: tuple[str, ...]) -> str:
    return f"{index} {labels[index]!r}" if 0 <= index < len(labels) and labels[index] else str(index)


def _report(args, name: str, data: bytes, result, stem: str, count: int, labels: tuple[str, ...],
            progress: dict) -> dict[str, Any]:
    from service import render

    item = result.items[0]
    first = item.attributions[0]
    written = []
    paths = _overlay_paths(args, stem, count, item.attributions)
    photo = render.open_photo(data) if any(paths) else None
    box = render.photo_box(item.geometry, photo.size) if photo else None
    for attr, path in zip(item.attributions, paths):
        if path is None:
            continue
        caption = (f"predicted {_named(item.predicted_classes[0], labels)} ({item.predicted_scores[0]:.3f}); "
                   f"{attr.method} for {_named(attr.target, labels)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(render.png_bytes(render.overlay(photo, attr.map, args.style, caption, box)))
        written.append(str(path))
        progress["gallery"].append(render.GalleryEntry(name, str(path.relative_to(_gallery_dir(args))), caption))
    progress["written"].extend(written)
    t = result.timings
    return {"input": name, "request_id": result.request_id, "model": result.model,
            "model_version": result.model_version, "method": first.method, "target": first.target,
            "target_label": _named(first.target, labels), "targets": [a.target for a in item.attributions],
            "target_score": round(first.target_score, 6), "predicted": item.predicted_classes[0],
            "predicted_label": _named(item.predicted_classes[0], labels),
            "predicted_score": round(item.predicted_scores[0], 6), "queue_ms": round(t["queue_ms"], 3),
            "compute_ms": round(t["compute_ms"], 3), "total_ms": round(t["total_ms"], 3),
            "batch_size": int(t["batch_requests"]), "batch_samples": int(t["batch_samples"]),
            "completeness_error": first.completeness_error, "map_sha256": first.map_sha256,
            "input_sha256": item.input_sha256, "overlays": written,
            "overlay": written[0] if written else None}


def _line(row: dict[str, Any], progress: dict) -> str:
    counter = f"[{progress['done']}/{progress['total']}] " if progress["total"] > 1 else ""
    if "error" in row:
        return f"{counter}{row['input']}: {row['error']}: {row['message']}"
    extra = f" completeness={row['completeness_error']:.4f}" if row["completeness_error"] is not None else ""
    targets = f" (maps for {row['targets']})" if len(row["targets"]) > 1 else ""
    saved = f" -> {', '.join(row['overlays'])}" if row["overlays"] else ""
    return (f"{counter}{row['input']}: predicted {row['predicted_label']} ({row['predicted_score']:.3f}), "
            f"{row['method']} target {row['target_label']}{targets}, queue {row['queue_ms']:.1f} ms, compute "
            f"{row['compute_ms']:.1f} ms, batch {row['batch_size']}{extra}, map {row['map_sha256'][:12]}{saved}")


