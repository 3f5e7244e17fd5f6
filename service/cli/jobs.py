"""`attribution jobs submit | get | watch | cancel | list --server HOST:PORT [--json]`.

`submit` sends image files (PNG/JPEG, or .npy pixel arrays) as one job; `watch`
follows a job with a progress bar (or one JSON object per event with --json)
until it ends; `-o DIR` writes a finished job's maps as .npy and, when the job
asked for them (`submit --overlay`), its PNG overlays: drawn here over the photo
at its own resolution when the input file is at hand (the job's item names point
to it), else the server's, at the model's input size. Classes are shown with the
model's class names where it has them. Exit status: 0, or 1 when a call fails, or
3 when a watched job ends FAILED or CANCELLED.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from service._proto import attribution_pb2 as pb
from service.cli import add_tls_arguments, tls_options
from service.client import AttributionClient, array_from_tensor, build_request
from service.errors import code_from_number

_FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
_BAR_WIDTH = 30
# submit option -> build_request keyword; only the options given are sent.
_PARAMS = ("layer", "top_k_channels", "patch_size", "stride", "baseline_value", "samples", "noise_fraction",
           "steps", "masks", "grid", "keep_probability", "segmentation_scales")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    submit = sub.add_parser("submit", help="submit images as one offline job")
    submit.add_argument("inputs", nargs="+", help="PNG/JPEG files, or .npy pixel arrays (N, C, H, W) in [0, 1]")
    submit.add_argument("--method", default="score_cam",
                        help="score_cam, ablation_cam, occlusion, rise, xrai, or any online method")
    submit.add_argument("--model", default="", help="model name (default: the server's default)")
    submit.add_argument("--target", type=int, nargs="+", help="class index, one for all or one per item")
    submit.add_argument("--top-k", type=int, help="explain the top-k classes of each item")
    submit.add_argument("--layer", help="CAM / Score-CAM / Ablation-CAM layer")
    submit.add_argument("--top-k-channels", type=int, help="Score-CAM / Ablation-CAM: only the k strongest channels")
    submit.add_argument("--patch-size", type=int, help="occlusion patch side (pixels)")
    submit.add_argument("--stride", type=int, help="occlusion stride (pixels)")
    submit.add_argument("--baseline-value", type=float, help="occlusion fill value (model space)")
    submit.add_argument("--samples", type=int, help="SmoothGrad family: noisy copies")
    submit.add_argument("--noise-fraction", type=float, help="SmoothGrad family: noise level")
    submit.add_argument("--steps", type=int, help="Integrated Gradients / XRAI: interpolation points")
    submit.add_argument("--masks", type=int, help="RISE: random masks per item")
    submit.add_argument("--grid", type=int, help="RISE: mask cells per side")
    submit.add_argument("--keep-probability", type=float, help="RISE: probability a cell is kept")
    submit.add_argument("--segmentation-scales", type=float, nargs="+", help="XRAI: Felzenszwalb scales")
    submit.add_argument("--seed", type=int, default=0, help="seeds the random draws (RISE masks, noise)")
    submit.add_argument("--normalization", default=0, help="none, max_abs or min_max")
    submit.add_argument("--overlay", action="store_true", help="also store PNG overlays in the result")
    submit.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first")
    submit.add_argument("--idempotency-key", default="", help="submitting the same key again returns the same job")
    submit.add_argument("--watch", action="store_true", help="then watch the job until it ends")
    _common(submit, output=True)
    for name, help_text in (("get", "show a job"), ("watch", "follow a job until it ends"),
                            ("cancel", "cancel a queued or running job")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("id", help="job id")
        _common(cmd, output=name != "cancel")
    listing = sub.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", nargs="+", default=[], choices=[s.lower() for s in pb.JobState.keys()][1:],
                         help="only jobs in these states")
    listing.add_argument("--page-size", type=int, default=50)
    listing.add_argument("--page-token", default="")
    _common(listing, output=False)


def _common(cmd: argparse.ArgumentParser, output: bool) -> None:
    cmd.add_argument("--server", default="localhost:50051", help="HOST:PORT of the service")
    cmd.add_argument("--token", default=None, help="bearer token, when the server wants one")
    add_tls_arguments(cmd)
    cmd.add_argument("--timeout", type=float, default=60.0, help="seconds per call (watch: none)")
    cmd.add_argument("--json", action="store_true", help="print the job as one JSON object")
    if output:
        cmd.add_argument("-o", "--output", type=pathlib.Path, help="write a finished job's maps (.npy) and "
                                                                   "overlays (.png) here")


def run(args: argparse.Namespace) -> int:
    client = AttributionClient(args.server, token=args.token, timeout=args.timeout, **tls_options(args))
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        return _ACTIONS[args.jobs_command](client.stub, args, metadata)
    except grpc.RpcError as exc:
        from service.cli import service_error_line

        print(f"attribution jobs {args.jobs_command}: {service_error_line(exc, args)}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as exc:  # unreadable input files, bad option values
        print(f"attribution jobs {args.jobs_command}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _submit(stub, args: argparse.Namespace, metadata) -> int:
    params = {k: getattr(args, k) for k in _PARAMS if getattr(args, k) is not None}
    request = build_request(**_inputs(args.inputs), method=args.method, model=args.model, top_k=args.top_k,
                            target=args.target, normalization=args.normalization, png_overlay=args.overlay,
                            seed=args.seed, **params)
    job = stub.SubmitJob(pb.SubmitJobRequest(request=request, priority=args.priority,
                                             idempotency_key=args.idempotency_key,
                                             item_names=_item_names(args.inputs)),
                         timeout=args.timeout, metadata=metadata)
    if args.watch:
        args.id = job.id
        return _watch(stub, args, metadata)
    _print_job(job, args)
    return 0


def _inputs(paths: list[str]) -> dict[str, Any]:
    """Image files as encoded images, or .npy arrays stacked into one pixel tensor."""
    if all(p.endswith(".npy") for p in paths):
        arrays = [np.load(p) for p in paths]
        return {"inputs": np.concatenate([a[None] if a.ndim == 3 else a for a in arrays]).astype(np.float32)}
    if any(p.endswith(".npy") for p in paths):
        raise ValueError("give image files or .npy arrays, not both")
    return {"images": paths}


def _get(stub, args: argparse.Namespace, metadata) -> int:
    job = stub.GetJob(pb.GetJobRequest(id=args.id, include_result=bool(args.output)), timeout=args.timeout,
                      metadata=metadata)
    items = _item_summaries(job, _labels(stub, job, metadata, args.timeout))
    _print_job(job, args, _write_outputs(job, args.output, items), items)
    return 0


def _watch(stub, args: argparse.Namespace, metadata) -> int:
    job = None
    request = pb.WatchJobRequest(id=args.id, include_result=bool(args.output))
    try:
        for event in stub.WatchJob(request, metadata=metadata):  # no deadline: jobs may run all night
            job = event.job
            if args.json:
                if job.state not in _FINAL:  # the final event is printed below, with the items and outputs
                    print(json.dumps(job_dict(job)), flush=True)
            else:
                print(f"\r{progress_line(job)}", end="" if job.state not in _FINAL else "\n", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        print(f"\nstopped watching; job {args.id} goes on on the server "
              f"(`attribution jobs watch {args.id}` picks it up again, `jobs cancel` stops it)", file=sys.stderr)
        return 130
    items = _item_summaries(job, _labels(stub, job, metadata, args.timeout))
    written = _write_outputs(job, args.output, items)
    if not args.json or job.state in _FINAL:
        _print_job(job, args, written, items)
    if job.state == pb.FAILED:
        print(f"job failed: {code_from_number(job.error.code).name}: {job.error.message}", file=sys.stderr)
    return 0 if job.state == pb.SUCCEEDED else 3


def _cancel(stub, args: argparse.Namespace, metadata) -> int:
    _print_job(stub.CancelJob(pb.CancelJobRequest(id=args.id), timeout=args.timeout, metadata=metadata), args)
    return 0


def _list(stub, args: argparse.Namespace, metadata) -> int:
    request = pb.ListJobsRequest(states=[pb.JobState.Value(s.upper()) for s in args.state],
                                 page_size=args.page_size, page_token=args.page_token)
    response = stub.ListJobs(request, timeout=args.timeout, metadata=metadata)
    if args.json:
        print(json.dumps({"jobs": [job_dict(j) for j in response.jobs],
                          "next_page_token": response.next_page_token}))
        return 0
    for job in response.jobs:
        print(f"{job.id}  {pb.JobState.Name(job.state):9s}  {job.progress:4.0%}  "
              f"{pb.Method.Name(job.method).lower():20s}  {job.num_items:5d} items  priority {job.priority}")
    if response.next_page_token:
        print(f"more: --page-token {response.next_page_token}")
    return 0


_ACTIONS = {"submit": _submit, "get": _get, "watch": _watch, "cancel": _cancel, "list": _list}


def job_dict(job: pb.Job) -> dict[str, Any]:
    """The job as plain JSON values (enum names, snake_case keys), without the bulky result."""
    light = pb.Job()
    light.CopyFrom(job)
    light.ClearField("result")
    return json_format.MessageToDict(light, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def progress_line(job: pb.Job) -> str:
    done = int(round(job.progress * _BAR_WIDTH))
    bar = "#" * done + "-" * (_BAR_WIDTH - done)
    return f"{job.id[:12]}  {pb.JobState.Name(job.state):9s} [{bar}] {job.progress:4.0%}"


def _print_job(job: pb.Job, args: argparse.Namespace, written: list[str] | None = None,
               items: list[dict[str, Any]] | None = None) -> None:
    """The job (and, when its result was fetched, a line per item: its classes, named) and the files written."""
    if args.json:
        out = job_dict(job)
        if items:
            out["items"] = items
        if written is not None:
            out["outputs"] = written
        print(json.dumps(out))
        return
    print(f"job {job.id}: {pb.JobState.Name(job.state)} {job.progress:.0%} "
          f"({pb.Method.Name(job.method).lower()}, {job.num_items} items, model {job.model or 'default'})")
    if job.state == pb.FAILED:
        print(f"  error: {job.error.message}")
    for item in items or ():
        predicted = ", ".join(f"{_named(c, label)} ({score:.3f})" for c, label, score in
                              zip(item["predicted_classes"], item["predicted_labels"], item["predicted_scores"]))
        targets = ", ".join(_named(c, label) for c, label in zip(item["targets"], item["target_labels"]))
        print(f"  {item['name'] or 'item %d' % item['item']}: predicted {predicted}; maps for {targets}")
    for path in written or ():
        print(f"  wrote {path}")


def _named(index: int, label: str | None) -> str:
    return f"{index} {label!r}" if label else str(index)


def _labels(stub, job: pb.Job | None, metadata, timeout: float) -> tuple[str, ...]:
    """The class names of the job's model when its result is at hand and the model has them, else ()."""
    if job is None or not job.result.items:
        return ()
    try:
        info = stub.GetModel(pb.GetModelRequest(name=job.result.model or job.model), timeout=timeout,
                             metadata=metadata)
    except grpc.RpcError:  # the names only make the output easier to read: go on without them
        return ()
    return tuple(info.class_labels)


def _item_summaries(job: pb.Job | None, labels: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """Per item of a fetched result: its name, input hash, top classes and the classes explained, each class
    number with its name beside it (None where the model has no names); None when there is no result."""
    if job is None or not job.result.items:
        return None
    names = list(job.item_names) if len(job.item_names) == len(job.result.items) else []

    def label(index: int) -> str | None:
        return labels[index] if 0 <= index < len(labels) and labels[index] else None

    summaries = []
    for i, item in enumerate(job.result.items):
        targets = list(dict.fromkeys(a.target for a in item.attributions))
        summaries.append({"item": i, "name": names[i] if names else None, "input_sha256": item.input_sha256,
                          "predicted_classes": list(item.predicted_classes),
                          "predicted_labels": [label(c) for c in item.predicted_classes],
                          "predicted_scores": [round(x, 6) for x in item.predicted_scores],
                          "targets": targets, "target_labels": [label(c) for c in targets]})
    return summaries


def _item_names(paths: list[str]) -> list[str]:
    """One name per item: the file for an image, `file[i]` for each item of a stacked .npy array."""
    if not all(p.endswith(".npy") for p in paths):
        return [str(p)[-256:] for p in paths]
    names = []
    for p in paths:
        shape = np.load(p, mmap_mode="r").shape
        count = shape[0] if len(shape) == 4 else 1
        names += [p[-250:]] if count == 1 else [f"{p[-240:]}[{i}]" for i in range(count)]
    return names


def _write_outputs(job: pb.Job | None, directory: pathlib.Path | None,
                   items: list[dict[str, Any]] | None = None) -> list[str] | None:
    """Each map as `<input stem>_<method>_class<target>.npy` (+ `.png` overlay) in `directory` (`item<i>` when
    the job has no item names), and `manifest.json`: per item its name, input hash, top classes, the classes
    explained (with their names, `items` of `_item_summaries`), its files and where its overlays were drawn."""
    from service.cli.explain import output_stems

    if directory is None or job is None or job.state != pb.SUCCEEDED:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    items = items or _item_summaries(job, ()) or []
    names = list(job.item_names) if len(job.item_names) == len(job.result.items) else []
    stems = output_stems(names) if names else [f"item{i:04d}" for i in range(len(job.result.items))]
    written, manifest = [], []
    for i, item in enumerate(job.result.items):
        files = []
        photo = _photo(names[i], item) if names and any(a.png_overlay for a in item.attributions) else None
        for a in item.attributions:
            stem = directory / f"{stems[i]}_{pb.Method.Name(a.method).lower()}_class{a.target}"
            values = array_from_tensor(a.map)
            np.save(f"{stem}.npy", values)
            files.append(f"{stem.name}.npy")
            if a.png_overlay:
                pathlib.Path(f"{stem}.png").write_bytes(_overlay(photo, values, item) if photo else a.png_overlay)
                files.append(f"{stem.name}.png")
        overlays = None if not any(f.endswith(".png") for f in files) else ("photo" if photo else "model_input")
        manifest.append(dict(items[i], files=files, overlays=overlays))
        written += [str(directory / f) for f in files]
    (directory / "manifest.json").write_text(json.dumps({"job": job.id, "model": job.result.model,
                                                         "model_version": job.result.model_version,
                                                         "items": manifest}, indent=2) + "\n")
    written.append(str(directory / "manifest.json"))
    return written


def _photo(name: str, item: pb.ItemResult):
    """The submitted photo, when `name` is an image file at hand here and it is the size the server decoded
    (EXIF applied); else None, and the server's overlay is written instead."""
    from PIL import Image

    from service import render

    path = pathlib.Path(name)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or not path.is_file():
        return None
    try:
        photo = render.open_photo(path.read_bytes())
    except (OSError, Image.DecompressionBombError):  # unreadable, not an image, too large
        return None
    if item.HasField("geometry") and (item.geometry.width, item.geometry.height) != photo.size:
        return None  # not the file that was sent (changed since)
    return photo


def _overlay(photo, values: np.ndarray, item: pb.ItemResult) -> bytes:
    """The map over the photo at the photo's resolution, through the geometry the server decoded it with."""
    from service import render

    box = render.photo_box(item.geometry if item.HasField("geometry") else None, photo.size)
    return render.png_bytes(render.overlay(photo, values, render.Style(), box=box))
