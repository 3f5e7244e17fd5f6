"""`attribution explain IMAGE...`: each image its own request, N in flight, overlays written.

Against a running server (`--server HOST:PORT`) or in-process (`--local`: the
same front door and pipeline on a loopback port, no Ray). `--demo N` explains N
generated watermark images of the embedded demo model instead of files.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import sys
from typing import Any, AsyncIterator

from service.client import AsyncAttributionClient, ServiceError, build_request

_PARAM_FLAGS = ("samples", "noise_fraction", "steps", "rule", "baseline", "layer", "top_k_channels",
                "patch_size", "stride")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", type=pathlib.Path, help="PNG/JPEG files")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="HOST:PORT of a running service")
    where.add_argument("--local", action="store_true", help="run in-process on the configured models (no Ray)")
    parser.add_argument("--config", help="config file for --local (default: the demo model)")
    parser.add_argument("--demo", type=int, default=0, metavar="N", help="explain N generated demo images")
    parser.add_argument("--save-inputs", type=pathlib.Path, metavar="DIR",
                        help="also write every input as sent (the demo images too) here, e.g. for "
                             "`attribution audit verify --inputs DIR`")
    parser.add_argument("--model", default="", help="model name (default: the server's default)")
    parser.add_argument("--method", default="grad_cam", help="e.g. grad_cam, smoothgrad, integrated_gradients")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target", type=int, help="class index to explain (default: predicted)")
    target.add_argument("--top-k", type=int, help="explain the top-k classes")
    parser.add_argument("--samples", type=int, help="SmoothGrad family: noisy copies")
    parser.add_argument("--noise-fraction", type=float, help="SmoothGrad family: noise std / input range")
    parser.add_argument("--steps", type=int, help="Integrated Gradients: steps")
    parser.add_argument("--rule", help="Integrated Gradients: riemann_* or gauss_legendre")
    parser.add_argument("--baseline", help="Integrated Gradients: zero, black, blurred, uniform_noise, dataset_mean")
    parser.add_argument("--layer", help="CAM layer (default: the model's)")
    parser.add_argument("--top-k-channels", type=int, help="Score-CAM channels kept")
    parser.add_argument("--patch-size", type=int, help="occlusion patch")
    parser.add_argument("--stride", type=int, help="occlusion stride")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("-o", "--output", type=pathlib.Path, help="overlay PNG file (one input) or directory")
    parser.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    parser.add_argument("--token", help="bearer token")


def run(args: argparse.Namespace) -> int:
    if not args.images and not args.demo:
        print("attribution explain: give image files or --demo N", file=sys.stderr)
        return 2
    if not args.server and not args.local:
        print("attribution explain: give --server HOST:PORT or --local", file=sys.stderr)
        return 2
    return asyncio.run(_explain_all(args))


def _inputs(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    named = [(str(p), p.read_bytes()) for p in args.images]
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


def _overlay_path(args: argparse.Namespace, name: str, count: int) -> pathlib.Path | None:
    if args.output is None:
        return None
    if count == 1 and args.output.suffix.lower() == ".png":
        return args.output
    return args.output / f"{pathlib.Path(name).stem}.{args.method}.png"


async def _explain_all(args: argparse.Namespace) -> int:
    inputs = _inputs(args)
    if args.save_inputs is not None:
        args.save_inputs.mkdir(parents=True, exist_ok=True)
        for name, data in inputs:
            _save_input(args.save_inputs / pathlib.Path(name).name, data)
    params = {k: getattr(args, k) for k in _PARAM_FLAGS if getattr(args, k) is not None}
    failures = 0
    async with _target(args) as address:
        async with AsyncAttributionClient(address, token=args.token, timeout=args.timeout) as client:
            gate = asyncio.Semaphore(max(1, args.concurrency))

            async def one(name: str, data: bytes) -> dict[str, Any]:
                request = build_request(images=[data], method=args.method, model=args.model, target=args.target,
                                        top_k=args.top_k, seed=args.seed, request_id=pathlib.Path(name).stem,
                                        png_overlay=args.output is not None, **params)
                async with gate:
                    try:
                        result = await client.explain_request(request, timeout=args.timeout)
                    except ServiceError as exc:
                        return {"input": name, "error": exc.code().name, "message": exc.details()}
                return _report(args, name, result, _overlay_path(args, name, len(inputs)))

            for row in await asyncio.gather(*(one(n, d) for n, d in inputs)):
                failures += "error" in row
                print(json.dumps(row) if args.json else _line(row), flush=True)
    return 1 if failures else 0


def _report(args, name: str, result, overlay: pathlib.Path | None) -> dict[str, Any]:
    item = result.items[0]
    first = item.attributions[0]
    if overlay is not None and first.png_overlay:
        overlay.parent.mkdir(parents=True, exist_ok=True)
        overlay.write_bytes(first.png_overlay)
    t = result.timings
    return {"input": name, "request_id": result.request_id, "model": result.model,
            "model_version": result.model_version, "method": first.method, "target": first.target,
            "target_score": round(first.target_score, 6), "predicted": item.predicted_classes[0],
            "predicted_score": round(item.predicted_scores[0], 6), "queue_ms": round(t["queue_ms"], 3),
            "compute_ms": round(t["compute_ms"], 3), "total_ms": round(t["total_ms"], 3),
            "batch_size": int(t["batch_requests"]), "batch_samples": int(t["batch_samples"]),
            "completeness_error": first.completeness_error, "map_sha256": first.map_sha256,
            "input_sha256": item.input_sha256, "overlay": str(overlay) if overlay and first.png_overlay else None}


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['input']}: {row['error']}: {row['message']}"
    extra = f" completeness={row['completeness_error']:.4f}" if row["completeness_error"] is not None else ""
    saved = f" -> {row['overlay']}" if row["overlay"] else ""
    return (f"{row['input']}: predicted {row['predicted']} ({row['predicted_score']:.3f}), {row['method']} "
            f"target {row['target']}, queue {row['queue_ms']:.1f} ms, compute {row['compute_ms']:.1f} ms, "
            f"batch {row['batch_size']}{extra}, map {row['map_sha256'][:12]}{saved}")


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace) -> AsyncIterator[str]:
    """The address to call: the given server, or an in-process one on loopback."""
    if args.server:
        yield args.server
        return
    from service.server import create_server
    from service.settings import ServiceConfig
    from service.backends.local import LocalBackend
    from workers.models import ModelRegistry

    config = ServiceConfig.load(args.config, {"host": "127.0.0.1", "port": 0, "metrics_port": None})
    app = config.app
    registry = ModelRegistry(list(app.models), app.default, cache_dir=app.cache_dir or None)
    server = await create_server(config.server, LocalBackend(registry, limits=config.server.limits))
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(1.0)
