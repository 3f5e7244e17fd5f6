"""The GPU check: explanations per second per GPU, as ratios to the model's forward+backward floor.

One run prints, for one model at one input size and precision:

    floor     plain forward + backward (the gradient of one logit per item), samples/s, in float32
              and in the chosen precision (autocast);
    kernels   SmoothGrad-50, IG-32 and Grad-CAM explanations/s through the service's own pipeline
              (`workers.pipeline.explain_batch`, batches of several requests), in the chosen precision;
    service   the same methods through the in-process service: the gRPC front door
              (`service.server.create_server`) over `LocalBackend` batching across calls, driven by
              `--clients` concurrent clients sending batch-1 uint8 requests; float32 (the service has
              no reduced-precision setting yet).

Each row's samples/s (explanations/s x rows per explanation: 50, 32 or 1) is divided by the floor
in the same precision. `--tiny` runs the same code on CPU in seconds (random ResNet-18 at 32x32,
few clients), which is how the suite keeps this script from rotting; on a GPU host run
`loadtests/gpu_check.sh`.

    python -m loadtests.gpu_check --device cuda --model resnet50 --size 224 --dtype bf16 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import statistics
import time

import numpy as np
import torch

from loadtests import report

METHODS = {  # name -> (rows per explanation, requests folded per kernel batch)
    "smoothgrad": (50, 8),
    "integrated_gradients": (32, 8),
    "grad_cam": (1, 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _rate(fn, items: int, seconds: float, device: torch.device, warmup: int = 2) -> float:
    """Items per second of `fn()` (which processes `items`), over at least `seconds` (median of runs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return items / statistics.median(times)


def floor_rate(model: torch.nn.Module, shape: tuple, batch: int, device: torch.device, dtype: torch.dtype,
               seconds: float) -> float:
    """Samples/s of forward + backward of one logit per item, the cost every gradient method pays per row."""
    x = torch.randn((batch,) + shape, device=device)

    def step():
        inputs = x.detach().requires_grad_(True)
        with _precision(device, dtype):
            out = model(inputs)
        out[:, 0].float().sum().backward()

    return _rate(step, batch, seconds, device)


def kernel_rate(ctx, method: str, shape: tuple, device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Explanations/s of `method` through `explain_batch`, `METHODS[method][2]` batch-1 requests per batch."""
    from workers.pipeline import explain_batch
    from workers.spec import ExplainSpec, MethodParams

    _, requests = METHODS[method]
    params = MethodParams(samples=50) if method == "smoothgrad" else MethodParams(steps=32)
    specs = [ExplainSpec(model=ctx.model.name, method=method, inputs=torch.randn((1,) + shape), params=params,
                         seed=i) for i in range(requests)]

    def batch():
        with _precision(device, dtype):
            outcomes = explain_batch(ctx, specs)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:
            raise failed[0]

    return _rate(batch, requests, seconds, device, warmup=1)


async def service_rate(registry, method: str, shape: tuple, clients: int, seconds: float,
                       max_batch_cost: int) -> dict:
    """Explanations/s of `method` through the in-process service with `clients` closed-loop clients."""
    from service.backends.local import LocalBackend
    from service.client import AsyncAttributionClient, build_request
    from service.config import DecodeConfig, ServerConfig
    from service.server import create_server

    # uint8 tensors need no image decoding: no decode processes to start
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, grace_s=0.0,
                          decode=DecodeConfig(isolation="inline"))
    server = await create_server(config, LocalBackend(registry, max_batch_cost=max_batch_cost))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1,) + shape, dtype=np.uint8)
    params = {"samples": 50} if method == "smoothgrad" else {"steps": 32} if method == "integrated_gradients" else {}
    request = build_request(pixels, method=method, **params)
    done, batches = 0, []
    try:
        async with AsyncAttributionClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            await client.explain_request(request)  # warm

            async def one(stop: float) -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    answer = await client.explain_request(request)
                    done += 1
                    batches.append(answer.timings.get("batch_requests", 1))

            started = time.perf_counter()
            await asyncio.gather(*(one(started + seconds) for _ in range(clients)))
            elapsed = time.perf_counter() - started
    finally:
        await server.stop(0.0)
    return {"explanations_per_s": round(done / elapsed, 2),
            "mean_batch_requests": round(len(batches) / sum(1 / max(1, b) for b in batches), 2) if batches else None}


def run(args: argparse.Namespace) -> dict:
    from workers.config import InputSpec, ModelConfig
    from workers.models import ModelRegistry
    from workers.stages import WorkerContext

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    shape = (3, args.size, args.size)
    cfg = ModelConfig(name=args.model, source="torchvision", arch=args.model,
                      input=InputSpec(height=args.size, width=args.size))
    registry = ModelRegistry([cfg], device=device)
    loaded = registry.get(args.model)
    ctx = WorkerContext.create(loaded)
    started = time.time()
    floor32 = floor_rate(loaded.module, shape, args.floor_batch, device, torch.float32, args.seconds)
    floor = floor32 if dtype == torch.float32 else floor_rate(loaded.module, shape, args.floor_batch, device, dtype,
                                                               args.seconds)
    rows = []
    for method, (per, _) in METHODS.items():
        kernel = kernel_rate(ctx, method, shape, device, dtype, args.seconds)
        service = asyncio.run(service_rate(registry, method, shape, args.clients, args.seconds, args.max_batch_cost))
        rows.append({"method": method, "rows_per_explanation": per,
                     "kernel_explanations_per_s": round(kernel, 2), "kernel_dtype": args.dtype,
                     "kernel_ratio_to_floor": round(kernel * per / floor, 3),
                     "service_explanations_per_s": service["explanations_per_s"], "service_dtype": "fp32",
                     "service_mean_batch_requests": service["mean_batch_requests"],
                     "service_ratio_to_floor": round(service["explanations_per_s"] * per / floor32, 3)})
    ctx.taps.close()
    payload = {"kind": "gpu_check", "machine": report.machine(), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "model": args.model, "size": args.size, "dtype": args.dtype, "clients": args.clients,
               "floor_samples_per_s": {"fp32": round(floor32, 1), args.dtype: round(floor, 1)},
               "rows": rows, "seconds": round(time.time() - started, 1)}
    print(f"{payload['device_name']}: {args.model} {args.size}x{args.size}, floor {floor32:.1f} samples/s fp32"
          + (f", {floor:.1f} {args.dtype}" if dtype != torch.float32 else ""))
    for row in rows:
        print(f"{row['method']:>22}: kernels {row['kernel_explanations_per_s']:>9.2f}/s "
              f"({row['kernel_ratio_to_floor']:.2f} of the floor), service {row['service_explanations_per_s']:>9.2f}/s "
              f"({row['service_ratio_to_floor']:.2f}, batches of {row['service_mean_batch_requests']})")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="", help="cuda (default when present) or cpu")
    parser.add_argument("--model", default="resnet50", help="torchvision architecture, random weights")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--floor-batch", type=int, default=64)
    parser.add_argument("--max-batch-cost", type=int, default=512, help="the in-process service's batch budget")
    parser.add_argument("--tiny", action="store_true", help="CPU, ResNet-18 at 32x32, 4 clients, 1 s per row")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.model, args.size, args.clients, args.seconds = "cpu", "resnet18", 32, 4, 1.0
        args.floor_batch, args.max_batch_cost = 4, 128
    payload = run(args)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
